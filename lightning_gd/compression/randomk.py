"""Random-k sparsification with shared indices.

Keeps ``k = round(density * d)`` uniformly random coordinates (Stich et al. 2018, "Sparsified SGD
with Memory"). The indices come from a generator seeded by ``(seed, step, key)`` — identical on all
ranks — so only the ``k`` values travel and they can be summed with a plain ``allreduce``
(``shared_indices = True``).

Scaling choice: by default values are *not* rescaled by ``d / k``. The unscaled operator is a
contraction (``E||x - C(x)||^2 = (1 - k/d)||x||^2``), which is what error feedback needs (Stich et al.
2018, Karimireddy et al. 2019); the rescaled operator is unbiased but not contractive and makes the
residual grow. Set ``unbiased=True`` only without error feedback.
"""

from __future__ import annotations

import torch

from lightning_gd.compression.base import (
    CompressedTensor,
    _generator,
    _index_mask,
    _k_for,
    _SeededCompressor,
)
from lightning_gd.utils.checks import check_number
from lightning_gd.utils.rng import derive_seed

__all__ = ["RandomK"]


class RandomK(_SeededCompressor):
    """Random-k sparsifier whose support is shared by all ranks.

    The indices for the ``step``-th call with ``key`` are a deterministic function of
    ``(seed, step, key, numel, device type)``; two instances with the same seed that have made the
    same number of calls for a key draw the same indices. (CPU and CUDA generators produce different
    streams, so all ranks must compress on the same device type.)

    Args:
        density: Fraction of coordinates kept, in ``(0, 1]``.
        seed: Seed shared by all ranks.
        unbiased: Multiply the decompressed values by ``d / k`` (unbiased, non-contractive). Keep
            ``False`` with error feedback.

    Raises:
        ValueError: If ``density`` is outside ``(0, 1]``.

    Example::

        >>> a, b = RandomK(0.1, seed=7), RandomK(0.1, seed=7)
        >>> x = torch.randn(100)
        >>> torch.equal(a.compress(x, key=3).ctx["indices"], b.compress(x, key=3).ctx["indices"])
        True
        >>> a.payload_bytes(100, torch.float32)  # 10 fp32 values, no indices
        40
    """

    shared_indices = True
    sparse = True

    def __init__(self, density: float, seed: int = 0, unbiased: bool = False) -> None:
        super().__init__(seed)
        self.density = check_number("density", density, 0, 1, low_open=True)
        self.unbiased = bool(unbiased)

    def k(self, numel: int) -> int:
        """Number of kept coordinates for a tensor of ``numel`` elements."""
        return _k_for(numel, self.density)

    def sent_numel(self, numel: int) -> int:
        return self.k(numel)

    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        # k values only; indices are regenerated locally
        return self.k(numel) * torch.empty((), dtype=dtype).element_size()

    def indices(self, numel: int, key: int | str, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The (sorted, int64) indices used for call number ``step`` of ``key``.

        Args:
            numel: Number of elements of the compressed tensor.
            key: Tensor stream identifier (bucket index or parameter name).
            step: Call number for ``key`` (0-based).
            device: Device on which to draw them.

        Returns:
            ``k`` distinct indices in increasing order.
        """
        device = torch.device(device)
        gen = _generator(device, derive_seed("randomk", self.seed, step, key, numel))
        k = self.k(numel)
        if 4 * k > numel:
            idx = torch.randperm(numel, generator=gen, device=device)[:k]
            return torch.sort(idx).values  # sorted indices make gather/scatter memory-friendly
        # Sparse case: a full randperm is O(numel) (480 ms on 8.4M entries). Draw with replacement and keep the
        # first k distinct values in draw order: uniform over k-subsets, and deterministic for the shared seed.
        chosen = torch.empty(0, dtype=torch.long, device=device)
        while chosen.numel() < k:
            draw = torch.randint(0, numel, (2 * k,), generator=gen, device=device)
            pool = torch.cat([chosen, draw])
            uniq, inverse = torch.unique(pool, sorted=True, return_inverse=True)
            first = torch.full((uniq.numel(),), pool.numel(), dtype=torch.long, device=device)
            first.scatter_reduce_(0, inverse, torch.arange(pool.numel(), device=device), reduce="amin")
            chosen = pool[first.sort().values][:k]  # distinct, in order of first appearance
        return torch.sort(chosen).values

    def compress(self, tensor: torch.Tensor, key: int | str = 0) -> CompressedTensor:
        step = self._next_step(key)
        flat = tensor.reshape(-1)
        idx = self.indices(flat.numel(), key, step, flat.device)
        return CompressedTensor(payload=(flat[idx],), shape=tensor.shape, dtype=tensor.dtype, ctx={"indices": idx})

    def decompress(self, compressed: CompressedTensor) -> torch.Tensor:
        (values,) = compressed.payload
        idx = compressed.ctx["indices"]
        out = torch.zeros(compressed.numel, dtype=compressed.dtype, device=values.device)
        out[idx] = values.to(compressed.dtype)
        if self.unbiased:
            # d / k makes E[C(x)] = x.
            out.mul_(compressed.numel / max(1, idx.numel()))
        return out.reshape(compressed.shape)

    def sent_mask(self, compressed: CompressedTensor) -> torch.Tensor:
        return _index_mask(compressed.numel, compressed.ctx["indices"])

    def _extra_repr(self) -> str:
        return f"density={self.density}, seed={self.seed}, unbiased={self.unbiased}"
