"""One-step sign-gradient attack with a random start and an optional random target label (FGSM family).

Goodfellow et al. 2015 (FGSM); Wong et al. 2020, "Fast is better than free" (random start); the target label
drawn at random follows the reference code of Liu et al. 2022, "Concurrent Adversarial Learning for Large-Batch
Training" (ConAdv): ``epsilon = step = 9`` on the 0-255 scale, a random start on 80% of the batches.

The budget is stated in pixel units and mapped through :class:`~lightning_gd.adversarial.Normalization`, the
perturbation is projected on the ``epsilon`` ball around the clean pixels and clamped to the valid pixel range.
Only the input gradient is computed (``torch.autograd.grad`` with respect to the inputs): parameter ``.grad`` is
never written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gd.adversarial.normalization import Normalization
from lightning_gd.utils.checks import check_number

__all__ = ["AttackLoss", "AttackResult", "sign_attack"]


class AttackLoss(Protocol):
    """A loss of ``logits`` and class ``targets`` returning a scalar (the attack differentiates it)."""

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class AttackResult:
    """Result of :func:`sign_attack`.

    Attributes:
        inputs: Adversarial inputs, normalized like the clean ones (detached).
        attack_targets: The labels the attack pushed towards (targeted) or away from (untargeted).
        loss: The attack loss at the starting point (detached scalar).
        random_start: Whether this batch started from a random point in the ball.
    """

    inputs: Tensor
    attack_targets: Tensor
    loss: Tensor
    random_start: bool


def sign_attack(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    epsilon: float,
    step_size: float | None = None,
    normalization: Normalization | None = None,
    targeted: bool = True,
    random_start: float = 0.8,
    loss_fn: AttackLoss | None = None,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """One signed-gradient step from a (possibly random) start, projected on the ``epsilon`` ball in pixel space.

    With ``targeted=True`` a target label different from the true one is drawn for every example and the step
    descends the loss towards it (ConAdv's reference); otherwise the step ascends the loss of the true label.

    Args:
        forward: ``inputs -> logits`` (the model; its parameters are read, their ``.grad`` is never written).
        inputs: Normalized inputs, channels in dimension 1 for images.
        targets: Integer class labels, shape ``(batch,)``.
        epsilon: L-infinity radius in pixel units (>= 0).
        step_size: The signed step in pixel units (>= 0); ``None`` takes ``epsilon``.
        normalization: Maps inputs to pixels and back; ``None`` means the inputs are unbounded pixels.
        targeted: Step towards a random wrong label (True) or away from the true one (False).
        random_start: Probability that a batch starts from a uniform point in the ball (0.8 in ConAdv).
        loss_fn: ``(logits, targets) -> scalar``; cross entropy (mean) by default.
        generator: Seeds the random start, its coin and the target labels (on the inputs' device).

    Returns:
        The adversarial batch, see :class:`AttackResult`.

    Raises:
        ValueError: for a negative or non-numeric budget, ``random_start`` outside [0, 1], or targets that are not
            integer labels of shape ``(batch,)``.

    Example::

        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> adv = sign_attack(model, x, y, epsilon=0.1, normalization=Normalization(pixel_range=None))
        >>> bool((adv.inputs - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    epsilon = check_number("epsilon", epsilon, 0)  # pixel units
    step = epsilon if step_size is None else check_number("step_size", step_size, 0)
    check_number("random_start", random_start, 0, 1)  # a probability
    if targets.ndim != 1 or targets.shape[0] != inputs.shape[0] or targets.is_floating_point():
        raise ValueError(
            f"`targets` must be integer class labels of shape (batch,) = ({inputs.shape[0]},), got"
            f" {tuple(targets.shape)} {targets.dtype}"
        )
    norm = normalization if normalization is not None else Normalization(pixel_range=None)
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    inputs = inputs.detach()
    pixels = norm.to_pixels(inputs.float())

    start = bool(random_start > 0 and torch.rand((), generator=generator, device=inputs.device) < random_start)
    if start and epsilon > 0:
        noise = torch.rand(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
        pixels_0 = norm.clamp(pixels + (2 * noise - 1) * epsilon)
    else:
        pixels_0 = pixels

    x0 = norm.normalize(pixels_0).to(inputs.dtype).requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x0)
        if targeted:
            num_classes = logits.shape[-1]
            shift = torch.randint(1, max(num_classes, 2), targets.shape, generator=generator, device=targets.device)
            attack_targets = (targets + shift) % num_classes
        else:
            attack_targets = targets
        loss = loss_fn(logits, attack_targets)
        (grad,) = torch.autograd.grad(loss, x0)
    # std > 0, so the sign of the pixel gradient is the sign of the input gradient.
    direction = -grad.sign() if targeted else grad.sign()
    pixels_1 = pixels_0 + step * direction.float()
    pixels_1 = norm.clamp(torch.minimum(torch.maximum(pixels_1, pixels - epsilon), pixels + epsilon))
    adversarial = norm.normalize(pixels_1).to(inputs.dtype).detach()
    return AttackResult(
        inputs=adversarial, attack_targets=attack_targets.detach(), loss=loss.detach(), random_start=start
    )
