"""The LightningCLI behind ``lightning-gd`` (imported by :mod:`lightning_gd.cli` when a subcommand runs)."""

from __future__ import annotations

import os
import re
import shutil
from glob import glob as _glob
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_gd
from lightning_gd.callbacks.progress_bar import ResumeProgressBar
from lightning_gd.recipes.recipe_tag import RecipeTag

__all__ = ["LightningGDCLI", "StartError"]


class StartError(Exception):
    """A configuration mistake found before the run started: one line that names the argument, the value and the
    way out (``lightning-gd`` prints it; ``--debug`` shows the traceback of the error behind it)."""


# What a configuration mistake raises: our arguments' checks (ValueError, MisconfigurationException) and missing or
# unreadable paths. Anything else (a bug) keeps its traceback.
_CONFIG_ERRORS = (ValueError, MisconfigurationException, OSError)

# `--ckpt_path` values that are no file: Lightning resolves them itself.
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class LightningGDCLI(LightningCLI):
    """LightningCLI with any module and data module, an overwriting config saver, and loggers that share
    a ``save_dir`` and ``name`` writing into the same ``version_N`` directory (the run directory).

    A run that fails before it starts (a bad argument, a missing directory or checkpoint) leaves no run directory
    behind. With ``short_errors=True`` (the ``lightning-gd`` command) such a failure raises :class:`StartError`, a
    one-line message that names the argument as given on the command line (``--data.data_dir``), the value and the
    way out, from the error behind it.

    Example::

        # my_train.py: the same command line, with your own defaults
        from lightning_gd.cli import LightningGDCLI
        LightningGDCLI()
    """

    def __init__(self, *args: Any, short_errors: bool = False, **kwargs: Any) -> None:
        lightning_gd.register()  # every class of the package by its short name, the ddp_<compressor> strategies
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        self._new_run_dirs: list[str] = []  # the run directories this command creates
        self._new_parents: list[str] = []  # and their parents that do not exist yet, outermost first
        self._watch = _StartWatch()
        try:
            super().__init__(*args, **kwargs)
        except Exception as err:
            if self._watch.started:
                raise
            self._remove_new_dirs()
            if short_errors and isinstance(err, StartError):
                raise
            cause = _root_cause(err)
            if short_errors and isinstance(cause, _CONFIG_ERRORS):
                raise StartError(self._one_line(cause)) from err
            raise

    def add_arguments_to_parser(self, parser: Any) -> None:
        # One sequence length: the data's window sets the model's block_size (skipped by jsonargparse when either
        # class lacks the argument, so any LightningModule / LightningDataModule still works).
        parser.link_arguments("data.init_args.seq_len", "model.init_args.block_size", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        run_dirs = _pin_logger_versions(config.get("trainer", {}).get("logger"))
        for run_dir in run_dirs:
            if not os.path.exists(run_dir):
                self._new_run_dirs.append(run_dir)
                self._new_parents.extend(_missing_parents(run_dir))
        _check_ckpt_path(config.get("ckpt_path"), run_dirs)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # Lightning's own bar reads "110/9" after a mid-epoch resume: ours, unless a bar is configured or disabled.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        wanted = config.get("enable_progress_bar") is not False and not config.get("barebones")
        if "callbacks" not in kwargs and wanted and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ResumeProgressBar()]
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(self._watch)
        return trainer

    def before_fit(self) -> None:
        # Tag checkpoints with the recipe (the first --config's file stem): resuming another recipe's warns.
        configs = self.config["fit"].get("config") or []
        if configs:
            name = os.path.basename(str(getattr(configs[0], "relative", configs[0])))
            self.trainer.callbacks.append(RecipeTag(os.path.splitext(name)[0]))

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _remove_new_dirs(self) -> None:
        for path in self._new_run_dirs:
            shutil.rmtree(path, ignore_errors=True)
        for path in sorted(set(self._new_parents), key=len, reverse=True):  # deepest first, each once empty
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)

    def _one_line(self, err: BaseException) -> str:
        """``err``'s message with the failing class's arguments written as on the command line (``--data.X``)."""
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        config = self._subcommand_config() if getattr(self, "config", None) is not None else {}
        group, owner = _failing_group(err, config)
        if group is None:
            return f"{owner}: {message}" if owner else message
        init_args = config[group].get("init_args") or {}
        renamed = re.sub(
            r"`(\w+)`", lambda m: f"--{group}.{m.group(1)}" if m.group(1) in init_args else m.group(0), message
        )
        return renamed if renamed != message else f"{owner} (--{group}): {message}"


class _StartWatch(Callback):
    """Notes when a run has started (its first loop), after which a failure is no configuration mistake."""

    def __init__(self) -> None:
        self.started = False

    def _start(self, *_: Any) -> None:
        self.started = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = on_predict_start = _start


def _root_cause(err: BaseException) -> BaseException:
    """The innermost explicitly chained cause: jsonargparse wraps a class's own error in ``ValueError``s."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _failing_group(err: BaseException, config: Any) -> tuple[str | None, str | None]:
    """The config group (``model``, ``data``) whose object raised ``err``, and that object's class name.

    Found from the traceback: the outermost frame that runs a method of the configured model or data class.
    """
    names = {}
    for group in ("model", "data"):
        class_path = (config.get(group) or {}).get("class_path") if hasattr(config, "get") else None
        if class_path:
            names[str(class_path).rsplit(".", 1)[-1]] = group
    owner = None
    tb = err.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if obj is not None and not isinstance(obj, (type, LightningCLI)):
            for cls in type(obj).__mro__:
                if cls.__name__ in names:
                    return names[cls.__name__], type(obj).__name__
            if owner is None and type(obj).__module__.startswith("lightning_gd."):
                owner = type(obj).__name__
        tb = tb.tb_next
    return None, owner


def _missing_parents(path: str) -> list[str]:
    """The parents of ``path`` that do not exist yet."""
    missing = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing


def _check_ckpt_path(ckpt_path: Any, run_dirs: list[str]) -> None:
    """Refuse a ``--ckpt_path`` file that does not exist before anything is built or written."""
    if ckpt_path is None:
        return
    path = str(ckpt_path)
    if path in _CKPT_KEYWORDS or path.startswith("registry:") or "://" in path or os.path.exists(path):
        return
    hint = "give the path of a checkpoint"
    roots = {os.path.dirname(d) for d in run_dirs if os.path.basename(d).startswith("version_")}
    latest = sorted(
        (p for root in roots for p in _glob(os.path.join(root, "version_*", "checkpoints", "last.ckpt"))),
        key=os.path.getmtime,
    )
    if latest:
        hint += f" (the latest here: {os.path.relpath(latest[-1])})"
    raise FileNotFoundError(
        f"--ckpt_path {path!r} does not exist: {hint}, or leave --ckpt_path out to start from scratch"
    )


def _next_version(root: str) -> int:
    if not os.path.isdir(root):
        return 0
    found = [int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", d))]
    return max(found, default=-1) + 1


def _pin_logger_versions(loggers: Any) -> list[str]:
    """Give loggers with the same ``save_dir``/``name`` and no version one common next version; return the run
    directories of every logger with a ``save_dir`` (``save_dir/name/version_N``).

    Without this, the first logger creates ``version_0`` and the second, looking later, picks ``version_1``.
    """
    if not isinstance(loggers, list):
        loggers = [] if loggers is None or isinstance(loggers, bool) else [loggers]
    groups: dict[tuple[str, str], list[Any]] = {}
    run_dirs = []
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        if init_args is None or "save_dir" not in init_args:
            continue
        name = str(init_args.get("name") or "lightning_logs")
        if init_args.get("version") is not None:
            run_dirs.append(os.path.join(str(init_args["save_dir"]), name, _version_dir(init_args["version"])))
            continue
        groups.setdefault((str(init_args["save_dir"]), name), []).append(init_args)
    for (save_dir, name), members in groups.items():
        version = _next_version(os.path.join(save_dir, name))
        run_dirs.append(os.path.join(save_dir, name, f"version_{version}"))
        if len(members) > 1:
            for init_args in members:
                init_args["version"] = version
    return run_dirs


def _version_dir(version: Any) -> str:
    return version if isinstance(version, str) else f"version_{version}"
