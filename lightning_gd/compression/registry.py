"""The compressors by name: class, default options and a one-line description, as data.

The Lightning strategy names (``ddp_<name>``), its ``compressor`` choices and argument checks, ``lightning-gd
compressors`` and the README table all read :data:`COMPRESSORS`. A new compressor is one module (a
:class:`~lightning_gd.compression.Compressor` subclass) plus one entry here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Literal

from lightning_gd.compression.base import Compressor
from lightning_gd.compression.hook import CompressionHookState
from lightning_gd.compression.hook_state import HookState
from lightning_gd.compression.powersgd import PowerSGDHookState
from lightning_gd.compression.qsgd import QSGD
from lightning_gd.compression.randomk import RandomK
from lightning_gd.compression.sign import Sign
from lightning_gd.compression.topk import TopK
from lightning_gd.utils.checks import check_choice

__all__ = ["COMPRESSORS", "CompressorEntry", "CompressorName", "make_hook_state"]


@dataclasses.dataclass(frozen=True)
class CompressorEntry:
    """One registered compressor.

    Attributes:
        cls: A :class:`~lightning_gd.compression.Compressor` subclass (run by
            :class:`~lightning_gd.compression.CompressionHookState` with error feedback), or a class
            implementing :class:`~lightning_gd.compression.HookState` itself (PowerSGD).
        options: The compressor's own options and their defaults (keyword arguments of ``cls``).
        description: One line, shown by ``lightning-gd compressors`` and in the strategy registry.
        hook_options: The hook options it accepts (``None``: all of
            :class:`~lightning_gd.compression.CompressionHookState`'s). Another hook option given at its default
            is left out; at any other value it is refused, naming the compressors it applies to.

    Example::

        >>> COMPRESSORS["topk"].options
        {'density': 0.01}
    """

    cls: type
    options: Mapping[str, Any]
    description: str
    hook_options: tuple[str, ...] | None = None


COMPRESSORS: dict[str, CompressorEntry] = {
    "topk": CompressorEntry(
        TopK, {"density": 0.01, "sampled": False}, "the k largest-magnitude entries (allgather), error feedback"
    ),
    "randomk": CompressorEntry(
        RandomK, {"density": 0.01, "seed": 0}, "k shared-seed random entries (allreduce), error feedback"
    ),
    "sign": CompressorEntry(Sign, {}, "scaled signs, 1 bit per entry (EF-signSGD), error feedback"),
    "qsgd": CompressorEntry(QSGD, {"levels": 16, "seed": 0}, "QSGD stochastic quantization, unbiased, no memory"),
    "powersgd": CompressorEntry(
        PowerSGDHookState,
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
    shared = inspect.signature(CompressionHookState).parameters
    out = {}
    for key, value in hook_options.items():
        if key in accepted or key not in shared:  # ours, or unknown (refused by the hook's signature)
            out[key] = value
        elif value is not None and value != shared[key].default:
            users = [n for n, e in COMPRESSORS.items() if e.hook_options is None or key in e.hook_options]
            raise ValueError(f"{key}={value!r} is not supported by {name!r}: it applies to {', '.join(users)}")
    return out
