"""The LightningCLI behind ``lightning-gd`` (imported by :mod:`lightning_gd.cli` when a subcommand runs)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import sys
import warnings
from glob import glob as _glob
from typing import Any, Literal

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import lightning_gd
from lightning_gd._auto_resume import RunComplete, plan_resume, run_root
from lightning_gd.callbacks.graceful_stop import GracefulStop
from lightning_gd.callbacks.progress_bar import ResumeProgressBar
from lightning_gd.callbacks.schedule_check import ScheduleLengthCheck
from lightning_gd.plugins.checkpoint_io import AtomicCheckpointIO, probe_checkpoint
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

    ``fit`` resumes by itself: a relaunch of the same command (a torchrun restart, a SLURM requeue, the same line
    typed again) continues the run from its newest checkpoint that loads, in the same run directory, and says so
    in one line (``_auto_resume``). ``--ckpt_path`` wins; ``--resume never`` or another ``--run_name`` starts a
    new run; a run that reached its ``max_steps`` says it is complete and trains nothing. Checkpoints are written
    atomically (:class:`~lightning_gd.plugins.AtomicCheckpointIO`), Ctrl-C and SIGTERM save one before the run
    stops (:class:`~lightning_gd.callbacks.GracefulStop`), and a changed schedule length is said once
    (:class:`~lightning_gd.callbacks.ScheduleLengthCheck`).

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
        self._resumed_dir: str | None = None  # the existing run directory a resumed run logs into
        self._resume_step: int | None = None
        self._explicit_ckpt: Any = None  # what --ckpt_path holds (probed when parsed)
        self.complete = False  # the run to resume had reached its max_steps: nothing was run
        try:
            super().__init__(*args, **kwargs)
        except RunComplete as done:
            _say(str(done))
            self.complete = True
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
        parser.add_argument(
            "--resume",
            type=Literal["auto", "never"],
            default="auto",
            help="fit: `auto` continues the run from its newest checkpoint that loads; `never` starts a new run",
        )
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="fit: the run's name, the loggers' `name` (runs/NAME/version_N); default: the recipe's",
        )
        parser.add_argument(
            "--resume_mismatch",
            type=Literal["error", "warn"],
            default="error",
            help="fit: `warn` resumes past a failed resume check (another recipe's run, other data settings,"
            " compression memory missing or for another world size) with one warning each",
        )
        parser.add_argument(
            "--resume_schedule",
            type=Literal["checkpoint", "this_run"],
            default="checkpoint",
            help="fit: the LR schedule length after a resume with another max_steps: the checkpoint's or this run's",
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads a --ckpt_path file's hyperparameters next: a damaged file is one line, not torch's error.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and os.path.isfile(str(ckpt_path)):
            self._explicit_ckpt = probe_checkpoint(str(ckpt_path))

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        trainer_config = config.get("trainer", {})
        version = self._plan_run(config) if self.subcommand == "fit" else None
        run_dirs = _pin_logger_versions(trainer_config.get("logger"), version=version, root=run_root(trainer_config))
        for run_dir in run_dirs:
            if not os.path.exists(run_dir):
                self._new_run_dirs.append(run_dir)
                self._new_parents.extend(_missing_parents(run_dir))
        _check_ckpt_path(config.get("ckpt_path"), run_dirs)

    def _plan_run(self, config: Any) -> int | None:
        """Auto-resume (see the class docstring): set ``ckpt_path`` and return the version directory to log into
        (``None``: a new one)."""
        trainer_config = config["trainer"]
        if _torchrun_restarts_share_the_store(os.environ):
            _say(
                "warning: torchrun restarts the workers with its rendezvous store shared, where a restarted group"
                " reads the keys of the one that died and may hang or fail to connect (pytorch/pytorch#135712):"
                ' launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README, "Pre-emption and restarts")'
            )
        _make_default_logger_explicit(trainer_config)
        if config.get("run_name"):
            _rename_run(trainer_config, str(config["run_name"]))
        root = run_root(trainer_config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None:
            path = str(ckpt_path)
            if not os.path.exists(path):
                return None  # a keyword (last, hpc, ...) for Lightning, or a missing file refused below
            info = self._explicit_ckpt or probe_checkpoint(path)  # a damaged file: one line, before anything is built
            self._resume_step = info.global_step
            _say(f"resuming from {_relative(path)} (--ckpt_path, step {info.global_step})")
            return self._version_of(path, root)
        if config.get("resume") == "never":
            return None
        plan = plan_resume(trainer_config, self._recipe_name(config), config.get("resume_mismatch", "error"))
        for message in plan.messages:
            _say(message)
        if plan.info is None:
            return None
        config["ckpt_path"] = plan.info.path
        self._resume_step = plan.info.global_step
        if plan.version is not None and root is not None:
            self._resumed_dir = os.path.join(root, f"version_{plan.version}")
        return plan.version

    def _version_of(self, path: str, root: str | None) -> int | None:
        """The version of ``root`` that holds checkpoint ``path`` (the run it continues), if any."""
        if root is None:
            return None
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.basename(folder) != "checkpoints":
            return None
        run_dir = os.path.dirname(folder)
        m = re.fullmatch(r"version_(\d+)", os.path.basename(run_dir))
        if m is None or os.path.dirname(run_dir) != os.path.abspath(root):
            return None
        self._resumed_dir = os.path.join(root, m.group(0))
        return int(m.group(1))

    def _recipe_name(self, config: Any) -> str | None:
        """The recipe: the stem of the first ``--config`` file (a built-in recipe's name, or the user's YAML)."""
        configs = config.get("config") or []
        if not configs:
            return None
        name = os.path.basename(str(getattr(configs[0], "relative", configs[0])))
        return os.path.splitext(name)[0]

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
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: ours, unless one is set
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        config = self.config["fit"]
        # Tag checkpoints with the recipe (the first --config's file stem): resuming another recipe's warns.
        if (recipe := self._recipe_name(config)) is not None:
            self.trainer.callbacks.append(RecipeTag(recipe))
        self.trainer.callbacks.append(ScheduleLengthCheck(config.get("resume_schedule", "checkpoint")))
        if not any(isinstance(c, GracefulStop) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(GracefulStop())
        if config.get("resume_mismatch") == "warn":  # one flag for every resume check that can refuse
            for owner in (self.datamodule, self.trainer.strategy):
                if hasattr(owner, "resume_mismatch"):
                    owner.resume_mismatch = "warn"
        if self._resumed_dir is not None and self._resume_step is not None:
            _continue_metrics(self.trainer, self._resumed_dir, self._resume_step)

    def _run_subcommand(self, subcommand: str) -> None:
        with warnings.catch_warnings():
            if self._resumed_dir is not None:  # ModelCheckpoint's "exists and is not empty": it is the run's own
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super()._run_subcommand(subcommand)

    def _subcommand_config(self) -> Any:
        sub = getattr(self, "subcommand", None) or (self.config.get("subcommand") if hasattr(self, "config") else None)
        return self.config[sub] if sub else self.config

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
        f"--ckpt_path {path!r} does not exist: {hint}, or leave --ckpt_path out (the run then continues from its"
        " newest checkpoint, or starts when it has none)"
    )


def _next_version(root: str) -> int:
    if not os.path.isdir(root):
        return 0
    found = [int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", d))]
    return max(found, default=-1) + 1


def _pin_logger_versions(loggers: Any, version: int | None = None, root: str | None = None) -> list[str]:
    """Give loggers with the same ``save_dir``/``name`` and no version one common next version (or ``version``
    for the loggers under ``root``: a resumed run); return the run directories of every logger with a
    ``save_dir`` (``save_dir/name/version_N``).

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
        if version is not None and root is not None and os.path.join(str(init_args["save_dir"]), name) == root:
            init_args["version"] = version
        if init_args.get("version") is not None:
            run_dirs.append(os.path.join(str(init_args["save_dir"]), name, _version_dir(init_args["version"])))
            continue
        groups.setdefault((str(init_args["save_dir"]), name), []).append(init_args)
    for (save_dir, name), members in groups.items():
        next_version = _next_version(os.path.join(save_dir, name))
        run_dirs.append(os.path.join(save_dir, name, f"version_{next_version}"))
        if len(members) > 1:
            for init_args in members:
                init_args["version"] = next_version
    return list(dict.fromkeys(run_dirs))


def _version_dir(version: Any) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def _torchrun_restarts_share_the_store(env: Any) -> bool:
    """Whether torchrun may restart this worker group on a rendezvous store shared across restarts."""
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        restarts = 0
    return restarts > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _say(message: str) -> None:
    """One line of the command to the user, from rank zero only (every rank runs the command)."""
    if rank_zero_only.rank == 0:
        print(f"lightning-gd: {message}", file=sys.stderr, flush=True)


def _relative(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _rename_run(trainer_config: Any, name: str) -> None:
    """``--run_name``: the ``name`` of every logger with a ``save_dir`` (the run directory ``save_dir/NAME``)."""
    loggers = trainer_config.get("logger")
    renamed = False
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args:
            init_args["name"] = name
            renamed = True
    if not renamed:
        raise ValueError(
            f"--run_name {name!r} names the loggers' run directory, but no logger with a save_dir is configured:"
            " add one (e.g. --trainer.logger CSVLogger --trainer.logger.save_dir runs), or leave --run_name out and"
            " give the ModelCheckpoint its own --trainer.callbacks.dirpath"
        )


def _make_default_logger_explicit(trainer_config: Any) -> None:
    """Lightning's default logger (``logger`` unset) as the config that builds it, so that its version can be pinned:
    TensorBoard (CSV without tensorboard) in ``default_root_dir/lightning_logs``."""
    from jsonargparse import Namespace
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

    if trainer_config.get("logger") not in (None, True):
        return
    kind = "TensorBoardLogger" if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE else "CSVLogger"
    save_dir = trainer_config.get("default_root_dir") or os.getcwd()
    trainer_config["logger"] = Namespace(
        class_path=f"lightning.pytorch.loggers.{kind}", init_args=Namespace(save_dir=str(save_dir))
    )


def _continue_metrics(trainer: Any, run_dir: str, step: int) -> None:
    """Keep the ``metrics.csv`` of a run resumed into its own directory, which Lightning's CSVLogger would delete.

    Rows up to the resumed step stay; those logged after it by the stopped process are dropped, since the resumed
    run logs them again. Rank zero only (the loggers write there).
    """
    from lightning.pytorch.loggers import CSVLogger

    from lightning_gd._compat import set_csv_header

    if rank_zero_only.rank != 0:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or os.path.abspath(logger.log_dir) != os.path.abspath(run_dir):
            continue
        path = os.path.join(logger.log_dir, "metrics.csv")
        rows, header = _read_rows(path, step)
        with warnings.catch_warnings():  # "Previous log files in this directory will be deleted": not here
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            experiment = logger.experiment  # creates the writer, which deletes metrics.csv
        if header:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)
            set_csv_header(experiment, header)


def _read_rows(path: str, step: int) -> tuple[list[dict[str, str]], list[str]]:
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if not row.get("step") or int(float(row["step"])) <= step]
        return rows, list(reader.fieldnames or [])
