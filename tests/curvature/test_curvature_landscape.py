"""Loss landscapes: Li et al.'s filter normalization, the quadratic model along an eigenvector, exact restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gd.curvature import HessianOperator, lanczos
from lightning_gd.curvature.landscape import filter_normalize, loss_line, loss_plane, loss_surface, random_direction
from lightning_gd.curvature.operator import _unflatten


def test_filter_normalization_matches_li_et_al_on_a_conv_layer():
    # Li et al. 2018, Section 4: d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||theta_{i,j}|| for every filter j of layer i
    # (a convolution's output channel: all its input channels and taps); biases get a zero direction.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=3).double()
    params = [conv.weight, conv.bias]
    gen = torch.Generator().manual_seed(1)
    d = random_direction(params, gen)
    w = conv.weight.detach()
    for j in range(5):  # the definition, written out filter by filter
        assert torch.allclose(d[0][j].norm(), w[j].norm(), rtol=1e-9)
    assert torch.equal(d[1], torch.zeros(5, dtype=torch.float64))
    # The direction of each filter is the Gaussian draw's: only its length changed.
    raw = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for j in range(5):
        expected = raw[j] / raw[j].norm() * w[j].norm()
        torch.testing.assert_close(d[0][j], expected, rtol=1e-9, atol=0)  # up to the reference code's 1e-10
    # ignore_1d=False: the paper's other choice, the bias itself.
    kept = filter_normalize([torch.ones_like(w), torch.ones(5, dtype=torch.float64)], params, ignore_1d=False)
    assert torch.equal(kept[1], conv.bias.detach())


def test_filter_normalization_keeps_a_zero_filter_zero_and_refuses_bad_shapes():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    d = filter_normalize([torch.tensor([[0.0, 0.0], [1.0, 0.0]])], [w])[0]
    assert torch.equal(d[0], torch.zeros(2)) and d[1].norm().item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match=r"direction\[0\] must have the shape of parameter 0"):
        filter_normalize([torch.ones(3)], [w])
    with pytest.raises(ValueError, match="one tensor per parameter"):
        filter_normalize([], [w])


def test_line_along_the_top_eigenvector_matches_the_second_order_prediction(mlp, mlp_hessian):
    # L(theta + t v) = L + t g.v + lambda t^2 / 2 + O(t^3); its even part (L(t) + L(-t)) / 2 - L = lambda t^2 / 2
    # + O(t^4): with a dense-Hessian lambda_max, the remainders are of the next order in t.
    lam_max = torch.linalg.eigvalsh(mlp_hessian)[-1].item()
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    top = lanczos(op, k=1, tol=1e-10)
    assert top.eigenvalues[0].item() == pytest.approx(lam_max, rel=1e-9)
    v = top.eigenvectors[:, 0]
    params = list(op.params)
    loss0, slope = op.loss().item(), torch.dot(op.gradient(), v).item()
    ts = torch.tensor([-2e-2, -1e-2, -5e-3, 0.0, 5e-3, 1e-2, 2e-2], dtype=torch.float64)
    losses = loss_line(lambda: op.loss(), params, _unflatten(v, params), ts)
    assert losses[3].item() == loss0
    for t, value in zip(ts.tolist(), losses.tolist(), strict=True):
        predicted = loss0 + slope * t + 0.5 * lam_max * t * t
        assert abs(value - predicted) <= 0.5 * abs(t) * 0.5 * lam_max * t * t + 1e-14, (t, value, predicted)
    even = ((losses + losses.flip(0)) / 2 - loss0)[4:]
    relative = (even / (0.5 * lam_max * ts[4:] ** 2) - 1).abs()
    assert (relative <= 0.5 * ts[4:] ** 2).all(), relative  # O(t^2) relative: measured 0.08 t^2


def test_plane_layout_and_quadratic_closed_form():
    # A quadratic L(w) = w^T A w / 2: on the plane of two directions the loss is a quadratic form in (x, y).
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    dx, dy = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    xs, ys = torch.linspace(-1, 1, 5, dtype=torch.float64), torch.linspace(-2, 2, 3, dtype=torch.float64)
    Z = loss_plane(lambda: 0.5 * w @ A @ w, [w], [dx], [dy], xs, ys)
    assert Z.shape == (3, 5)  # rows y, columns x: matplotlib's contour(xs, ys, Z)
    for j, y in enumerate(ys.tolist()):
        for i, x in enumerate(xs.tolist()):
            p = torch.tensor([0.5 + x, -1.0 + y], dtype=torch.float64)
            assert Z[j, i].item() == pytest.approx((0.5 * p @ A @ p).item(), rel=1e-14)


def test_parameters_are_restored_bit_for_bit_also_after_an_error():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    direction = random_direction(params, torch.Generator().manual_seed(3), ignore_1d=False)
    seen = []
    loss_surface(lambda: model.weight.sum(), params, [direction], torch.tensor([[0.3], [-0.7]]), callback=seen.append)
    assert seen == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))

    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return torch.tensor(0.0)

    with pytest.raises(RuntimeError, match="boom"):
        loss_surface(failing, params, [direction], torch.tensor([[0.3], [0.5], [1.0]]))
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    with pytest.raises(ValueError, match=r"coords must be a tensor of shape \(n, 1\)"):
        loss_surface(failing, params, [direction], torch.zeros(3, 2))


def test_random_direction_is_the_same_for_one_seed_on_any_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = list(model.parameters())
    a = random_direction(params, torch.Generator().manual_seed(7))
    b = random_direction([p.double() for p in params], torch.Generator().manual_seed(7))
    assert all(torch.allclose(x.double(), y, rtol=1e-6) for x, y in zip(a, b, strict=True))
