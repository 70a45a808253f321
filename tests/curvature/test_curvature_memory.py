"""Bounded memory of the curvature estimators: thick-restarted Lanczos, windowed SLQ, budgets in the callbacks."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from lightning_gd.curvature import DenseOperator, hutchinson_trace, lanczos, spectral_density
from lightning_gd.curvature._krylov import _LanczosProcess
from tests.helpers.hessian import exact_hessian
from tests.helpers.models import TinyClassifier, classification_loader
from tests.helpers.trainer import quiet_trainer


def _spectrum_matrix(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), dtype=torch.float64, generator=g))
    return (Q * eigs) @ Q.T


def _operator(n: int = 200) -> tuple[DenseOperator, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    eigs = torch.randn(n, dtype=torch.float64, generator=g) ** 3  # heavy tails, a gap at both ends
    return DenseOperator(_spectrum_matrix(eigs)), eigs.sort().values


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_thick_restarted_lanczos_matches_eigvalsh(which):
    op, eigs = _operator()
    full = lanczos(op, k=2, which=which, tol=1e-10, max_iter=200)
    bounded = lanczos(op, k=2, which=which, tol=1e-10, max_iter=200, max_basis=5)
    want = eigs.flip(0)[:2] if which == "largest" else eigs[:2]
    for res in (full, bounded):
        assert res.converged
        torch.testing.assert_close(res.eigenvalues, want, rtol=1e-9, atol=1e-9)
        A = op.matmat(torch.eye(op.numel, dtype=torch.float64))
        residual = A @ res.eigenvectors - res.eigenvectors * res.eigenvalues
        assert residual.norm(dim=0).max().item() < 1e-7
        torch.testing.assert_close(res.eigenvectors.T @ res.eigenvectors, torch.eye(2, dtype=torch.float64))
    assert bounded.num_matvecs > full.num_matvecs  # the restarts cost products, not accuracy


def test_lanczos_process_never_stores_more_than_max_basis():
    op, eigs = _operator()
    proc = _LanczosProcess(op, torch.ones(op.numel, dtype=torch.float64), capacity=300, max_basis=6)
    for _ in range(60):
        proc.step()
        if proc.full:
            theta, S = torch.linalg.eigh(proc.projected())
            proc.thick_restart(S[:, -3:], theta[-3:])
        else:
            proc.advance()
        assert sum(block.shape[0] for block in proc._blocks) <= 6
    assert proc.num_restarts >= 10 and proc.num_matvecs == 60
    # A Q = Q H + w e^T still holds after the restarts, with an orthonormal Q.
    proc.step()
    Q = torch.cat(proc._in_use())
    torch.testing.assert_close(Q @ Q.T, torch.eye(Q.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
    A = op.matmat(torch.eye(op.numel, dtype=torch.float64))
    lhs = A @ Q.T - Q.T @ proc.projected()
    lhs[:, -1] -= proc.w
    assert lhs.abs().max().item() < 1e-10
    assert proc.projected().max().item() <= eigs.max().item() + 1e-10


def test_bad_max_basis_is_rejected():
    op, _ = _operator(20)
    with pytest.raises(ValueError, match="max_basis"):
        lanczos(op, k=2, max_basis=3)
    with pytest.raises(ValueError, match="max_basis"):
        spectral_density(op, max_basis=1)


def test_windowed_density_matches_full_reorthogonalisation():
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([-1.0 + 0.01 * torch.randn(120, generator=g), 3.0 + 0.01 * torch.randn(80, generator=g)])
    op = DenseOperator(_spectrum_matrix(eigs.double()))
    full = spectral_density(op, num_runs=2, num_steps=40, sigma=0.1)
    windowed = spectral_density(op, num_runs=2, num_steps=40, sigma=0.1, max_basis=3)
    # Ghost copies may appear without full reorthogonalisation; they only split weights: the density agrees.
    assert (full.density - windowed.density).abs().max().item() < 0.02 * full.density.max().item()
    torch.testing.assert_close(windowed.weights.sum(dim=1), torch.ones(2, dtype=torch.float64))
    assert windowed.nodes.max().item() == pytest.approx(eigs.max().item(), abs=1e-6)


def test_trace_chunks_do_not_change_the_estimate():
    op = DenseOperator(_spectrum_matrix(torch.linspace(-1.0, 4.0, 50, dtype=torch.float64)))
    slices = {"a": 20, "b": 30}
    op.param_names, op.param_numels = tuple(slices), tuple(slices.values())
    one = hutchinson_trace(op, num_probes=23, probes_per_matmat=1, per_param=True)
    ten = hutchinson_trace(op, num_probes=23, probes_per_matmat=10, per_param=True)
    assert one.value == pytest.approx(ten.value, rel=1e-12)
    assert one.per_param == pytest.approx(ten.per_param, rel=1e-12)
    plus = [hutchinson_trace(op, num_probes=30, method="hutch++", probes_per_matmat=p, per_param=True) for p in (1, 7)]
    assert plus[0].value == pytest.approx(plus[1].value, rel=1e-10)
    assert sum(plus[0].per_param.values()) == pytest.approx(plus[0].value, rel=1e-10)


@pytest.mark.parametrize(
    ("callback", "needed"),
    [
        (lambda b: SharpnessTracker(memory_budget=b, preconditioned=False), 5),  # basis 2k + 1, residual, Ritz vector
        (lambda b: SharpnessTracker(memory_budget=b, preconditioned=True), 9),  # + 4 for the preconditioner
        (lambda b: HessianTraceMonitor(memory_budget=b), 2),
        (lambda b: HessianTraceMonitor(memory_budget=b, method="hutch++", num_probes=30), 36),
    ],
)
def test_a_budget_too_small_for_one_product_fails_at_the_start_with_the_numbers(tmp_path, callback, needed):
    model = TinyClassifier(optimizer="adam")
    numel = sum(p.numel() for p in model.parameters())
    vector = 4 * numel  # float32
    budget = (needed - 1) * vector + vector // 2
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(tmp_path, callbacks=[callback(budget)], max_steps=4)
    with pytest.raises(MisconfigurationException) as err:
        trainer.fit(model, classification_loader())
    message = str(err.value)
    assert f"memory_budget={budget:,} bytes" in message and f"holds {needed - 1} parameter-sized vectors" in message
    assert f"{numel:,} entries x 4 bytes = {vector:,} bytes" in message and f"at least {needed} " in message
    assert trainer.global_step == 0 and all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # Exactly enough: fits and measures.
    ok = callback(needed * vector)
    quiet_trainer(tmp_path, callbacks=[ok], max_steps=2).fit(TinyClassifier(optimizer="adam"), classification_loader())


def test_a_small_budget_restarts_lanczos_and_keeps_the_accuracy(tmp_path):
    # 7 vectors: residual + 1 Ritz vector + a basis of 5, below the ~10 iterations a cold check takes here.
    model = TinyClassifier(batchnorm=False, dropout=0.0).double()
    numel = sum(p.numel() for p in model.parameters())
    seed_everything(0)
    tracker = SharpnessTracker(every_n_steps=2, max_overhead=None, memory_budget=7 * 8 * numel, tol=1e-4,
                               max_iter=200, plot=False, warm_start=False)  # fmt: skip
    trace = HessianTraceMonitor(every_n_steps=2, max_overhead=None, memory_budget=5 * 8 * numel, num_probes=9)
    batch = next(iter(classification_loader(n=16, batch_size=16)))
    batch = (batch[0].double(), batch[1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=16)
    quiet_trainer(tmp_path, callbacks=[tracker, trace], max_steps=2, precision="64-true").fit(model, loader)
    assert tracker._max_basis == 5 and trace._probes_per_matmat == 2
    exact = torch.linalg.eigvalsh(exact_hessian(model, batch)).max().item()  # no dropout, no BatchNorm: eval = train
    ((step, measured),) = tracker.history["sharpness/lambda_max"]
    assert step == 2 and measured == pytest.approx(exact, rel=1e-6)
    assert tracker.history["sharpness/num_hvps"][0][1] > 5  # it did restart
