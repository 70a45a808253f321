"""Optimizers (torch.optim contract), learning-rate schedules and optimizer recipes.

The public names load on first use (PEP 562), so that the recipe table, :mod:`lightning_gd.optim.specs`, imports
without torch or timm (``lightning-gd optimizers`` lists it in a fraction of a second).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_gd.optim.conda import Conda
    from lightning_gd.optim.diffgrad import DiffGrad
    from lightning_gd.optim.mfac import MFAC
    from lightning_gd.optim.recipe import OptimizerRecipe
    from lightning_gd.optim.warmup_decay import WarmupCosineLR, WarmupDecayLR

_MODULES = {
    "Conda": "conda",
    "DiffGrad": "diffgrad",
    "MFAC": "mfac",
    "OptimizerRecipe": "recipe",
    "WarmupCosineLR": "warmup_decay",
    "WarmupDecayLR": "warmup_decay",
}

__all__ = ["MFAC", "Conda", "DiffGrad", "OptimizerRecipe", "WarmupCosineLR", "WarmupDecayLR"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
