"""Top-k sparsification.

Keeps the ``k = round(density * d)`` coordinates of largest magnitude (Stich et al. 2018,
"Sparsified SGD with Memory"; Alistarh et al. 2018, "The Convergence of Sparsified Gradient
Methods"). For large tensors the optional sampled mode follows Lin et al. 2018, "Deep Gradient
Compression" (DGC): estimate the threshold on a ~1% random sample, pre-select the coordinates above
it, then run an exact top-k on that (much smaller) candidate set.

Payload: ``k`` values (tensor dtype) + ``k`` int32 indices, so ``payload_bytes = k * (s + 4)``.
Ranks select different supports, hence ``shared_indices = False``: payloads are all-gathered
(``2k(P-1)`` numbers received per worker) and scatter-added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_gd.compression.base import (
    CompressedTensor,
    Compressor,
    _generator,
    _index_mask,
    _k_for,
)
from lightning_gd.utils.checks import check_number
from lightning_gd.utils.rng import derive_seed

__all__ = ["TopK"]


class TopK(Compressor):
    """Top-k magnitude sparsifier.

    Args:
        density: Fraction of coordinates kept, in ``(0, 1]``.
        sampled: Use DGC threshold sampling for tensors with more than ``sample_threshold``
            elements. The result is still the exact top-k whenever the sampled threshold selects at
            least ``k`` candidates (the candidate set then contains all top-k coordinates);
            otherwise it falls back to the full ``torch.topk``. It only changes speed, not the
            selection (up to ties).
        sample_threshold: Minimum ``numel`` for which sampling is used.
        sample_fraction: Fraction of coordinates sampled to estimate the threshold.

    Raises:
        ValueError: If ``density`` is outside ``(0, 1]`` or a sampling option is not positive.

    Example::

        >>> comp = TopK(0.5)
        >>> c = comp.compress(torch.tensor([1.0, -3.0, 0.5, 2.0]))
        >>> comp.decompress(c)
        tensor([ 0., -3.,  0.,  2.])
        >>> comp.payload_bytes(4, torch.float32)
        16
    """

    shared_indices = False
    sparse = True

    def __init__(
        self,
        density: float,
        sampled: bool = False,
        sample_threshold: int = 1_000_000,
        sample_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.density = check_number("density", density, 0, 1, low_open=True)
        if sample_threshold < 1:
            raise ValueError(f"sample_threshold must be >= 1, got sample_threshold={sample_threshold!r}")
        check_number("sample_fraction", sample_fraction, 0, 1, low_open=True)
        self.sampled = bool(sampled)
        self.sample_threshold = int(sample_threshold)
        self.sample_fraction = float(sample_fraction)
        #: Number of sampled selections that fell back to the exact top-k (diagnostic).
        self.sample_fallbacks = 0

    def k(self, numel: int) -> int:
        """Number of kept coordinates for a tensor of ``numel`` elements."""
        return _k_for(numel, self.density)

    def sent_numel(self, numel: int) -> int:
        return self.k(numel)

    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        # k values (s bytes) + k int32 indices
        k = self.k(numel)
        return k * (torch.empty((), dtype=dtype).element_size() + 4)

    def compress(self, tensor: torch.Tensor, key: int | str = 0) -> CompressedTensor:
        step = self._next_step(key)
        flat = tensor.reshape(-1)
        k = self.k(flat.numel())
        if self.sampled and flat.numel() > self.sample_threshold:
            idx = self._sampled_topk(flat, k, derive_seed("topk-sample", step, key, self.salt))
        else:
            idx = torch.topk(flat.abs(), k, sorted=False).indices
        idx = idx.to(torch.int32)
        values = flat[idx]
        return CompressedTensor(payload=(values, idx), shape=tensor.shape, dtype=tensor.dtype)

    def _sampled_topk(self, flat: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        """DGC: threshold from a random sample, then exact top-k among the candidates."""
        n = flat.numel()
        mag = flat.abs()
        m = max(1, int(n * self.sample_fraction))
        gen = _generator(flat.device, seed)
        sample = mag[torch.randint(n, (m,), generator=gen, device=flat.device)]
        # Ask for 25% more than the expected share so the candidate set rarely holds < k.
        k_s = min(m, max(1, int(1.25 * k * m / n) + 1))
        thr = torch.topk(sample, k_s, sorted=False).values.min()
        cand = torch.nonzero(mag >= thr).reshape(-1)
        if cand.numel() < k:
            # Threshold too high: the candidates may miss top-k entries, so do it exactly.
            self.sample_fallbacks += 1
            return torch.topk(mag, k, sorted=False).indices
        return cand[torch.topk(mag[cand], k, sorted=False).indices]

    def decompress(self, compressed: CompressedTensor) -> torch.Tensor:
        values, idx = compressed.payload
        out = torch.zeros(compressed.numel, dtype=compressed.dtype, device=values.device)
        out[idx.long()] = values.to(compressed.dtype)
        return out.reshape(compressed.shape)

    def decompress_sum(self, compressed: Sequence[CompressedTensor]) -> torch.Tensor:
        # Supports overlap across ranks, hence index_add_ (accumulating) rather than assignment.
        first = compressed[0]
        values = torch.cat([c.payload[0] for c in compressed]).to(first.dtype)
        idx = torch.cat([c.payload[1] for c in compressed]).long()
        out = torch.zeros(first.numel, dtype=first.dtype, device=values.device)
        out.index_add_(0, idx, values)
        return out.reshape(first.shape)

    def sent_mask(self, compressed: CompressedTensor) -> torch.Tensor:
        return _index_mask(compressed.numel, compressed.payload[1])

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sample_fallbacks"] = self.sample_fallbacks
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.sample_fallbacks = int(state_dict.get("sample_fallbacks", 0))

    def _extra_repr(self) -> str:
        return f"density={self.density}, sampled={self.sampled}"
