"""Per-bucket memories that stay attached to their parameters when DDP regroups its buckets.

DDP groups the gradients into buckets in one order when it wraps the model, rebuilds the buckets after the
first iteration (another grouping and order), and a restarted job starts again from the first order. A memory
kept per bucket (an error-feedback residual, DGC's velocity, PowerSGD's Q) is a concatenation of
per-parameter pieces, so on every layout change :class:`BucketLayouts` cuts it into those pieces and
re-assembles them for the new layout: no piece is lost or applied to another parameter.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

__all__ = ["BucketLayouts"]

Layout = tuple[tuple[Hashable, tuple[int, ...]], ...]  # (parameter identity, shape) in bucket order
Segments = Callable[[str, Layout], list[tuple[Hashable, int]]]


def _whole_parameters(kind: str, layout: Layout) -> list[tuple[Hashable, int]]:
    """Default: a memory of any kind holds every parameter's entries, in bucket order."""
    return [(ident, math.prod(shape)) for ident, shape in layout]


class BucketLayouts:
    """The parameter layout of every DDP bucket, and the memory pieces waiting for a bucket.

    Parameters are identified by name (or by ``data_ptr`` when no module names them); a memory of kind
    ``kind`` is split by ``segments(kind, layout)``, a list of ``(identity, size)`` stretches.

    Args:
        segments: Which parameter each stretch of a flat memory of ``kind`` belongs to. Default: every
            parameter whole, in bucket order (error feedback, DGC). PowerSGD's Q memory covers only the
            matrices it compresses, each ``m * rank`` long.

    Example::

        >>> layouts, store = BucketLayouts(), {0: {"error": torch.tensor([1.0, 2.0, 3.0])}}
        >>> layouts.update(0, (("a", (2,)), ("b", (1,))), store.pop)  # first layout: nothing to move
        True
        >>> store[0] = {"error": torch.tensor([1.0, 2.0, 3.0])}
        >>> layouts.update(0, (("b", (1,)), ("a", (2,))), store.pop)  # DDP reversed the bucket
        True
        >>> layouts.assemble(0, ["error"], torch.zeros(3))
        {'error': tensor([3., 1., 2.])}
    """

    def __init__(self, segments: Segments = _whole_parameters) -> None:
        self.segments = segments
        #: Recorded layout of each bucket index.
        self.layouts: dict[int, Layout] = {}
        #: Memory pieces waiting for a bucket: ``{identity: {kind: flat tensor}}``.
        self.pieces: dict[Hashable, dict[str, torch.Tensor]] = {}
        #: Whole-bucket memories loaded without parameter names: ``{bucket: (shapes, {kind: flat})}``.
        self.saved: dict[int, tuple[list[list[int]], dict[str, torch.Tensor]]] = {}

    def update(self, key: int, layout: Layout, take: Callable[[int], dict[str, torch.Tensor] | None]) -> bool:
        """Record bucket ``key``'s layout; return ``True`` when it is new (then call :meth:`assemble`).

        On a change, every recorded bucket that shares a parameter with the new layout (and ``key`` itself)
        hands its memories over through ``take(bucket)``, which must remove them from the caller's store;
        they wait as per-parameter pieces.
        """
        if self.layouts.get(key) == layout:
            return False
        idents = {ident for ident, _ in layout}
        for other in [k for k, lay in self.layouts.items() if k == key or any(i in idents for i, _ in lay)]:
            self._cut(self.layouts.pop(other), take(other) or {})
        self.layouts[key] = layout
        return True

    def assemble(
        self, key: int, kinds: Iterable[str], like: torch.Tensor, complete: Iterable[str] = ()
    ) -> dict[str, torch.Tensor]:
        """Build bucket ``key``'s memories from the waiting pieces (which are consumed).

        Args:
            key: The bucket, whose layout :meth:`update` recorded.
            kinds: Memory kinds to build. A missing piece is zeros; a kind without any piece is left out.
            like: The memories take its device and dtype.
            complete: Kinds left out unless every piece is there (zeros would be a wrong state).

        Returns:
            ``{kind: flat tensor}``.
        """
        layout = self.layouts[key]
        saved = self.saved.pop(key, None)
        if saved is not None:
            if [list(s) for _, s in layout] == [list(s) for s in saved[0]]:
                return {k: t.to(like.device, like.dtype) for k, t in saved[1].items()}
            warnings.warn(
                f"saved memory of bucket {key} does not match its current parameter shapes (bucket layout "
                "changed; bind a module to resume by parameter name): dropped",
                stacklevel=2,
            )
        out: dict[str, torch.Tensor] = {}
        for kind in kinds:
            segs = self.segments(kind, layout)
            parts = [self.pieces.get(ident, {}).get(kind) for ident, _ in segs]
            if all(p is None for p in parts) or (kind in complete and any(p is None for p in parts)):
                continue
            out[kind] = torch.cat(
                [
                    p.reshape(-1).to(like.device, like.dtype) if p is not None and p.numel() == n else like.new_zeros(n)
                    for p, (_, n) in zip(parts, segs, strict=True)
                ]
            )
        for ident, _ in layout:
            self.pieces.pop(ident, None)
        return out

    def state_dict(self, memory_of: Callable[[int], dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Every memory as plain data: ``{bucket: {"params", "shapes", "tensors"}}`` (CPU copies).

        ``params`` holds the parameter names (``None`` when a parameter has no name); a piece not yet claimed
        by a bucket is saved under ``"param:<name>"``.
        """
        blocks: dict[str, Any] = {}
        for key, layout in self.layouts.items():
            if mem := memory_of(key):
                names = [i if isinstance(i, str) else None for i, _ in layout]
                blocks[str(key)] = {
                    "params": None if None in names else names,
                    "shapes": [list(s) for _, s in layout],
                    "tensors": {k: t.detach().reshape(-1).cpu().clone() for k, t in mem.items()},
                }
        for key, (shapes, tensors) in self.saved.items():
            blocks.setdefault(str(key), {"params": None, "shapes": shapes, "tensors": tensors})
        for ident, pieces in self.pieces.items():
            if isinstance(ident, str):
                blocks[f"param:{ident}"] = {"params": [ident], "tensors": {k: t.cpu() for k, t in pieces.items()}}
        return blocks

    def load_state_dict(self, blocks: dict[str, Any]) -> None:
        """Replace everything by :meth:`state_dict`'s blocks: named ones wait as pieces, others per bucket."""
        self.layouts.clear()
        self.pieces.clear()
        self.saved.clear()
        for key, block in blocks.items():
            names = block.get("params")
            if str(key).startswith("param:"):
                self.pieces.setdefault(names[0], {}).update(block["tensors"])
            elif names is not None:
                self._cut(tuple(zip(names, map(tuple, block["shapes"]), strict=True)), block["tensors"])
            else:
                self.saved[int(key)] = (block["shapes"], block["tensors"])

    def _cut(self, layout: Layout, memories: dict[str, torch.Tensor]) -> None:
        for kind, flat in memories.items():
            segs = self.segments(kind, layout)
            for (ident, _), piece in zip(segs, flat.reshape(-1).split([n for _, n in segs]), strict=True):
                self.pieces.setdefault(ident, {})[kind] = piece
