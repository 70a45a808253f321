"""Gradient flossing's loss and trajectories (Engelken 2023), in pure torch.

Engelken 2023, "Gradient Flossing: Improving Gradient Descent through Dynamic Control of Jacobians" (NeurIPS):
the ``k`` leading Lyapunov exponents ``lambda`` of a recurrent network's forward dynamics, measured on
trajectories driven by random inputs, are pushed towards a target by minimizing
``weight * mean((lambda - target)^2)``. :func:`flossing_spectrum` draws the trajectories and measures the
exponents (differentiably, :func:`~lightning_gd.dynamics.lyapunov_spectrum`); :func:`flossing_loss` is the loss.
:class:`~lightning_gd.callbacks.GradientFlossing` schedules them in a Trainer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gd.dynamics.lyapunov import lyapunov_spectrum
from lightning_gd.dynamics.steps import RecurrentDynamics

__all__ = ["INITIAL_STATE_STD", "flossing_loss", "flossing_spectrum", "sample_trajectories"]

#: Standard deviation of the trajectories' initial states.
INITIAL_STATE_STD = 0.1


def flossing_loss(exponents: Tensor, target: float = 0.0, weight: float = 1.0) -> Tensor:
    """``weight * mean((exponents - target)^2)`` over every exponent (and trajectory) given.

    Example::

        >>> flossing_loss(torch.tensor([0.5, -0.5]))
        tensor(0.2500)
    """
    return weight * ((exponents - target) ** 2).mean()


def sample_trajectories(
    dynamics: RecurrentDynamics, length: int, batch: int, generator: torch.Generator, input_std: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Inputs ``(T, B, D)`` and initial states ``(B, N)`` of ``batch`` flossing trajectories, on the CPU.

    The inputs are the task's own (``dynamics.sample_inputs(T, B, generator)``) when the dynamics bring them,
    else ``input_std`` times standard Gaussian noise; the initial states are ``N(0, 0.1^2)``. Drawn in that
    order from ``generator`` (the global RNG is not used).
    """
    if dynamics.sample_inputs is not None:
        inputs = dynamics.sample_inputs(length, batch, generator)  # (T, B, D)
    else:
        inputs = input_std * torch.randn(length, batch, dynamics.input_size, generator=generator)  # (T, B, D)
    h0 = INITIAL_STATE_STD * torch.randn(batch, dynamics.state_size, generator=generator)  # (B, N)
    return inputs, h0


def flossing_spectrum(
    dynamics: RecurrentDynamics,
    k: int,
    length: int,
    batch: int,
    warmup: int,
    generator: torch.Generator,
    reorth_every: int = 1,
    input_std: float = 1.0,
    like: Tensor | None = None,
) -> Tensor:
    """The ``k`` leading exponents ``(B, k)`` of fresh trajectories (differentiable when grad is enabled).

    Trajectories of :func:`sample_trajectories`, moved to ``like``'s device and dtype (a parameter of the
    dynamics); the tangent basis is drawn from the same ``generator``.
    """
    inputs, h0 = sample_trajectories(dynamics, length, batch, generator, input_std)
    if like is not None:
        inputs = inputs.to(device=like.device, dtype=like.dtype)
        h0 = h0.to(device=like.device, dtype=like.dtype)
    return lyapunov_spectrum(dynamics.step, h0, inputs, k, warmup, reorth_every, generator=generator)
