"""Abstract gradient compressor and the compressed-tensor container.

The interface follows the GRACE framework (Xu et al. 2021, "GRACE: A Compressed Communication
Framework for Distributed Machine Learning"): a compressor maps a tensor to a *payload* (the tensors
that actually travel over the wire) plus local *context* (metadata that every rank can rebuild
without communication, e.g. shared random indices), and back.

All compressors are pure torch and deterministic given their plain-data state, so that a
communication hook can checkpoint and resume them bit-exactly.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["CompressedTensor", "Compressor"]


@dataclasses.dataclass(frozen=True)
class CompressedTensor:
    """A compressed tensor: wire payload plus local, never-communicated context.

    Attributes:
        payload: Tensors sent over the wire, in a fixed order. Their total byte size is exactly
            :meth:`Compressor.payload_bytes` of the original ``numel``/``dtype``.
        shape: Shape of the original (uncompressed) tensor.
        dtype: Dtype of the original tensor; :meth:`Compressor.decompress` returns this dtype.
        ctx: Local context that is *not* sent (e.g. random-k indices every rank regenerates from a
            shared seed). Empty for most compressors.

    Example::

        >>> from lightning_gd.compression import TopK
        >>> c = TopK(0.5).compress(torch.tensor([1.0, -3.0, 0.5, 2.0]))
        >>> [t.dtype for t in c.payload]
        [torch.float32, torch.int32]
    """

    payload: tuple[torch.Tensor, ...]
    shape: torch.Size
    dtype: torch.dtype
    ctx: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Actual byte size of the payload tensors (what goes over the wire)."""
        return sum(t.numel() * t.element_size() for t in self.payload)

    def with_payload(self, payload: Sequence[torch.Tensor]) -> CompressedTensor:
        """Return a copy carrying another rank's payload (same shape, dtype and context)."""
        return dataclasses.replace(self, payload=tuple(payload))


class Compressor(abc.ABC):
    """Base class of all gradient compressors.

    Subclasses implement :meth:`compress`, :meth:`decompress` and :meth:`payload_bytes`. The base
    class keeps a per-key call counter (``key`` is a bucket index or a parameter name) that
    randomised compressors mix into their seeds, so ``(seed, step, key)`` determines the random
    draw and the state is plain data.

    Attributes:
        shared_indices: ``True`` when every rank uses the same support for the same
            ``(step, key)``, so payloads can be summed with ``allreduce``; otherwise the payloads
            must be all-gathered and decompressed one by one.
        sparse: ``True`` when the compressor sends a subset of coordinates exactly (top-k,
            random-k); :meth:`sent_mask` then returns the support. Required for DGC momentum
            correction.
        contractive: ``True`` when ``||x - D(C(x))|| < ||x||`` always holds, which error feedback needs to
            converge; a hook turns the memory on by default only for contractive compressors.
        salt: Integer mixed into the seeds of *private* randomness (QSGD rounding) so that ranks
            draw independent noise. A communication hook sets it to the rank. Never used for
            shared randomness.

    Example::

        >>> from lightning_gd.compression import TopK
        >>> comp = TopK(0.01)
        >>> c = comp.compress(torch.randn(1000), key=0)
        >>> comp.decompress(c).count_nonzero().item()
        10
    """

    shared_indices: bool = False
    sparse: bool = False
    contractive: bool = True

    def __init__(self) -> None:
        self.salt: int = 0
        # step_key: number of compress() calls made for ``key`` so far (keys stored as str).
        self._counters: dict[str, int] = {}

    # ------------------------------------------------------------------ abstract API
    @abc.abstractmethod
    def compress(self, tensor: torch.Tensor, key: int | str = 0) -> CompressedTensor:
        """Compress ``tensor`` (any shape); advances the call counter of ``key``.

        Args:
            tensor: Tensor to compress (not modified).
            key: Identifier of the tensor stream (bucket index or parameter name).

        Returns:
            The compressed tensor.
        """

    @abc.abstractmethod
    def decompress(self, compressed: CompressedTensor) -> torch.Tensor:
        """Rebuild a dense tensor of the original shape and dtype from ``compressed``."""

    @abc.abstractmethod
    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Exact number of bytes of the wire payload for a tensor of ``numel`` elements."""

    # ------------------------------------------------------------------ overridable helpers
    def decompress_sum(self, compressed: Sequence[CompressedTensor]) -> torch.Tensor:
        """Sum of the decompressions of several payloads (e.g. one per rank).

        Subclasses override this when a fused implementation is cheaper (top-k scatter-add).

        Args:
            compressed: Compressed tensors of identical shape and dtype.

        Returns:
            Dense sum, in the original shape and dtype.
        """
        out = self.decompress(compressed[0]).clone()
        for c in compressed[1:]:
            out.add_(self.decompress(c))
        return out

    def sent_numel(self, numel: int) -> int:
        """Number of coordinates represented in the payload (``k`` for sparsifiers)."""
        return numel

    def sent_mask(self, compressed: CompressedTensor) -> torch.Tensor | None:
        """Boolean mask (flat) of the coordinates sent exactly; ``None`` for dense compressors."""
        return None

    # ------------------------------------------------------------------ state
    def step_of(self, key: int | str) -> int:
        """Number of times ``key`` has been compressed so far (the next call's step)."""
        return self._counters.get(str(key), 0)

    def _next_step(self, key: int | str) -> int:
        """Return the step of this call for ``key`` and advance its counter."""
        k = str(key)
        step = self._counters.get(k, 0)
        self._counters[k] = step + 1
        return step

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (per-key call counters and subclass extras).

        Example::

            >>> from lightning_gd.compression import RandomK
            >>> comp = RandomK(0.1, seed=3)
            >>> _ = comp.compress(torch.randn(100), key=0)
            >>> comp.state_dict()["counters"]
            {'0': 1}
        """
        return {"counters": dict(self._counters)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state produced by :meth:`state_dict`."""
        self._counters = {str(k): int(v) for k, v in state_dict.get("counters", {}).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._extra_repr()})"

    def _extra_repr(self) -> str:
        return ""


class _SeededCompressor(Compressor):
    """A compressor whose random draws derive from ``seed``, which is saved with its state."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.seed = int(state_dict.get("seed", self.seed))


# ---------------------------------------------------------------------- shared private helpers
def _k_for(numel: int, density: float) -> int:
    """Number of kept coordinates: ``round(density * numel)`` clipped to ``[1, numel]``."""
    if numel <= 0:
        return 0
    # round() (not ceil) so that 0.1 * 100 == 10.000000000000002 gives 10.
    return min(numel, max(1, int(density * numel + 0.5)))


def _index_mask(numel: int, indices: torch.Tensor) -> torch.Tensor:
    """Flat boolean mask of length ``numel``, ``True`` at ``indices`` (what a sparse payload sent)."""
    mask = torch.zeros(numel, dtype=torch.bool, device=indices.device)
    mask[indices.long()] = True
    return mask


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat bool tensor into ``ceil(n / 8)`` uint8 bytes (MSB first)."""
    n = bits.numel()
    pad = (-n) % 8
    b = bits.reshape(-1).to(torch.uint8)
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    # Each row has at most one of each weight, so the sum fits in a byte.
    return (b.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: first ``n`` bits as a flat bool tensor."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return (packed.reshape(-1, 1).bitwise_and(weights) != 0).reshape(-1)[:n]
