"""Where a run keeps its checkpoints, and which one a relaunch of the same command resumes from.

Used by :class:`~lightning_gd._lightning_cli.LightningGDCLI` before anything is built. A run is one version
directory of its loggers, ``<save_dir>/<name>/version_N`` (``runs/quickstart/version_0``; ``--run_name`` sets the
name); its checkpoints are the ``*.ckpt`` under ``version_*/checkpoints`` (the ``ModelCheckpoint`` default), in a
``ModelCheckpoint``'s own ``dirpath``, or in ``<default_root_dir>/checkpoints`` when there is no logger. A relaunch
resumes from the newest of them that loads, into the same version directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from lightning_gd.plugins.checkpoint_io import CheckpointInfo, CheckpointLoadError, is_temporary, probe_checkpoint

__all__ = ["Candidate", "ResumePlan", "RunComplete", "checkpoint_candidates", "plan_resume", "run_root"]

_VERSION = re.compile(r"version_(\d+)")


class RunComplete(Exception):
    """The run to resume has already reached its ``max_steps`` / ``max_epochs``: nothing to train."""


@dataclass(frozen=True)
class Candidate:
    """A checkpoint of the run and the version directory it belongs to (``None``: a fixed directory)."""

    path: str
    version: int | None


@dataclass
class ResumePlan:
    """What the command does: resume ``info`` (into ``version``) or start a new run; what it says."""

    info: CheckpointInfo | None = None
    version: int | None = None
    messages: list[str] = field(default_factory=list)


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


def _loggers(trainer_config: Any) -> list[Any]:
    loggers = _get(trainer_config, "logger")
    if isinstance(loggers, bool) or loggers is None:
        return []
    return list(loggers) if isinstance(loggers, list) else [loggers]


def run_root(trainer_config: Any) -> str | None:
    """``<save_dir>/<name>`` of the first logger (whose version directory ``ModelCheckpoint`` writes into by
    default); ``None`` when the first logger has no ``save_dir`` or there is no logger."""
    loggers = _loggers(trainer_config)
    if not loggers:
        return None
    init_args = _get(loggers[0], "init_args", {})
    if "save_dir" not in init_args or init_args["save_dir"] is None:
        return None
    return os.path.join(str(init_args["save_dir"]), str(init_args.get("name") or "lightning_logs"))


def _fixed_dirs(trainer_config: Any) -> list[str]:
    """Checkpoint directories that do not depend on the logger's version."""
    dirs = []
    for callback in _get(trainer_config, "callbacks", []) or []:
        dirpath = _get(_get(callback, "init_args", {}), "dirpath")
        if dirpath and str(_get(callback, "class_path", "")).endswith("ModelCheckpoint"):
            dirs.append(str(dirpath))
    if _get(trainer_config, "logger") is False:
        dirs.append(os.path.join(str(_get(trainer_config, "default_root_dir", os.getcwd())), "checkpoints"))
    return list(dict.fromkeys(dirs))


def _checkpoints_in(folder: str) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if n.endswith(".ckpt") and not is_temporary(n)]


def checkpoint_candidates(trainer_config: Any) -> list[Candidate]:
    """Every checkpoint of the run, newest first (by modification time)."""
    found: dict[str, Candidate] = {}
    root = run_root(trainer_config)
    if root is not None and os.path.isdir(root):
        for entry in os.listdir(root):
            if m := _VERSION.fullmatch(entry):
                for path in _checkpoints_in(os.path.join(root, entry, "checkpoints")):
                    found[os.path.abspath(path)] = Candidate(path, int(m.group(1)))
    for folder in _fixed_dirs(trainer_config):
        for path in _checkpoints_in(folder):
            found.setdefault(os.path.abspath(path), Candidate(path, None))

    def mtime(c: Candidate) -> float:
        try:
            return os.path.getmtime(c.path)
        except OSError:
            return float("-inf")

    return sorted(found.values(), key=mtime, reverse=True)


def _limits(trainer_config: Any) -> tuple[int, int]:
    """``(max_steps, max_epochs)`` as the Trainer reads them (-1: no limit)."""
    max_steps = int(_get(trainer_config, "max_steps", -1))
    max_epochs = _get(trainer_config, "max_epochs")
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 else -1  # Lightning's defaults
    return max_steps, int(max_epochs)


def _describe(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def plan_resume(
    trainer_config: Any, recipe: str | None, resume_mismatch: str = "error", run_name_hint: str = "NAME"
) -> ResumePlan:
    """The newest checkpoint of the run that loads, or a new run when there is none.

    Damaged checkpoints are skipped with one message each. Raises :class:`RunComplete` when that checkpoint has
    reached the run's ``max_steps`` or ``max_epochs``, ``ValueError`` when it belongs to another recipe (unless
    ``resume_mismatch="warn"``) or when the run has checkpoints and none of them loads.
    """
    plan = ResumePlan()
    candidates = checkpoint_candidates(trainer_config)
    damaged: list[str] = []
    for candidate in candidates:
        try:
            info = probe_checkpoint(candidate.path)
        except (CheckpointLoadError, FileNotFoundError) as err:
            damaged.append(f"{_describe(candidate.path)} ({getattr(err, 'reason', err)})")
            plan.messages.append(f"skipping {_describe(candidate.path)}: {getattr(err, 'reason', err)}")
            continue
        plan.info, plan.version = info, candidate.version
        break
    where = _describe(run_root(trainer_config) or (_fixed_dirs(trainer_config) or ["."])[0])
    if plan.info is None:
        if damaged:
            raise ValueError(
                f"no checkpoint of {where} loads ({len(damaged)} damaged; the newest: {damaged[0]}): pass --resume"
                f" never to start a new run, or --ckpt_path PATH to resume from another checkpoint"
            )
        return plan
    info = plan.info
    if recipe is not None and info.recipe is not None and info.recipe != recipe:
        message = (
            f"{where} holds checkpoints of recipe {info.recipe!r}, not of this run's recipe {recipe!r}"
            f" ({_describe(info.path)})"
        )
        if resume_mismatch != "warn":
            raise ValueError(
                f"{message}: pass --run_name {run_name_hint} to start this recipe's own run, --resume never to start"
                " a new run here, or --resume_mismatch warn to resume it anyway"
            )
        plan.messages.append(f"warning: {message}; resuming it anyway (--resume_mismatch warn)")
    max_steps, max_epochs = _limits(trainer_config)
    done_steps = max_steps != -1 and info.global_step >= max_steps
    done_epochs = max_epochs != -1 and info.epochs_completed >= max_epochs
    if done_steps or done_epochs:
        limit = f"max_steps {max_steps}" if done_steps else f"max_epochs {max_epochs}"
        raise RunComplete(
            f"{where} is complete: {_describe(info.path)} is at step {info.global_step}"
            f" ({info.epochs_completed} epochs), the run's {limit}; nothing to train. Raise --trainer."
            f"{limit.split()[0]} to train on, or start a new run with --resume never (or --run_name {run_name_hint})"
        )
    of = f" of {max_steps}" if max_steps != -1 else ""
    plan.messages.append(
        f"resuming from {_describe(info.path)} (step {info.global_step}{of}); --resume never starts a new run instead"
    )
    return plan
