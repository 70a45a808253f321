"""Scaled sign compression (EF-signSGD).

Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes":
``C(x) = (||x||_1 / d) * sign(x)``. The scale is the mean absolute value, which makes ``C`` a
contraction so error feedback converges.

Payload: the signs really packed 8 per byte (``ceil(d / 8)`` uint8) + one fp32 scale, i.e.
``payload_bytes = ceil(d / 8) + 4``. Zeros are sent as ``+`` (a single bit cannot encode 0). Ranks
have different scales and signs, so payloads are all-gathered (``shared_indices = False``).
"""

from __future__ import annotations

import math

import torch

from lightning_gd.compression.base import CompressedTensor, Compressor, _pack_bits, _unpack_bits

__all__ = ["Sign"]


class Sign(Compressor):
    """Scaled sign compressor: ``(||x||_1 / d) * sign(x)`` with bit-packed signs.

    Example::

        >>> comp = Sign()
        >>> c = comp.compress(torch.tensor([1.0, -3.0, 0.5, -0.5]))
        >>> comp.decompress(c)
        tensor([ 1.2500, -1.2500,  1.2500, -1.2500])
        >>> comp.payload_bytes(4)  # 1 byte of signs + fp32 scale
        5
    """

    shared_indices = False
    sparse = False

    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return math.ceil(numel / 8) + 4

    def compress(self, tensor: torch.Tensor, key: int | str = 0) -> CompressedTensor:
        self._next_step(key)
        flat = tensor.reshape(-1)
        # scale = ||x||_1 / d, accumulated in fp32 for low-precision inputs
        scale = flat.float().abs().mean().reshape(1) if flat.numel() else flat.new_zeros(1, dtype=torch.float32)
        bits = _pack_bits(flat >= 0)  # bit 1 <=> non-negative
        # Fixed-size fp32 header first keeps it 4-byte aligned when payloads are byte-packed.
        return CompressedTensor(payload=(scale, bits), shape=tensor.shape, dtype=tensor.dtype)

    def decompress(self, compressed: CompressedTensor) -> torch.Tensor:
        scale, bits = compressed.payload
        positive = _unpack_bits(bits, compressed.numel)
        # sign(x) in {-1, +1}
        sign = positive.to(torch.float32).mul_(2.0).sub_(1.0)
        return (sign * scale).to(compressed.dtype).reshape(compressed.shape)
