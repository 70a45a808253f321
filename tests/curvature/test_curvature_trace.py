"""Hutchinson, Hutch++ and XTrace trace estimates against exact Hessian traces."""

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


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
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
    with pytest.raises(ValueError, match="num_probes.*3"):
        hutchinson_trace(op, num_probes=3, method="xtrace")
    with pytest.raises(ValueError, match="probes_per_matmat.*0"):
        hutchinson_trace(op, probes_per_matmat=0)
    with pytest.raises(ValueError, match="per_param.*DenseOperator"):
        hutchinson_trace(op, per_param=True)
    with pytest.raises(ValueError, match="generator.*3"):
        hutchinson_trace(op, generator=3)


def _xtrace_by_definition(A: torch.Tensor, Om: torch.Tensor) -> float:
    """Epperly, Tropp & Webber 2024, Algorithm 1 written out: estimate i = tr(Q_i^T A Q_i) + w_i^T (I - P_i) A
    (I - P_i) w_i with Q_i an orthonormal basis of A Om without column i; the mean over i."""
    Y = A @ Om
    ests = []
    for i in range(Om.shape[1]):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1))
        u = Om[:, i] - Qi @ (Qi.T @ Om[:, i])
        ests.append((torch.trace(Qi.T @ A @ Qi) + u @ A @ u).item())
    return sum(ests) / len(ests)


def _spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), dtype=torch.float64, generator=g))
    return (Q * eigs) @ Q.T


def test_xtrace_is_algorithm_1_of_the_paper():
    A = _spectrum(torch.cat([torch.tensor([50.0, 30.0, 20.0, 10.0, 8.0]), torch.linspace(-0.5, 0.5, 95)]).double())
    for m, seed in [(4, 0), (11, 1), (20, 2)]:  # an odd budget leaves one product unused
        est = hutchinson_trace(DenseOperator(A), m, method="xtrace", generator=torch.Generator().manual_seed(seed))
        assert est.num_matvecs == 2 * (m // 2)
        gen = torch.Generator().manual_seed(seed)  # the same Rademacher probes
        Om = (torch.randint(0, 2, (m // 2, 100), generator=gen, dtype=torch.float64) * 2 - 1).T
        assert est.value == pytest.approx(_xtrace_by_definition(A, Om), rel=1e-12)


def test_xtrace_is_unbiased():
    A = _spectrum(
        torch.cat([10.0 / torch.arange(1, 41, dtype=torch.float64), 0.05 * torch.rand(80, dtype=torch.float64)])
    )
    exact = torch.trace(A).item()
    values = []
    for seed in range(200):
        est = hutchinson_trace(DenseOperator(A), 24, method="xtrace", generator=torch.Generator().manual_seed(seed))
        values.append(est.value)
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert abs(mean - exact) < 4 * sd / math.sqrt(len(values))


def test_per_param_xtrace_sums_to_the_estimate_and_is_unbiased(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    slices = block_slices(op)
    runs = [hutchinson_trace(op, 20, method="xtrace", per_param=True, generator=torch.Generator().manual_seed(s))
            for s in range(60)]  # fmt: skip
    for est in runs:
        assert math.isclose(sum(est.per_param.values()), est.value, rel_tol=1e-10, abs_tol=1e-12)
    for name, sl in slices.items():
        samples = torch.tensor([est.per_param[name] for est in runs], dtype=torch.float64)
        exact = torch.trace(mlp_hessian[sl, sl]).item()
        assert abs(samples.mean().item() - exact) < 4 * samples.std().item() / math.sqrt(len(runs)) + 1e-10, name
    full = hutchinson_trace(op, 2 * op.numel, method="xtrace", per_param=True)  # a sketch of the whole space: exact
    for name, sl in slices.items():
        assert math.isclose(full.per_param[name], torch.trace(mlp_hessian[sl, sl]).item(), rel_tol=1e-8, abs_tol=1e-10)
