"""Lanczos extreme eigenpairs against dense eigendecompositions and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from lightning_gd.curvature import DenseOperator, EigResult, HessianOperator, lanczos


def spectrum_matrix(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), dtype=torch.float64, generator=g))
    return (Q * eigs) @ Q.T


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_hessian_extreme_eigenvalues(which, mlp, mlp_hessian):
    eigs = torch.linalg.eigvalsh(mlp_hessian)
    assert eigs[0] < 0 < eigs[-1]  # random init: an indefinite Hessian
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    res = lanczos(op, which=which, tol=1e-10)
    assert isinstance(res, EigResult) and res.converged
    expected = eigs[-1] if which == "largest" else eigs[0]
    assert abs(res.eigenvalues[0].item() - expected.item()) <= 1e-6 * abs(expected.item())
    y = res.eigenvectors[:, 0]
    assert torch.linalg.vector_norm(mlp_hessian @ y - res.eigenvalues[0] * y) < 1e-6 * abs(expected)
    assert res.num_matvecs == op.num_matvecs <= op.numel


def test_matches_scipy_eigsh(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    lin = LinearOperator(
        (op.numel, op.numel),
        matvec=lambda v: op.matvec(torch.from_numpy(np.ravel(v))).numpy(),
        dtype=np.float64,
    )
    ref = eigsh(lin, k=1, which="LA", tol=1e-12, return_eigenvectors=False)[0]
    assert lanczos(op, tol=1e-10).eigenvalues[0].item() == pytest.approx(ref, rel=1e-8)


def test_top_k_and_bottom_k_on_known_spectrum():
    eigs = torch.cat([torch.tensor([9.0, 7.0, 6.5]), torch.linspace(-2.0, 3.0, 97), torch.tensor([-5.0])])
    A = spectrum_matrix(eigs.double())
    res = lanczos(DenseOperator(A), k=3, tol=1e-10)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([9.0, 7.0, 6.5], dtype=torch.float64), rtol=1e-8, atol=0)
    residual = A @ res.eigenvectors - res.eigenvectors * res.eigenvalues
    assert residual.norm() < 1e-6
    torch.testing.assert_close(res.eigenvectors.T @ res.eigenvectors, torch.eye(3, dtype=torch.float64))
    low = lanczos(DenseOperator(A), k=2, which="smallest", tol=1e-10)
    torch.testing.assert_close(low.eigenvalues, torch.tensor([-5.0, -2.0], dtype=torch.float64), rtol=1e-8, atol=0)


def test_warm_start_needs_fewer_matvecs():
    eigs = torch.cat([torch.tensor([4.0]), torch.linspace(-1.0, 3.5, 149)]).double()
    A = spectrum_matrix(eigs)
    g = torch.Generator().manual_seed(5)
    E = torch.randn(150, 150, dtype=torch.float64, generator=g)
    previous = A + 1e-3 * (E + E.T)  # the "operator before the last training step"
    init = torch.linalg.eigh(previous).eigenvectors[:, -1]
    cold = lanczos(DenseOperator(A), tol=1e-8)
    warm = lanczos(DenseOperator(A), tol=1e-8, init=init)
    assert cold.converged and warm.converged
    assert warm.eigenvalues[0].item() == pytest.approx(4.0, rel=1e-7)
    assert warm.num_matvecs < cold.num_matvecs


def test_invariant_subspace_breakdown_and_small_operators():
    # Identity: the Krylov space is invariant after one step; k=3 needs restarts.
    res = lanczos(DenseOperator(torch.eye(10, dtype=torch.float64)), k=3)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.ones(3, dtype=torch.float64))
    # Three distinct eigenvalues in 40 dimensions: breakdown after 3 steps, still exact.
    eigs = torch.tensor([2.0, -1.0, 0.5]).repeat_interleave(torch.tensor([10, 20, 10])).double()
    res = lanczos(DenseOperator(spectrum_matrix(eigs)), k=1, which="smallest", tol=1e-12)
    assert res.converged and res.num_matvecs <= 4
    assert res.eigenvalues[0].item() == pytest.approx(-1.0, rel=1e-10)
    # numel below max_iter and k = numel: every eigenvalue.
    eigs = torch.tensor([3.0, 1.0, -2.0, 0.0, 5.0], dtype=torch.float64)
    res = lanczos(DenseOperator(spectrum_matrix(eigs)), k=5, max_iter=50)
    torch.testing.assert_close(res.eigenvalues, eigs.sort(descending=True).values, rtol=0, atol=1e-10)
    # An init that is an exact eigenvector stops at once.
    res = lanczos(DenseOperator(torch.diag(eigs)), init=torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))
    assert res.converged and res.num_matvecs == 1 and res.eigenvalues[0].item() == 5.0


def test_not_converged_and_rng_untouched():
    A = spectrum_matrix(torch.linspace(0.0, 1.0, 200).double())
    rng = torch.get_rng_state()
    res = lanczos(DenseOperator(A), tol=1e-12, max_iter=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not res.converged and res.num_matvecs == 5
    again = lanczos(DenseOperator(A), tol=1e-12, max_iter=5)
    assert torch.equal(res.eigenvalues, again.eigenvalues)


def test_float32_operator():
    A = spectrum_matrix(torch.linspace(-1.0, 2.0, 50).double()).float()
    res = lanczos(DenseOperator(A), tol=1e-5)
    assert res.eigenvectors.dtype == torch.float32
    assert res.eigenvalues[0].item() == pytest.approx(2.0, rel=1e-4)


def test_bad_arguments():
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    for kwargs, pattern in [
        ({"k": 0}, "`k` must.*0"),
        ({"k": 5}, "k must.*5"),
        ({"which": "biggest"}, "which.*'biggest'"),
        ({"tol": 0.0}, "tol.*0.0"),
        ({"tol": -1}, "tol.*-1"),
        ({"max_iter": 0}, "max_iter.*0"),
        ({"k": 3, "max_iter": 2}, "max_iter.*2"),
        ({"init": torch.zeros(3)}, "init.*3"),
        ({"init": torch.zeros(4)}, "init"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            lanczos(op, **kwargs)
