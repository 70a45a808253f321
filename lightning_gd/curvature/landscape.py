"""Loss landscapes: the loss along lines and planes through the parameters.

* Directions along Hessian eigenvectors, the plots of PyHessian (Yao et al. 2020, "PyHessian: Neural Networks
  Through the Lens of the Hessian", Fig. 1): near a point, the loss along a unit eigenvector ``v`` with eigenvalue
  ``lambda`` is ``L(theta) + t g^T v + lambda t^2 / 2 + O(t^3)``.
* Random directions with *filter normalization* (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the Loss
  Landscape of Neural Nets", Section 4): a Gaussian direction ``d`` whose every filter ``d_{i,j}`` (the slices
  along the first dimension of a weight: a convolution's output channels, a linear layer's rows) is rescaled to
  the norm of the weight's filter, ``d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||theta_{i,j}||``, so that the picture does
  not depend on the scale of each layer. One-dimensional parameters (biases, normalisation weights) get a zero
  direction (the paper's ``ignore='biasbn'``) unless asked otherwise.

Evaluating a grid moves the parameters in place and puts them back bit for bit afterwards (also after an
error). Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["filter_normalize", "loss_line", "loss_plane", "loss_surface", "random_direction"]

# Li et al.'s reference code adds this to a filter's norm, so that a zero filter of the direction stays zero.
_EPS = 1e-10


def filter_normalize(direction: Sequence[Tensor], params: Sequence[Tensor], ignore_1d: bool = True) -> list[Tensor]:
    """Scale each filter of ``direction`` to the norm of the matching filter of ``params`` (Li et al. 2018).

    A filter is a slice along the first dimension of a parameter with two or more dimensions.

    Args:
        direction: One tensor per parameter, shaped like it.
        params: The parameters.
        ignore_1d: Zero the direction of one-dimensional parameters (biases, normalisation weights), as the
            paper's ``ignore='biasbn'``; ``False`` sets it to the parameter itself (the paper's other choice).

    Returns:
        New tensors (the inputs are not modified), in the direction's dtype and device.

    Raises:
        ValueError: When the lists differ in length or a shape differs.

    Example::

        >>> import torch
        >>> w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> d = filter_normalize([torch.tensor([[1.0, 0.0], [2.0, 0.0]])], [w])[0]
        >>> d.norm(dim=1).tolist()  # each row scaled to the norm of w's row
        [5.0, 1.0]
    """
    _check_like("direction", direction, params)
    out = []
    for d, p in zip(direction, params, strict=True):
        p = p.detach().to(dtype=d.dtype, device=d.device)
        if d.dim() <= 1:
            out.append(torch.zeros_like(d) if ignore_1d else p.clone())
            continue
        d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
        p_norm = p.reshape(p.shape[0], -1).norm(dim=1)
        scale = (p_norm / (d_norm + _EPS)).reshape(-1, *([1] * (d.dim() - 1)))
        out.append(d * scale)
    return out


def random_direction(
    params: Sequence[Tensor], generator: torch.Generator | None = None, ignore_1d: bool = True
) -> list[Tensor]:
    """A Gaussian direction, filter-normalized (:func:`filter_normalize`), in the parameters' dtype and device.

    Args:
        params: The parameters.
        generator: Source of the Gaussian entries (drawn on its device, in float64, then cast, so the direction
            is the same on every device and in every dtype for one seed). ``None``: a fresh generator seeded
            with 0 (the global RNG is left untouched).
        ignore_1d: See :func:`filter_normalize`.

    Example::

        >>> import torch
        >>> conv = torch.nn.Conv2d(3, 4, 3)
        >>> d = random_direction([conv.weight], torch.Generator().manual_seed(0))[0]
        >>> torch.allclose(d.flatten(1).norm(dim=1), conv.weight.detach().flatten(1).norm(dim=1))
        True
    """
    gen = torch.Generator().manual_seed(0) if generator is None else generator
    raw = [
        torch.randn(p.shape, generator=gen, device=gen.device, dtype=torch.float64).to(dtype=p.dtype, device=p.device)
        for p in params
    ]
    return filter_normalize(raw, params, ignore_1d=ignore_1d)


def loss_surface(
    loss_fn: Callable[[], Tensor | float],
    params: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor]],
    coords: Tensor,
    callback: Callable[[int], None] | None = None,
) -> Tensor:
    """Evaluate ``loss_fn()`` at ``theta + sum_j coords[i, j] * directions[j]`` for every row ``i`` of ``coords``.

    Each point is set from the saved parameters (``p = theta + sum_j c_j d_j``, not by accumulated steps), so
    the points do not drift; afterwards (also after an error) every parameter is copied back from its saved
    value, bit for bit.

    Args:
        loss_fn: Returns the loss at the parameters' current values (e.g. a closure over a model and a batch).
        params: The parameters to move (in place).
        directions: ``m`` directions, each one tensor per parameter, shaped like it.
        coords: Shape ``(n, m)``: the points, in units of the directions.
        callback: Called with the number of points evaluated so far, after each one (a progress bar).

    Returns:
        The ``n`` losses, float64 on CPU.

    Raises:
        ValueError: On a direction that does not match ``params`` or ``coords`` of the wrong shape.
    """
    for j, direction in enumerate(directions):
        _check_like(f"directions[{j}]", direction, params)
    if not isinstance(coords, Tensor) or coords.ndim != 2 or coords.shape[1] != len(directions):
        shape = tuple(coords.shape) if isinstance(coords, Tensor) else type(coords).__name__
        raise ValueError(f"coords must be a tensor of shape (n, {len(directions)}), got {shape}")
    saved = [p.detach().clone() for p in params]
    # Directions in each parameter's dtype and device once, not at every point.
    dirs = [[d.to(dtype=p.dtype, device=p.device) for d, p in zip(ds, params, strict=True)] for ds in directions]
    losses = torch.empty(coords.shape[0], dtype=torch.float64)
    try:
        for i, point in enumerate(coords.tolist()):
            with torch.no_grad():
                for k, (p, base) in enumerate(zip(params, saved, strict=True)):
                    value = base.clone()
                    for c, direction in zip(point, dirs, strict=True):
                        if c != 0.0:
                            value.add_(direction[k], alpha=c)
                    p.copy_(value)
            loss = loss_fn()
            losses[i] = float(loss.detach().double().item() if isinstance(loss, Tensor) else loss)
            if callback is not None:
                callback(i + 1)
    finally:
        with torch.no_grad():
            for p, base in zip(params, saved, strict=True):
                p.copy_(base)
    return losses


def loss_line(
    loss_fn: Callable[[], Tensor | float],
    params: Sequence[Tensor],
    direction: Sequence[Tensor],
    ts: Tensor,
    callback: Callable[[int], None] | None = None,
) -> Tensor:
    """The loss at ``theta + t * direction`` for each ``t`` in ``ts`` (1-D); see :func:`loss_surface`.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> loss_line(lambda: (w**2).sum(), [w], [torch.tensor([1.0, 0.0])], torch.tensor([-1.0, 0.0, 1.0])).tolist()
        [4.0, 5.0, 8.0]
        >>> w.tolist()  # restored
        [1.0, 2.0]
    """
    ts = torch.as_tensor(ts, dtype=torch.float64).reshape(-1, 1)
    return loss_surface(loss_fn, params, [direction], ts, callback)


def loss_plane(
    loss_fn: Callable[[], Tensor | float],
    params: Sequence[Tensor],
    direction_x: Sequence[Tensor],
    direction_y: Sequence[Tensor],
    xs: Tensor,
    ys: Tensor,
    callback: Callable[[int], None] | None = None,
) -> Tensor:
    """The loss at ``theta + x * direction_x + y * direction_y`` on the grid ``xs`` x ``ys`` (2-D).

    Returns:
        Shape ``(len(ys), len(xs))``: row ``j``, column ``i`` holds the loss at ``(xs[i], ys[j])``, the layout of
        matplotlib's ``contour(xs, ys, Z)``. See :func:`loss_surface` for the rest.
    """
    xs = torch.as_tensor(xs, dtype=torch.float64).reshape(-1)
    ys = torch.as_tensor(ys, dtype=torch.float64).reshape(-1)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
    return loss_surface(loss_fn, params, [direction_x, direction_y], coords, callback).reshape(len(ys), len(xs))


def _check_like(name: str, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    if len(tensors) != len(params):
        raise ValueError(f"{name} must hold one tensor per parameter ({len(params)}), got {len(tensors)}")
    for i, (t, p) in enumerate(zip(tensors, params, strict=True)):
        if not isinstance(t, Tensor) or t.shape != p.shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}[{i}] must have the shape of parameter {i}, {tuple(p.shape)}, got {shape}")
