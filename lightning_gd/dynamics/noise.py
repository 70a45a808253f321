"""Annealed noise and the perturbed-gradient-descent ball kick, in pure torch.

* Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very Deep Networks": noise of
  *variance* ``sigma_t^2 = eta / (1 + t)^gamma`` (:func:`noise_std` with ``schedule="polynomial"``).
* Zhou et al. 2019, "Towards Understanding the Importance of Noise in Training Neural Networks": the standard
  deviation shrinks by ``gamma`` every period (``schedule="step"``: ``sigma_t^2 = eta * gamma^(2 j)``).
* Jin et al. 2017, "How to Escape Saddle Points Efficiently": perturbed GD adds a point drawn uniformly from the
  ball of radius ``r`` (:func:`uniform_ball_`).

The noise is drawn from explicit generators (:class:`DeviceGenerators`), never from the global RNG. A sharded
``DTensor`` (FSDP2) gets its shard of the noise the whole tensor would get.
:class:`~lightning_gd.callbacks.NoiseAnnealing` schedules these functions in a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["DeviceGenerators", "NoiseSchedule", "add_gaussian_", "noise_std", "uniform_ball_", "whole"]

#: ``polynomial``: Neelakantan et al.'s ``eta / (1 + t)^gamma``; ``step``: Zhou et al.'s ``eta * gamma^(2 j)``.
NoiseSchedule = Literal["polynomial", "step"]


def noise_std(schedule: NoiseSchedule, eta: float, gamma: float, step: int, period: int = 0) -> float:
    """The noise's standard deviation ``sigma_t`` at optimizer step ``step``.

    Args:
        schedule: ``polynomial``: ``sigma_t^2 = eta / (1 + step)^gamma``; ``step``: ``sigma_t^2 = eta * gamma^(2 j)``
            with ``j = period`` (the caller's count of decay periods: epochs, or ``step // decay_steps``).
        eta: Initial variance (``>= 0``).
        gamma: Annealing exponent (polynomial) or per-period factor of the standard deviation (step).
        step: Optimizer steps taken.
        period: ``j`` of the step schedule.

    Example::

        >>> noise_std("polynomial", 0.01, 0.55, step=0)
        0.1
    """
    if schedule == "polynomial":
        return math.sqrt(eta / (1.0 + step) ** gamma)
    if schedule == "step":
        return math.sqrt(eta) * gamma**period
    raise ValueError(f"`schedule` must be 'polynomial' or 'step', got {schedule!r}")


class DeviceGenerators:
    """One ``torch.Generator`` per device, all seeded with ``seed`` (``torch.randn`` needs one on the tensor's
    device), so that the same seed draws the same numbers on every rank."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._by_device: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device) -> torch.Generator:
        if device not in self._by_device:
            self._by_device[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._by_device[device]


@torch.no_grad()
def add_gaussian_(tensors: Sequence[Tensor], std: float, generators: DeviceGenerators) -> None:
    """Add ``N(0, std^2)`` noise to every entry of ``tensors``, in place, drawn in order from ``generators``."""
    for t in tensors:
        noise = torch.randn(t.shape, generator=generators(t.device), device=t.device, dtype=t.dtype)
        _add_whole_(t, noise, alpha=std)


@torch.no_grad()
def uniform_ball_(tensors: Sequence[Tensor], radius: float, generators: DeviceGenerators) -> None:
    """Add a point drawn uniformly from the ball of radius ``radius`` over all ``tensors`` jointly, in place.

    The point is ``radius * U^(1/d) * v / |v|`` with ``v`` standard Gaussian (a uniform direction) and ``U``
    uniform on [0, 1] (so the radius has the ball's density ``d r^(d-1) / radius^d``), ``d`` the total number of
    entries; drawn in float64 (Jin et al. 2017's perturbation).
    """
    directions = [
        torch.randn(t.shape, generator=generators(t.device), device=t.device, dtype=torch.float64) for t in tensors
    ]
    d = sum(v.numel() for v in directions)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in directions])).item()
    u = torch.rand((), generator=generators(torch.device("cpu")), dtype=torch.float64).item()
    scale = radius * u ** (1.0 / d) / norm  # uniform in the ball: radius r * U^(1/d)
    for t, v in zip(tensors, directions, strict=True):
        _add_whole_(t, (v * scale).to(t.dtype))


def whole(t: Tensor) -> Tensor:
    """A sharded ``DTensor``'s whole value (a collective), any other tensor itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _add_whole_(t: Tensor, value: Tensor, alpha: float = 1.0) -> None:
    """``t += alpha * value`` for a ``value`` shaped like the whole of ``t``; a sharded ``DTensor`` (FSDP2's
    parameters and gradients) adds its own shard of ``value``.

    ``value`` is drawn alike on every rank, so each shard gets the entries an unsharded tensor would
    (``distribute_tensor`` is a collective: every rank calls it, for the same tensors in the same order).
    """
    if _is_dtensor(t):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, t.device_mesh, t.placements)
    t.add_(value, alpha=alpha)
