"""Hessian-vector products by central differences of gradients: the step, its error, and the product.

``H v ~ (g(theta + h v) - g(theta - h v)) / 2h`` for the gradient ``g`` of the loss. Two ordinary gradients (a
forward and a first-order backward each), no second-order graph: whatever computes a gradient computes this product,
including a sharded model's own forward and backward (FSDP's all-gather and reduce-scatter, ZeRO-3's partitions), a
``torch.compile``d module and fused attention kernels, none of which offer double backward.

Error. By Taylor, ``g(theta +- h v) = g +- h H v + h^2/2 D3[v, v] +- h^3/6 D4[v, v, v] + ...``: the central
difference cancels the even terms, so its *truncation* error is ``h^2/6 D4[v, v, v] = O(h^2)``. Its *roundoff* error
is ``O(u/h)``: each gradient carries a rounding error of relative size ``u`` (the unit roundoff of the dtype it is
computed in), which the division by ``2h`` amplifies, and ``theta +- h v`` is itself rounded to the parameters'
dtype, which moves the step by up to ``u |theta|`` per entry. The sum ``a h^2 + b u / h`` is smallest at
``h ~ u^(1/3)``, where the error is ``~ u^(2/3)`` (Nocedal & Wright 2006, "Numerical Optimization", Section 8.1;
the same rule as hessian-eigenthings 1.0's ``method="finite_difference"``).

Scale. The step must be small against the scale on which the gradient is nonlinear, the weights, and large against
their rounding. For a vector spread over every entry (a Rademacher probe) the usual step is
``h = eps (1 + ||theta||) / ||v||`` (Knoll & Keyes 2004, "Jacobian-free Newton-Krylov methods", Section 2.2): every
entry moves by about ``eps`` times the weights' RMS. But the vectors Lanczos converges to are localised: the top
eigenvector of the quickstart model holds its weight on a few dozen of 771K entries, and that step moved them by up
to 60% of their size (lambda_max 61% off, measured); at llama-tiny's initialisation it also sits on weights four
times smaller than the RMS. So the step is set by the entries that move most and the weights they move:
``h = c eps w(v) / a(v)``, with ``a(v) = sqrt(sum v^4 / sum v^2)`` the energy-weighted RMS size of ``v``'s entries
(about half the largest entry of a localised vector, 1 for a Rademacher probe: a robust stand-in for the largest),
``w(v) = sqrt(sum v^2 theta^2 / sum v^2) + 1 / sqrt(n)`` the RMS of the weights where ``v`` sits (floored for
weights at zero), and ``c = 0.1``, chosen by measurement: one product along the top and bottom eigenvectors and a
Rademacher probe of both models, over steps from 0.02 to 0.5 of this size, erred by 4e-5 to 1e-3 near ``c = 0.1``,
more above (truncation, as ``c^2``) and below (rounding, as ``1/c``). Every quantity is a sum, so it all-reduces
over shards, and the product is linear in ``v``: its scale does not matter. With ``eps = eps_dtype^(1/3)``
(``torch.finfo(dtype).eps``: 4.9e-3 in float32, 6.1e-6 in float64, 0.20 in bfloat16, 0.099 in float16) the relative
error is of the order of ``eps_dtype^(2/3)``: 2.4e-5 in float32, 3.7e-11 in float64, 3.9% in bfloat16, 1.0% in
float16 (:func:`finite_difference_error`; measured in float32: 4e-5 to 1e-3 along localised eigenvectors).
Measured: benchmarks/RESULTS.md, "Curvature by finite differences". All of this assumes a gradient that is smooth
on the scale of the step: across ReLU or max-pooling kinks no step is right, in any precision, and
:func:`~lightning_gd.curvature.finite_difference_check` tells such products apart (``step_check``).

Exactness of the weights. The perturbed tensors are saved once per call and copied back bit for bit after every
gradient and at the end (also when a gradient raises): ``theta + h v - h v`` is not ``theta`` in floating point, a
copy is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_gd.curvature._utils import _work_dtype

GradientFn = Callable[[], Sequence[Tensor | None]]

# The largest entries of v move by about this share of eps times the weights where v sits (``_central_differences``):
# chosen by measurement on the quickstart model and llama-tiny (module docs).
_STEP_FRACTION = 0.1


def finite_difference_eps(dtype: torch.dtype) -> float:
    """The default relative step ``eps = finfo(dtype).eps ** (1/3)`` of a central difference in ``dtype``.

    Example::

        >>> import torch
        >>> round(finite_difference_eps(torch.float32), 4), round(finite_difference_eps(torch.bfloat16), 3)
        (0.0049, 0.198)
    """
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def finite_difference_error(dtype: torch.dtype) -> float:
    """The expected relative error of a central-difference product at the default step: ``finfo(dtype).eps ** (2/3)``.

    Example::

        >>> import torch
        >>> f"{finite_difference_error(torch.float32):.1e}", f"{finite_difference_error(torch.bfloat16):.1%}"
        ('2.4e-05', '3.9%')
    """
    return float(torch.finfo(dtype).eps) ** (2.0 / 3.0)


def _central_differences(
    targets: Sequence[Tensor],
    gradient: GradientFn,
    V: Tensor,
    eps: float,
    total: Callable[[Tensor], Tensor],
) -> Tensor:
    """``(g(theta + h v) - g(theta - h v)) / 2h`` for every column ``v`` of ``V``; ``theta`` left bit-identical.

    Args:
        targets: The tensors ``theta`` (parameters, or a rank's shards of them), perturbed in place under
            ``no_grad`` and copied back.
        gradient: The gradient at the current values, one tensor shaped like each target (``None``: zero).
        V: ``(n, m)`` columns flat over ``targets`` (their numels concatenated).
        eps: The relative step.
        total: Sum over the ranks that share the vectors (the identity when unsharded), for ``||theta||`` and
            ``||v||``.

    Returns:
        ``(n, m)`` in ``V``'s dtype, computed in the working dtype (at least float32).

    Memory beyond the output and the gradients ``gradient`` returns: one copy of ``targets`` (in their dtype).
    """
    numels = [t.numel() for t in targets]
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    out = torch.zeros(V.shape, dtype=_work_dtype(V.dtype), device=V.device)
    saved = [t.detach().clone() for t in targets]
    # One all-reduce for the entry count and every column's sums of v^2, v^4 and v^2 theta^2 (float64 sums; the
    # temporaries are one parameter's size).
    m = V.shape[1]
    columns = V.split(numels)
    weighted = torch.zeros(m, dtype=torch.float64, device=V.device)
    for s, d in zip(saved, columns, strict=True):
        theta_sq = s.reshape(-1, 1).to(V.dtype).square()
        weighted += (d.square() * theta_sq).sum(dim=0, dtype=torch.float64)
    sums = torch.cat([
        torch.tensor([float(V.shape[0])], dtype=torch.float64, device=V.device),
        torch.linalg.vector_norm(V, dim=0, dtype=torch.float64).square(),
        torch.linalg.vector_norm(V, ord=4, dim=0, dtype=torch.float64).pow(4),
        weighted,
    ])  # fmt: skip
    sums = total(sums).cpu()
    root_n = float(sums[0].sqrt())
    try:
        for j in range(m):
            square, fourth, along = float(sums[1 + j]), float(sums[1 + m + j]), float(sums[1 + 2 * m + j])
            if square == 0.0 or fourth == 0.0:
                continue  # H 0 = 0
            size = (fourth / square) ** 0.5  # a(v): the energy-weighted RMS size of v's entries
            scale = (along / square) ** 0.5 + 1.0 / root_n  # w(v): the RMS of the weights where v sits, floored
            h = _STEP_FRACTION * eps * scale / size
            parts = V[:, j].split(numels)
            col = out[:, j]
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for t, s, d in zip(targets, saved, parts, strict=True):
                        t.copy_(s)
                        t.add_(d.view(t.shape).to(t.dtype), alpha=sign * h)
                grads = gradient()
                for i, g in enumerate(grads):
                    if g is not None:
                        col[offsets[i] : offsets[i + 1]].add_(g.detach().reshape(-1).to(col.dtype), alpha=sign)
                del grads
            col.div_(2.0 * h)
    finally:
        with torch.no_grad():
            for t, s in zip(targets, saved, strict=True):
                t.copy_(s)
    return out.to(V.dtype)
