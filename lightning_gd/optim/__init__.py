"""Optimizers (torch.optim contract), learning-rate schedules and optimizer recipes."""

from lightning_gd.optim.warmup_cosine import WarmupCosineLR

__all__ = ["WarmupCosineLR"]
