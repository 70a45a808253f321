"""QSGD stochastic quantization.

Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding".
With ``s`` levels, each coordinate is sent as ``||x||_2 * sign(x_i) * l_i / s`` where
``l_i in {0, ..., s}`` is ``|x_i| / ||x||_2 * s`` rounded stochastically (up with probability equal
to the fractional part), so ``E[Q(x)] = x``.

Payload: one fp32 norm + a code ``2 * l_i + [x_i < 0]`` per element, stored in the narrowest width
``w in {2, 4, 8, 16, 32}`` bits holding ``2s + 1`` (2- and 4-bit codes are packed several per byte):
``payload_bytes = 4 + ceil(d * w / 8)``. E.g. ``s = 1`` (ternary) -> 2 bits, ``s <= 7`` -> 4 bits,
``s <= 127`` -> one uint8 per element. The Elias coding of the paper is not used (variable length
does not suit collectives).
"""

from __future__ import annotations

import math

import torch

from lightning_gd.compression.base import CompressedTensor, _generator, _SeededCompressor
from lightning_gd.utils.rng import derive_seed

__all__ = ["QSGD"]

_MAX_LEVELS = (1 << 30) - 1  # keeps codes 2s + 1 inside int32


class QSGD(_SeededCompressor):
    """QSGD stochastic quantizer with ``levels`` quantization levels.

    The rounding noise of call number ``step`` for ``key`` is drawn from a generator seeded by
    ``(seed, step, key, salt)``; a communication hook sets ``salt`` to the rank so ranks draw
    independent noise. The state is therefore plain data (seed + per-key counters).

    Args:
        levels: Number of quantization levels ``s >= 1``.
        seed: Base seed of the rounding noise.

    Raises:
        ValueError: If ``levels`` is not an integer in ``[1, 2**30 - 1]``.

    Example::

        >>> comp = QSGD(levels=4, seed=0)
        >>> c = comp.compress(torch.randn(10))
        >>> comp.code_bits, comp.payload_bytes(10)  # 4-bit codes, 5 bytes + fp32 norm
        (4, 9)
        >>> comp.decompress(c).shape
        torch.Size([10])
    """

    shared_indices = False
    sparse = False
    contractive = False  # unbiased; its variance exceeds ||x||^2 at few levels

    def __init__(self, levels: int, seed: int = 0) -> None:
        super().__init__(seed)
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= _MAX_LEVELS:
            raise ValueError(f"levels must be an integer in [1, {_MAX_LEVELS}], got levels={levels!r}")
        self.levels = levels
        needed = (2 * levels + 1).bit_length()
        #: Bits per element of the code (2, 4, 8, 16 or 32).
        self.code_bits = next(w for w in (2, 4, 8, 16, 32) if w >= needed)

    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return 4 + math.ceil(numel * self.code_bits / 8)

    def compress(self, tensor: torch.Tensor, key: int | str = 0) -> CompressedTensor:
        step = self._next_step(key)
        flat = tensor.reshape(-1).float()
        s = self.levels
        norm = torch.linalg.vector_norm(flat).reshape(1)  # ||x||_2
        # r_i = |x_i| / ||x||_2 * s in [0, s]; clamp_min avoids 0/0 for the zero vector.
        r = flat.abs().div_(norm.clamp_min(torch.finfo(torch.float32).tiny)).mul_(s)
        low = r.floor()
        gen = _generator(flat.device, derive_seed("qsgd", self.seed, step, key, self.salt))
        u = torch.rand(flat.shape, generator=gen, device=flat.device)
        # l_i = floor(r_i) + Bernoulli(r_i - floor(r_i))
        level = (low + (u < (r - low)).to(low.dtype)).clamp_(0, s).to(torch.int64)
        code = level * 2 + (flat < 0).to(torch.int64)
        return CompressedTensor(payload=(norm, self._encode(code)), shape=tensor.shape, dtype=tensor.dtype)

    def decompress(self, compressed: CompressedTensor) -> torch.Tensor:
        norm, packed = compressed.payload
        code = self._decode(packed, compressed.numel)
        level = (code >> 1).to(torch.float32)
        sign = 1.0 - 2.0 * (code & 1).to(torch.float32)
        # x_i = ||x||_2 * sign_i * l_i / s
        out = norm * sign * level / self.levels
        return out.to(compressed.dtype).reshape(compressed.shape)

    # ------------------------------------------------------------------ code packing
    def _encode(self, code: torch.Tensor) -> torch.Tensor:
        w = self.code_bits
        if w == 8:
            return code.to(torch.uint8)
        if w == 16:
            # two's complement wrap so codes up to 65535 fit int16
            return torch.where(code >= 1 << 15, code - (1 << 16), code).to(torch.int16)
        if w == 32:
            return code.to(torch.int32)
        per = 8 // w
        pad = (-code.numel()) % per
        c = code.to(torch.int32)
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        shifts = torch.arange(per - 1, -1, -1, device=c.device, dtype=torch.int32) * w
        return (c.view(-1, per) << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)

    def _decode(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        w = self.code_bits
        if w in (8, 32):
            return packed.to(torch.int64)
        if w == 16:
            return packed.to(torch.int64) & 0xFFFF
        per = 8 // w
        shifts = torch.arange(per - 1, -1, -1, device=packed.device, dtype=torch.int32) * w
        codes = (packed.to(torch.int32).reshape(-1, 1) >> shifts) & ((1 << w) - 1)
        return codes.reshape(-1)[:numel].to(torch.int64)

    def _extra_repr(self) -> str:
        return f"levels={self.levels}, seed={self.seed}"
