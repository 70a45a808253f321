"""The compressors by name: class, default options and a one-line description, as data.

The Lightning strategy names (``ddp_<name>``), its ``compressor`` choices and argument checks, ``lightning-gd
compressors`` and the table of the compressed-DDP guide (``docs/guides/compressed-ddp.md``) all read
:data:`COMPRESSORS`. A new compressor is one module (a :class:`~lightning_gd.compression.Compressor` subclass) plus
one entry here.

The entries name their classes by import path, so that the registry is readable without importing torch
(``lightning-gd compressors`` answers at once); :attr:`CompressorEntry.cls` imports the class.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from lightning_gd.utils.checks import check_choice

if TYPE_CHECKING:
    from lightning_gd.compression.hook_state import HookState

__all__ = ["COMPRESSORS", "CompressorEntry", "CompressorName", "make_hook_state"]


@dataclasses.dataclass(frozen=True)
class CompressorEntry:
    """One registered compressor.

    Attributes:
        class_path: Import path of a :class:`~lightning_gd.compression.Compressor` subclass (run by
            :class:`~lightning_gd.compression.CompressionHookState` with error feedback), or of a class
            implementing :class:`~lightning_gd.compression.HookState` itself (PowerSGD); :attr:`cls` imports it.
        options: The compressor's own options and their defaults (keyword arguments of ``cls``).
        description: One line, shown by ``lightning-gd compressors`` and in the strategy registry.
        hook_options: The hook options it accepts (``None``: all of
            :class:`~lightning_gd.compression.CompressionHookState`'s). Another hook option given at its default
            is left out; at any other value it is refused, naming the compressors it applies to.

    Example::

        >>> from lightning_gd.compression import COMPRESSORS
        >>> COMPRESSORS["topk"].options
        {'density': 0.01, 'sampled': False}
    """

    class_path: str
    options: Mapping[str, Any]
    description: str
    hook_options: tuple[str, ...] | None = None

    @property
    def cls(self) -> type:
        """The class (imported on first use)."""
        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)


_PACKAGE = "lightning_gd.compression"

COMPRESSORS: dict[str, CompressorEntry] = {
    "topk": CompressorEntry(
        f"{_PACKAGE}.topk.TopK",
        {"density": 0.01, "sampled": False},
        "the k largest-magnitude entries (allgather), error feedback",
    ),
    "randomk": CompressorEntry(
        f"{_PACKAGE}.randomk.RandomK",
        {"density": 0.01, "seed": 0},
        "k shared-seed random entries (allreduce), error feedback",
    ),
    "sign": CompressorEntry(f"{_PACKAGE}.sign.Sign", {}, "scaled signs, 1 bit per entry (EF-signSGD), error feedback"),
    "qsgd": CompressorEntry(
        f"{_PACKAGE}.qsgd.QSGD", {"levels": 16, "seed": 0}, "QSGD stochastic quantization, unbiased, no memory"
    ),
    "powersgd": CompressorEntry(
        f"{_PACKAGE}.powersgd.PowerSGDHookState",
        {"powersgd_rank": 1, "seed": 0},
        "PowerSGD low-rank (torch's hook), its own memory",
        hook_options=("error_feedback", "warmup_steps", "warmup_dtype", "min_compression_rate", "process_group"),
    ),
}

#: The registered names, as a type: LightningCLI rejects any other value while parsing.
CompressorName = Literal[tuple(COMPRESSORS)]  # type: ignore[valid-type]


def make_hook_state(name: str, **options: Any) -> HookState:
    """Build the hook state of compressor ``name``.

    Args:
        name: A key of :data:`COMPRESSORS`.
        **options: The compressor's own options (``None``: the registry default; an option of another
            compressor raises) and the hook options of
            :class:`~lightning_gd.compression.CompressionHookState` (``error_feedback``, ``momentum_correction``,
            ``warmup_steps``, ``density_warmup_steps``, ``min_numel``; ``error_feedback`` defaults to ``None``:
            on for contractive compressors).

    Raises:
        ValueError: for an unknown name (listing the registered ones), an unknown option, or a bad option (naming
            it and its value).

    Example::

        >>> make_hook_state("topk", density=0.001, warmup_steps=100).density_at(100)
        0.001
    """
    from lightning_gd.compression.base import Compressor
    from lightning_gd.compression.hook import CompressionHookState

    entry = COMPRESSORS[check_choice("compressor", name, COMPRESSORS)]
    own_names = {k for e in COMPRESSORS.values() for k in e.options}
    hook_options = {"error_feedback": None, **{k: v for k, v in options.items() if k not in own_names}}
    for key, value in options.items():
        if key in own_names and value is not None and key not in entry.options:
            users = [n for n, e in COMPRESSORS.items() if key in e.options]
            raise ValueError(f"{key}={value!r} applies to {', '.join(users)}, not to {name!r}")
    own = {k: options[k] if options.get(k) is not None else default for k, default in entry.options.items()}
    hook_cls = CompressionHookState if issubclass(entry.cls, Compressor) else entry.cls  # PowerSGD: its own
    if entry.hook_options is not None:
        hook_options = _accepted(name, entry.hook_options, hook_options)
    if unknown := sorted(set(hook_options) - set(inspect.signature(hook_cls).parameters)):
        raise ValueError(f"unknown option {unknown[0]}={hook_options[unknown[0]]!r} for {name!r}")
    if hook_cls is CompressionHookState:
        return CompressionHookState(entry.cls(**own), **hook_options)
    return hook_cls(**own, **hook_options)


def _accepted(name: str, accepted: tuple[str, ...], hook_options: dict[str, Any]) -> dict[str, Any]:
    """``hook_options`` that compressor ``name`` accepts; another hook option must be at its default."""
    from lightning_gd.compression.hook import CompressionHookState

    shared = inspect.signature(CompressionHookState).parameters
    out = {}
    for key, value in hook_options.items():
        if key in accepted or key not in shared:  # ours, or unknown (refused by the hook's signature)
            out[key] = value
        elif value is not None and value != shared[key].default:
            users = [n for n, e in COMPRESSORS.items() if e.hook_options is None or key in e.hook_options]
            raise ValueError(f"{key}={value!r} is not supported by {name!r}: it applies to {', '.join(users)}")
    return out
