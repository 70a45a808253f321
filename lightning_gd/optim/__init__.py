"""Optimizers (torch.optim contract), learning-rate schedules and optimizer recipes."""

from lightning_gd.optim.conda import Conda
from lightning_gd.optim.diffgrad import DiffGrad
from lightning_gd.optim.mfac import MFAC
from lightning_gd.optim.recipe import OptimizerRecipe
from lightning_gd.optim.warmup_cosine import WarmupCosineLR

__all__ = ["MFAC", "Conda", "DiffGrad", "OptimizerRecipe", "WarmupCosineLR"]
