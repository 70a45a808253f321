"""Every touch of a third-party library's private state, in one place, each failing loudly when upstream moves.

lightning-gd reads a few private names of Lightning, torch, torchdata and litdata where no public API gives
what it needs. Each such touch lives here, behind a function that checks the name still exists and otherwise
raises :class:`UpstreamChanged` naming the library, the private name and what depends on it: a renamed
attribute stops the run with that message instead of silently doing the wrong thing (training as dense DDP,
resuming at the wrong batch). ``tests/test_compat.py`` runs every function against the installed versions, so
an upgrade that renames one fails a test first. The touches:

- Lightning ``DDPStrategy``: ``_ddp_kwargs`` (:func:`ddp_kwargs`), ``_ddp_comm_state`` (:func:`ddp_comm_state`),
  ``_model_averager`` (:func:`model_averager`), ``_layer_sync`` (:func:`layer_sync`); and the override of
  ``_register_ddp_hooks`` in :class:`~lightning_gd.strategies.CompressedDDPStrategy` (:data:`DDP_HOOK_METHOD`;
  the strategy checks at setup that Lightning called it);
- torch's PowerSGD hook: ``_should_compress`` (:func:`powersgd_should_compress`);
- torchdata ``StatefulDataLoader`` state: ``_sampler_iter_state`` (:func:`torchdata_samples_read`, only for
  checkpoints written before the data modules kept their position in a sampler of their own);
- litdata ``StreamingDataLoader`` state: ``current_epoch`` (:func:`litdata_loader_epoch`);
- Lightning's CSVLogger writer (the private ``_ExperimentWriter``): ``metrics_keys`` (:func:`set_csv_header`, so
  that a resumed run appends to the ``metrics.csv`` it kept);
- Lightning's ``Trainer._logger_connector.update_train_step_metrics`` (:func:`log_step_metrics`: a run stopped by
  Ctrl-C inside ``on_train_batch_end`` still logs that step's values, as Lightning does right after the hook).

This module imports neither Lightning nor torchdata nor litdata at import time (the compression layer uses it).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DDP_HOOK_METHOD",
    "UpstreamChanged",
    "ddp_comm_state",
    "ddp_kwargs",
    "layer_sync",
    "litdata_loader_epoch",
    "log_step_metrics",
    "model_averager",
    "powersgd_should_compress",
    "private_attr",
    "set_csv_header",
    "torchdata_samples_read",
]

#: The ``DDPStrategy`` method that wraps the model's comm hooks; ``CompressedDDPStrategy`` overrides it.
DDP_HOOK_METHOD = "_register_ddp_hooks"


class UpstreamChanged(RuntimeError):
    """A private name lightning-gd relies on is missing from the installed version of a library."""


def _changed(library: str, name: str, purpose: str) -> UpstreamChanged:
    return UpstreamChanged(
        f"lightning-gd relies on {library}'s private `{name}` ({purpose}), which the installed version does not"
        " have (was it renamed in an upgrade?). Pin the previous version or report this at lightning-gd."
    )


def private_attr(obj: Any, name: str, library: str, purpose: str) -> Any:
    """``getattr(obj, name)``, raising :class:`UpstreamChanged` when ``obj`` has no such attribute."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _changed(library, name, purpose) from None


def _key(state: Any, path: tuple[str, ...], library: str, purpose: str) -> Any:
    """``state[path[0]][path[1]]...``, raising :class:`UpstreamChanged` when a key is missing."""
    for key in path:
        if not isinstance(state, dict) or key not in state:
            raise _changed(library, "".join(f"[{k!r}]" for k in path), purpose)
        state = state[key]
    return state


def litdata_loader_epoch(state: dict[str, Any]) -> int:
    """The epoch of a litdata ``StreamingDataLoader.state_dict()`` (``current_epoch``)."""
    return int(_key(state, ("current_epoch",), "litdata StreamingDataLoader state", "the epoch of a saved stream"))


def torchdata_samples_read(state: dict[str, Any]) -> int:
    """Samples a torchdata ``StatefulDataLoader`` had read, from a state saved with a sampler that keeps no state.

    Only for checkpoints written before :class:`~lightning_gd.recipes.resumable.ResumableDataModule`'s sampler
    kept the position itself (``_sampler_iter_state.samples_yielded``, in the main snapshot with workers).
    """
    purpose = "the data position of a checkpoint written before lightning-gd's position sampler"
    path = ("_sampler_iter_state", "samples_yielded")
    if "_snapshot" in state:  # with worker processes: the main process's snapshot
        path = ("_snapshot", "_main_snapshot", *path)
    return int(_key(state, path, "torchdata StatefulDataLoader state", purpose))


# ---------------------------------------------------------------------- Lightning's DDPStrategy
_DDP = "Lightning's DDPStrategy"


def _ddp_private(strategy: Any, name: str, purpose: str) -> Any:
    """``strategy.<name>`` for a ``DDPStrategy`` (checked), ``None`` for any other strategy."""
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, DDPStrategy):
        return None
    return private_attr(strategy, name, _DDP, purpose)


def ddp_kwargs(strategy: Any) -> dict[str, Any]:
    """The ``DistributedDataParallel`` keyword arguments a ``DDPStrategy`` will use (a live dict: edits apply)."""
    return private_attr(strategy, "_ddp_kwargs", _DDP, "the DistributedDataParallel arguments, e.g. bucket_cap_mb")


def ddp_comm_state(strategy: Any) -> Any:
    """The comm-hook state given to a ``DDPStrategy`` (e.g. ``PostLocalSGDState``); ``None`` otherwise."""
    return _ddp_private(strategy, "_ddp_comm_state", "the start of local SGD (start_localSGD_iter)")


def model_averager(strategy: Any) -> Any:
    """The periodic model averager of a post-local-SGD ``DDPStrategy``; ``None`` otherwise."""
    return _ddp_private(strategy, "_model_averager", "whether the replicas are averaged (local SGD)")


def layer_sync(strategy: Any) -> Any:
    """The ``LayerSync`` plugin (``sync_batchnorm=True``) of a ``DDPStrategy``; ``None`` otherwise."""
    return _ddp_private(strategy, "_layer_sync", "whether sync_batchnorm converts the BatchNorm layers")


def set_csv_header(experiment: Any, keys: list[str]) -> None:
    """Tell a CSVLogger's writer (``logger.experiment``) that ``metrics.csv`` already has the columns ``keys``."""
    private_attr(experiment, "metrics_keys", "Lightning's CSVLogger writer", "the columns of an existing metrics.csv")
    experiment.metrics_keys = list(keys)


def log_step_metrics(trainer: Any) -> None:
    """Send this training step's logged values to the loggers now (Lightning does it right after
    ``on_train_batch_end``, which a run stopping inside that hook never reaches)."""
    connector = private_attr(trainer, "_logger_connector", "Lightning's Trainer", "the step's logged metrics")
    update = private_attr(connector, "update_train_step_metrics", "Lightning's logger connector", "logging a step")
    update()


# ---------------------------------------------------------------------- torch's PowerSGD hook
def powersgd_should_compress(rows: int, cols: int, rank: int, min_compression_rate: float) -> bool:
    """torch's PowerSGD test of whether an ``rows x cols`` matrix is compressed at ``rank`` (``_should_compress``).

    Our memory re-mapping must pick exactly the matrices torch's hook compresses, so it asks torch's own test.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    test = private_attr(powerSGD_hook, "_should_compress", "torch's PowerSGD hook", "which matrices it compresses")
    return bool(test(rows, cols, rank, min_compression_rate)[0])
