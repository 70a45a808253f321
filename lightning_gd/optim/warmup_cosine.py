"""The earlier home of the warm-up schedule, now :mod:`lightning_gd.optim.warmup_decay`.

Kept so that configs saved with ``class_path: lightning_gd.optim.warmup_cosine.WarmupCosineLR`` still load.
"""

from lightning_gd.optim.warmup_decay import WarmupCosineLR, WarmupDecayLR

__all__ = ["WarmupCosineLR", "WarmupDecayLR"]
