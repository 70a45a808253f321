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


# ---------------------------------------------------------------------------------------------- block Lanczos
_BULK = torch.linspace(-1.0, 3.0, 140, dtype=torch.float64)


@pytest.mark.parametrize(
    "top",
    [[9.0, 9.0, 7.0, 5.0], [9.0, 9.0, 9.0, 5.0], [9.0 + 1e-6, 9.0, 9.0 - 1e-6, 7.0], [6.0, 6.0, 4.0, 4.0]],
    ids=["pair", "triple", "cluster-1e-6", "two-pairs"],
)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_block_lanczos_returns_every_copy_of_a_repeated_eigenvalue(top, k):
    A = spectrum_matrix(torch.cat([torch.tensor(top, dtype=torch.float64), _BULK]))
    want = torch.linalg.eigvalsh(A).flip(0)[:k]
    res = lanczos(DenseOperator(A), k=k, tol=1e-10, max_iter=150)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(res.eigenvectors.T @ res.eigenvectors, torch.eye(k, dtype=torch.float64))
    assert (A @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0).max() < 1e-7
    # Single-vector Lanczos (block_size=1) cannot see a second copy (in exact arithmetic; rounding lets it surface
    # after many products): at the callbacks' tol it returns a wrong k-th value, the block does not.
    if top.count(top[0]) > 1 and k <= top.count(top[0]):
        single = lanczos(DenseOperator(A), k=k, tol=1e-2, max_iter=150, block_size=1)
        assert (single.eigenvalues - want).abs().max() > 1.0
        block = lanczos(DenseOperator(A), k=k, tol=1e-2, max_iter=150)
        torch.testing.assert_close(block.eigenvalues, want, rtol=1e-3, atol=0)


def _boring_problem(loss: str):
    """``Linear(32, 2)`` as in Lightning's BoringModel, float64, batch 64: its MSE against ones (BoringModel's own
    loss: the Hessian is two identical blocks, every eigenvalue twice) or a cross-entropy."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 2).double()
    x = torch.randn(64, 32, dtype=torch.float64)
    y = torch.randint(0, 2, (64,))

    def loss_fn(m, b):
        out = m(b[0])
        if loss == "mse":
            return torch.nn.functional.mse_loss(out, torch.ones_like(out))
        return torch.nn.functional.cross_entropy(out, b[1])

    return layer, loss_fn, (x, y)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_block_lanczos_on_the_boring_model_hessian(loss):
    layer, loss_fn, batch = _boring_problem(loss)
    op = HessianOperator(layer, loss_fn, batch)
    eigs = torch.linalg.eigvalsh(op.matmat(torch.eye(op.numel, dtype=torch.float64))).flip(0)
    if loss == "mse":
        torch.testing.assert_close(eigs[0:6:2], eigs[1:6:2], rtol=1e-12, atol=0)  # exact pairs
    for tol, rtol in [(1e-10, 1e-9), (1e-2, 1e-3)]:  # the tracker's default tol: Ritz errors ~ tol^2
        res = lanczos(op, k=3, tol=tol, max_iter=66)
        torch.testing.assert_close(res.eigenvalues, eigs[:3], rtol=rtol, atol=0)


def test_block_lanczos_warm_start_restarts_and_exhaustion():
    A = spectrum_matrix(torch.cat([torch.tensor([9.0, 9.0, 7.0], dtype=torch.float64), _BULK]))
    want = torch.linalg.eigvalsh(A).flip(0)[:3]
    cold = lanczos(DenseOperator(A), k=3, tol=1e-8, max_iter=150)
    # A warm start from the previous eigenvectors (a slightly different operator), whole or one column.
    E = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    previous = lanczos(DenseOperator(A + 1e-4 * (E + E.T)), k=3, tol=1e-8, max_iter=150).eigenvectors
    warm = lanczos(DenseOperator(A), k=3, tol=1e-8, max_iter=150, init=previous)
    part = lanczos(DenseOperator(A), k=3, tol=1e-8, max_iter=150, init=previous[:, 0])
    for res in (warm, part):
        torch.testing.assert_close(res.eigenvalues, want, rtol=1e-7, atol=0)
    assert warm.num_matvecs < cold.num_matvecs
    # Thick restarts with a basis of k + b + 1 vectors: the same values, more products.
    small = lanczos(DenseOperator(A), k=3, tol=1e-8, max_iter=400, max_basis=7)
    torch.testing.assert_close(small.eigenvalues, want, rtol=1e-7, atol=0)
    assert small.converged and small.num_matvecs > cold.num_matvecs
    # A block larger than what is left of the space, and k = numel: every eigenvalue, exactly.
    eigs = torch.tensor([3.0, 3.0, -2.0, 0.0, 5.0], dtype=torch.float64)
    res = lanczos(DenseOperator(spectrum_matrix(eigs)), k=5, max_iter=50)
    torch.testing.assert_close(res.eigenvalues, eigs.sort(descending=True).values, rtol=0, atol=1e-10)
    ident = lanczos(DenseOperator(torch.eye(10, dtype=torch.float64)), k=4)
    torch.testing.assert_close(ident.eigenvalues, torch.ones(4, dtype=torch.float64))


def test_block_lanczos_smallest_and_float32():
    A = spectrum_matrix(torch.cat([torch.tensor([-4.0, -4.0, -3.0], dtype=torch.float64), _BULK]))
    low = lanczos(DenseOperator(A), k=2, which="smallest", tol=1e-10, max_iter=150)
    torch.testing.assert_close(low.eigenvalues, torch.tensor([-4.0, -4.0], dtype=torch.float64), rtol=1e-9, atol=0)
    res = lanczos(DenseOperator(A.neg().float()), k=2, tol=1e-5, max_iter=150)
    assert res.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues, torch.tensor([4.0, 4.0], dtype=torch.float64), rtol=1e-4, atol=0)


def test_block_bad_arguments():
    op = DenseOperator(torch.eye(6, dtype=torch.float64))
    for kwargs, pattern in [
        ({"block_size": 0}, "`block_size` must.*0"),
        ({"block_size": 7}, "block_size must.*7"),
        ({"k": 2, "max_basis": 4}, "max_basis.*4"),
        ({"k": 2, "init": torch.ones(6, 3, dtype=torch.float64)}, "at most block_size=2.*3"),
        ({"k": 2, "init": torch.zeros(6, 2, dtype=torch.float64)}, "init"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            lanczos(op, **kwargs)
