"""Private helpers shared by the curvature estimators (probes, generators, batched products)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gd.curvature.base import CurvatureOperator
from lightning_gd.utils.checks import check_positive_int

# Seed of the private generator used when the caller passes none: estimates are reproducible
# and the global RNG is never consumed.
_DEFAULT_SEED = 0


def _resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """Return ``generator``, or a fresh CPU generator with a fixed seed (global RNG untouched)."""
    if generator is None:
        return torch.Generator().manual_seed(_DEFAULT_SEED)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    return generator


def _rademacher(shape: tuple[int, ...], generator: torch.Generator, like: CurvatureOperator) -> Tensor:
    """Draw +-1 entries with ``generator`` (on its own device), returned on the operator's device."""
    dtype = _work_dtype(like.dtype)
    bits = torch.randint(0, 2, shape, generator=generator, device=generator.device, dtype=dtype)
    return bits.mul_(2).sub_(1).to(device=like.device)  # in place: no temporaries of the probes' size


def _gaussian(shape: tuple[int, ...], generator: torch.Generator, like: CurvatureOperator) -> Tensor:
    """Draw standard normal entries with ``generator``, returned on the operator's device."""
    dtype = _work_dtype(like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(like.device)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least float32, so half-precision operators still reduce accurately."""
    return torch.promote_types(dtype, torch.float32)


def _matmat(op: CurvatureOperator, V: Tensor) -> Tensor:
    """Apply ``op`` to the columns of ``V`` (shape ``(numel, m)``), batched when it can."""
    V = V.to(dtype=op.dtype, device=op.device)
    matmat = getattr(op, "matmat", None)
    if callable(matmat):
        return matmat(V)
    return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Validate an integer argument, naming it and its value in the error (``ValueError``)."""
    return check_positive_int(name, value, minimum)
