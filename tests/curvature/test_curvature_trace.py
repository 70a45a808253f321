"""Hutchinson and Hutch++ trace estimates against exact Hessian traces."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gd.curvature import DenseOperator, HessianOperator, TraceEstimate, hutchinson_trace


def block_slices(op: HessianOperator) -> dict[str, slice]:
    out, offset = {}, 0
    for name, n in zip(op.param_names, op.param_numels, strict=True):
        out[name] = slice(offset, offset + n)
        offset += n
    return out


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_three_stderr(method, mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    est = hutchinson_trace(op, num_probes=30, method=method, generator=torch.Generator().manual_seed(0))
    exact = torch.trace(mlp_hessian).item()
    assert isinstance(est, TraceEstimate) and est.per_param is None
    assert est.num_matvecs == 30 and op.num_matvecs == 30
    assert 0 < est.stderr < abs(exact)
    assert abs(est.value - exact) <= 3 * est.stderr


def test_hutch_plus_plus_beats_hutchinson_on_low_rank():
    # Fast-decaying spectrum: the sketch captures almost everything.
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))
    A = (Q * (10.0 ** -torch.arange(60, dtype=torch.float64) / 5)) @ Q.T
    exact = torch.trace(A).item()
    plain = hutchinson_trace(DenseOperator(A), num_probes=30, generator=torch.Generator().manual_seed(1))
    plus = hutchinson_trace(
        DenseOperator(A), num_probes=30, method="hutch++", generator=torch.Generator().manual_seed(1)
    )
    assert abs(plus.value - exact) < 1e-6 * exact < abs(plain.value - exact)
    assert plus.stderr < plain.stderr


def test_per_param_hutchinson(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    n = 200
    est = hutchinson_trace(op, num_probes=n, per_param=True, probes_per_matmat=50)
    assert list(est.per_param) == list(op.param_names)
    assert math.isclose(sum(est.per_param.values()), est.value, rel_tol=1e-10, abs_tol=1e-12)
    for name, s in block_slices(op).items():
        block = mlp_hessian[s, s]
        exact = torch.trace(block).item()
        # Rademacher variance of z^T B z is 2 * sum_{i != j} B_ij^2.
        var = 2 * (block.pow(2).sum() - block.diagonal().pow(2).sum()).item()
        assert abs(est.per_param[name] - exact) <= 4 * math.sqrt(var / n) + 1e-12, name


def test_per_param_hutch_plus_plus_is_exact_with_full_sketch(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    est = hutchinson_trace(op, num_probes=3 * op.numel, method="hutch++", per_param=True, probes_per_matmat=64)
    assert math.isclose(est.value, torch.trace(mlp_hessian).item(), rel_tol=1e-8)
    assert math.isclose(sum(est.per_param.values()), est.value, rel_tol=1e-10)
    for name, s in block_slices(op).items():
        assert math.isclose(est.per_param[name], torch.trace(mlp_hessian[s, s]).item(), rel_tol=1e-8, abs_tol=1e-10)


def test_reproducible_and_global_rng_untouched():
    A = DenseOperator(torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64)) + 0.1)
    rng = torch.get_rng_state()
    first, second = hutchinson_trace(A, num_probes=7), hutchinson_trace(A, num_probes=7, probes_per_matmat=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first.value == pytest.approx(second.value, rel=1e-12)  # same probes, chunked differently
    exact = hutchinson_trace(DenseOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))), num_probes=1)
    assert exact.value == 15.0 and math.isnan(exact.stderr)


def test_bad_arguments():
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"method.*'hutch\+'"):
        hutchinson_trace(op, method="hutch+")
    with pytest.raises(ValueError, match="num_probes.*0"):
        hutchinson_trace(op, num_probes=0)
    with pytest.raises(ValueError, match="num_probes.*2"):
        hutchinson_trace(op, num_probes=2, method="hutch++")
    with pytest.raises(ValueError, match="probes_per_matmat.*0"):
        hutchinson_trace(op, probes_per_matmat=0)
    with pytest.raises(ValueError, match="per_param.*DenseOperator"):
        hutchinson_trace(op, per_param=True)
    with pytest.raises(ValueError, match="generator.*3"):
        hutchinson_trace(op, generator=3)
