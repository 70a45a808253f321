"""Lightning callbacks: schedule the math of this package, gather across ranks, log and checkpoint."""

from lightning_gd.callbacks.metric_plotter import MetricPlotter
from lightning_gd.callbacks.text_sampler import TextSampler

__all__ = ["MetricPlotter", "TextSampler"]
