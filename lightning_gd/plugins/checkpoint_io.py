"""Checkpoint files that are complete or absent: atomic writes, one-line load errors, a cheap look inside.

A kill during ``torch.save`` must never leave a half-written ``last.ckpt`` in place of the previous good one.
Lightning's own :class:`~lightning.fabric.plugins.io.TorchCheckpointIO` serialises the checkpoint into memory and
lets fsspec write it to a temporary file in the system's temporary directory, then *moves* it over the target:
when that directory is on another file system (a node-local ``/tmp`` against a shared checkpoint folder) the move
is a copy, which a kill interrupts half-way; the temporary file of a killed save is left behind in ``/tmp``; and
nothing is flushed to disk before the rename. :class:`AtomicCheckpointIO` streams the checkpoint into a hidden
temporary file next to the target (same directory, so the same file system), flushes it to disk, renames it over
the target in one step (``os.replace``) and flushes the directory entry; the previous checkpoint stays whole until
the rename, and leftovers of killed saves are removed by the next save of the same file.

Loading a file that is truncated or damaged raises :class:`CheckpointLoadError`, one line naming the file and the
reason, instead of torch's traceback. :func:`probe_checkpoint` reads a checkpoint's step, epoch and recipe without
loading its tensors (memory-mapped), which is how auto-resume (the ``lightning-gd`` command) finds the newest
checkpoint that loads.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

__all__ = ["AtomicCheckpointIO", "CheckpointInfo", "CheckpointLoadError", "is_temporary", "probe_checkpoint"]

_TMP_MARK = ".tmp-"  # hidden temporary files: ".<name>.tmp-<pid>"


class CheckpointLoadError(OSError):
    """A checkpoint that cannot be loaded: the message names the file and the reason in one line."""

    def __init__(self, path: _PATH, reason: str) -> None:
        super().__init__(f"checkpoint {os.fspath(path)} cannot be loaded: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def is_temporary(path: _PATH) -> bool:
    """Whether ``path`` is the temporary file of a save in progress (or of a save that was killed)."""
    name = os.path.basename(os.fspath(path))
    return name.startswith(".") and _TMP_MARK in name


def _temporary_path(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}{_TMP_MARK}{os.getpid()}")


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened (Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(err: BaseException) -> str:
    """One short line saying why a checkpoint did not load (torch's first sentence)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split(". ")[0].rstrip(".")
    text = text.removeprefix("PytorchStreamReader failed reading zip archive: ")
    if "central directory" in text or isinstance(err, (EOFError, zipfile.BadZipFile)):
        return f"the file is truncated or is not a checkpoint (torch: {text})"
    if isinstance(err, pickle.UnpicklingError) or "pickle" in text.lower() or "load key" in text:
        return f"its contents are damaged (torch: {text})"
    return f"{type(err).__name__}: {text}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save checkpoints atomically (temporary file next to the target, flushed, then renamed) and load them with
    one-line errors.

    Every file written through the strategy's ``checkpoint_io`` is covered: single device, DDP and the
    ``ddp_*`` / ``conadv`` strategies (the file rank zero writes), FSDP with ``state_dict_type="full"``. DeepSpeed
    and FSDP's sharded checkpoints are directories written by every rank through their own code, not through a
    ``CheckpointIO``; auto-resume checks such a directory for its completion marker before it resumes from it.
    Remote paths (``s3://``, ...) go to Lightning's own writer (an object store replaces an object in one step).

    The ``lightning-gd`` command uses it for every run; with your own Trainer pass it as a plugin.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or "file" not in _protocols(fs):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote, or the parent's TypeError
            return
        path = os.path.abspath(os.fspath(path))
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = _temporary_path(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(folder)
        for stale in glob.glob(glob.escape(os.path.join(folder, f".{os.path.basename(path)}{_TMP_MARK}")) + "*"):
            with contextlib.suppress(OSError):  # a killed save's leftover (a running save of another pid renames)
                if not _pid_alive(stale.rsplit(_TMP_MARK, 1)[1]):
                    os.remove(stale)

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception:
            # A file that torch cannot read at all is damaged; one that reads (a `weights_only` refusal, say) keeps
            # its own error. Raised inside the handler without `from`: the original stays visible as the context
            # of a traceback (--debug), and the command's one-line error finds this error as the root cause.
            if os.path.exists(os.fspath(path)):
                probe_checkpoint(path)  # raises CheckpointLoadError naming the damage
            raise


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return tuple(protocol) if isinstance(protocol, (tuple, list)) else (protocol,)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`probe_checkpoint` reads from a checkpoint without loading its tensors.

    Attributes:
        path: The checkpoint (a file, or a DeepSpeed / FSDP directory).
        global_step: Optimizer steps taken.
        epochs_completed: Training epochs completed.
        recipe: The recipe it was saved from (``RecipeTag``), ``None`` when untagged.
    """

    path: str
    global_step: int
    epochs_completed: int
    recipe: str | None


def _metadata_file(path: str) -> str:
    """The file of a checkpoint that holds its loop state: the file itself, or inside a checkpoint directory."""
    if not os.path.isdir(path):
        return path
    deepspeed = os.path.join(path, "checkpoint", "mp_rank_00_model_states.pt")
    if os.path.isfile(deepspeed):
        # DeepSpeed writes `latest` after every rank has saved its part: without it the directory is incomplete.
        if not os.path.isfile(os.path.join(path, "latest")):
            raise CheckpointLoadError(path, "the DeepSpeed checkpoint directory is incomplete (no `latest` file)")
        return deepspeed
    fsdp = os.path.join(path, "meta.pt")
    if os.path.isfile(fsdp):
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointLoadError(path, "the sharded checkpoint directory is incomplete (no `.metadata` file)")
        return fsdp
    raise CheckpointLoadError(path, "a directory that is neither a DeepSpeed nor an FSDP checkpoint")


def probe_checkpoint(path: _PATH) -> CheckpointInfo:
    """Read ``path``'s step, completed epochs and recipe, memory-mapping its tensors instead of reading them.

    A truncated file fails here (its zip directory is at the end), as it would when Lightning loads it.

    Raises:
        CheckpointLoadError: when the checkpoint cannot be loaded (naming the file and the reason).
        FileNotFoundError: when it does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    source = _metadata_file(path)
    try:
        try:
            checkpoint = torch.load(source, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(source, map_location="cpu", weights_only=False)  # the pre-zip format
    except Exception as err:  # noqa: BLE001
        raise CheckpointLoadError(path, _reason(err)) from None
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise CheckpointLoadError(path, "no training state in it (`global_step` missing): not a Lightning checkpoint")
    loops = checkpoint.get("loops") or {}
    try:
        epochs = int(loops["fit_loop"]["epoch_progress"]["current"]["completed"])
    except (KeyError, TypeError):
        epochs = int(checkpoint.get("epoch", 0))
    tag = (checkpoint.get("callbacks") or {}).get("RecipeTag") or {}
    recipe = tag.get("recipe") if isinstance(tag, dict) else None
    return CheckpointInfo(path, int(checkpoint["global_step"]), epochs, recipe)
