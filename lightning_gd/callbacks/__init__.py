"""Lightning callbacks: schedule the math of this package, gather across ranks, log and checkpoint."""

from lightning_gd.callbacks.graceful_stop import GracefulStop
from lightning_gd.callbacks.gradient_flossing import GradientFlossing
from lightning_gd.callbacks.hessian_trace_monitor import HessianTraceMonitor
from lightning_gd.callbacks.metric_plotter import MetricPlotter
from lightning_gd.callbacks.noise_annealing import NoiseAnnealing
from lightning_gd.callbacks.progress_bar import ResumeProgressBar
from lightning_gd.callbacks.schedule_check import ScheduleLengthCheck
from lightning_gd.callbacks.sharpness_tracker import SharpnessTracker
from lightning_gd.callbacks.text_sampler import TextSampler

__all__ = [
    "GracefulStop",
    "GradientFlossing",
    "HessianTraceMonitor",
    "MetricPlotter",
    "NoiseAnnealing",
    "ResumeProgressBar",
    "ScheduleLengthCheck",
    "SharpnessTracker",
    "TextSampler",
]
