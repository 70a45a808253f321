"""The step check of central-difference products: step-independent products pass (and their Rayleigh quotient is the
dense Hessian's), products across a kink fail, on hand-built kinks and on torchvision's ResNet-18; nothing is
perturbed; bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gd.curvature import (
    DenseOperator,
    HessianOperator,
    PreconditionedOperator,
    ReducedOperator,
    StepCheck,
    finite_difference_check,
)
from lightning_gd.curvature.step_check import DEFAULT_STEP_TOLERANCE, uses_central_differences
from tests.helpers.hessian import untouched


def test_a_smooth_model_passes_and_its_rayleigh_quotient_is_the_dense_hessians(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch, hvp="finite_difference")
    v = torch.randn(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = [p.detach().clone() for p in mlp.model.parameters()]
    eps = op._fd_eps
    check = untouched(mlp.model)
    result = finite_difference_check(op, v)
    check()
    assert all(torch.equal(a, b) for a, b in zip(weights, mlp.model.parameters(), strict=True))
    assert op._fd_eps == eps  # the doubled step is undone
    assert isinstance(result, StepCheck) and result.passed and result.num_matvecs == 2
    assert result.change < 1e-6  # float64, smooth: truncation ~ h^2
    exact = float(v @ mlp_hessian @ v / (v @ v))
    assert result.rayleigh == pytest.approx(exact, rel=1e-8)
    assert result.rayleigh_doubled == pytest.approx(exact, rel=1e-6)
    assert result.tolerance == DEFAULT_STEP_TOLERANCE
    assert op.num_matvecs == 2


def test_wrapped_operators_are_checked_through_their_wrappers(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch, hvp="finite_difference")
    d = torch.linspace(0.5, 2.0, op.numel, dtype=torch.float64)
    wrapped = ReducedOperator(PreconditionedOperator(op, d), lambda t: t)
    v = torch.ones(op.numel, dtype=torch.float64)
    result = finite_difference_check(wrapped, v)
    s = d.rsqrt()
    exact = float((s * v) @ mlp_hessian @ (s * v) / (v @ v))  # P^-1/2 H P^-1/2
    assert result.passed and result.rayleigh == pytest.approx(exact, rel=1e-8)
    assert uses_central_differences(wrapped)


def _kinked() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A ReLU unit exactly at its kink: sample 0 is the zero input and the first hidden bias is 0, so that unit's
    pre-activation is exactly 0 there (double backward takes ReLU'(0) = 0; any step crosses)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].bias[0] = 0.0
    x = torch.randn(8, 3, dtype=torch.float64)
    x[0] = 0.0
    return model, (x, torch.randn(8, 1, dtype=torch.float64))


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_product_across_a_kink_fails(dtype):
    model, (x, y) = _kinked()
    model = model.to(dtype)
    op = HessianOperator(model, _mse, (x.to(dtype), y.to(dtype)), hvp="finite_difference")
    result = finite_difference_check(op)  # a Rademacher probe: the kinked bias moves
    # The jump of the bias's gradient over 2h grows as 1/h: doubling the step halves that part of the product.
    assert not result.passed and result.change > 0.2
    # The exact product (ReLU'(0) = 0) is step-independent: the failure is the kink, not the probe.
    exact = HessianOperator(model, _mse, (x.to(dtype), y.to(dtype)), hvp="double_backward")
    assert not uses_central_differences(exact)


def test_torchvision_resnet18_fails_in_float32_and_its_smooth_twin_passes():
    """A model nobody here wrote: ReLU and max-pooling put kinks within any usable step of the weights (the
    product along a probe is 3-33x off at steps 1e-2..1e-6, in float64 too: benchmarks/RESULTS.md); with GELU and
    average pooling the same network's products are step-independent."""
    torchvision = pytest.importorskip("torchvision")

    def resnet(smooth: bool) -> nn.Module:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval()
        if smooth:
            for module in list(model.modules()):
                for name, child in module.named_children():
                    if isinstance(child, nn.ReLU):
                        setattr(module, name, nn.GELU())
            model.maxpool = nn.AvgPool2d(3, 2, 1)
        return model

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 7, 3, 0])

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    changes = {}
    for smooth in (False, True):
        op = HessianOperator(resnet(smooth), loss, (x, y), hvp="finite_difference")
        changes[smooth] = finite_difference_check(op, generator=torch.Generator().manual_seed(3)).change
    assert changes[False] > 0.2, changes  # measured 0.67
    assert changes[True] < DEFAULT_STEP_TOLERANCE / 5, changes


def test_bad_input_is_refused(mlp):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch, hvp="finite_difference")
    for bad in (0, -1.0, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ValueError, match="tolerance"):
            finite_difference_check(op, tolerance=bad)
    with pytest.raises(ValueError, match=r"v must be a tensor of shape \(51,\)"):
        finite_difference_check(op, torch.ones(3, dtype=torch.float64))
    exact = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch, hvp="double_backward")
    with pytest.raises(ValueError, match="central differences.*HessianOperator computing by 'double_backward'"):
        finite_difference_check(exact)
    with pytest.raises(ValueError, match="DenseOperator"):
        finite_difference_check(DenseOperator(torch.eye(3)))


def test_auto_decides_on_the_first_product_then_is_checked(mlp):
    """An ``hvp="auto"`` operator whose exact methods work is exact: refused, after its first product decided."""
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    assert not uses_central_differences(op)
    with pytest.raises(ValueError, match="double_backward"):
        finite_difference_check(op)
    assert op.hvp_method == "double_backward"
