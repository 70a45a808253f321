"""Gauss-Newton and empirical Fisher operators against their dense formulas on small float64 models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from lightning_gd.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator, LossSpec, lanczos
from tests.curvature.conftest import make_cnn

METHODS = ["double_backward", "forward_over_reverse"]


def _flat_fn(model, fn):
    """``fn(outputs_of(flat_params))`` with the model's trainable parameters as one flat vector."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs_of(flat, x):
        chunks = flat.split([s.numel() for s in shapes])
        params = {n: c.view(s) for (n, _), c, s in zip(named, chunks, shapes, strict=True)}
        return functional_call(model, params, (x,))

    return flat0, outputs_of


def _dense_ggn(model, x, targets, loss_of_outputs):
    """``J^T H_L J`` from the dense Jacobian of the outputs and the dense Hessian of the loss in the outputs."""
    flat0, outputs_of = _flat_fn(model, None)
    out = outputs_of(flat0, x).detach()
    J = jacrev(lambda f: outputs_of(f, x))(flat0).reshape(out.numel(), -1)
    H_L = hessian(lambda o: loss_of_outputs(o, targets))(out).reshape(out.numel(), out.numel())
    return J.T @ H_L @ J


def _dense_fisher(model, x, targets, term_losses, scale):
    """``G^T G * scale`` from the per-term gradients (the rows of ``G``) by a dense Jacobian."""
    flat0, outputs_of = _flat_fn(model, None)
    G = jacrev(lambda f: term_losses(outputs_of(f, x), targets))(flat0)
    return scale * G.T @ G


def _mlp(out=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    return model, x


def _eye(op):
    return torch.eye(op.numel, dtype=torch.float64)


@pytest.mark.parametrize("hvp", METHODS)
def test_ggn_matches_j_transpose_h_j_for_cross_entropy_mse_and_logistic(hvp):
    model, x = _mlp()
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    cases = [
        ("cross_entropy", y, lambda o, t: F.cross_entropy(o, t)),
        (LossSpec("cross_entropy", reduction="sum"), y, lambda o, t: F.cross_entropy(o, t, reduction="sum")),
        ("mse", torch.randn(12, 3, dtype=torch.float64), lambda o, t: F.mse_loss(o, t)),
        (LossSpec("mse", reduction="sum"), torch.randn(12, 3, dtype=torch.float64),
         lambda o, t: F.mse_loss(o, t, reduction="sum")),
        ("bce_with_logits", torch.rand(12, 3, dtype=torch.float64),
         lambda o, t: F.binary_cross_entropy_with_logits(o, t)),
        (nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1), y,
         lambda o, t: F.cross_entropy(o, t, ignore_index=2, label_smoothing=0.1)),
    ]  # fmt: skip
    for loss, targets, reference in cases:
        op = GGNOperator(model, lambda m, b: (m(b[0]), b[1]), loss, (x, targets), hvp=hvp)
        dense = _dense_ggn(model, x, targets, reference)
        torch.testing.assert_close(op.matmat(_eye(op)), dense, rtol=1e-10, atol=1e-12, msg=str(loss))
        assert torch.linalg.eigvalsh(dense).min() > -1e-12  # PSD
        torch.testing.assert_close(op.loss(), reference(model(x), targets))
        expected = torch.autograd.grad(reference(model(x), targets), list(model.parameters()))
        torch.testing.assert_close(op.gradient(), torch.cat([g.flatten() for g in expected]))


def test_ggn_is_the_hessian_of_a_model_linear_in_its_parameters():
    torch.manual_seed(1)
    model = nn.Linear(5, 4).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 4, (20,))
    ggn = GGNOperator(model, lambda m, b: (m(b[0]), b[1]), "cross_entropy", (x, y))
    hess = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    torch.testing.assert_close(ggn.matmat(_eye(ggn)), hess.matmat(_eye(hess)), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("hvp", METHODS)
def test_empirical_fisher_matches_g_transpose_g_over_n(hvp):
    model, x = _mlp()
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    op = EmpiricalFisherOperator(model, lambda m, b: (m(b[0]), b[1]), "cross_entropy", (x, y), hvp=hvp)
    dense = _dense_fisher(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"), 1 / 12)
    torch.testing.assert_close(op.matmat(_eye(op)), dense, rtol=1e-10, atol=1e-12)
    # MSE: a term is a row, its loss the mean over the row's 3 outputs; F.mse_loss is the mean of those terms.
    t = torch.randn(12, 3, dtype=torch.float64)
    op = EmpiricalFisherOperator(model, lambda m, b: (m(b[0]), b[1]), "mse", (x, t), hvp=hvp)
    dense = _dense_fisher(model, x, t, lambda o, tt: ((o - tt) ** 2).mean(dim=1), 1 / 12)
    torch.testing.assert_close(op.matmat(_eye(op)), dense, rtol=1e-10, atol=1e-12)
    # Ignored tokens count neither as terms nor in n.
    y_pad = y.clone()
    y_pad[:4] = -100
    op = EmpiricalFisherOperator(model, lambda m, b: (m(b[0]), b[1]), "cross_entropy", (x, y_pad), hvp=hvp)
    dense = _dense_fisher(model, x[4:], y[4:], lambda o, tt: F.cross_entropy(o, tt, reduction="none"), 1 / 8)
    torch.testing.assert_close(op.matmat(_eye(op)), dense, rtol=1e-10, atol=1e-12)


def test_operators_on_a_cnn_with_batchnorm_and_dropout_leave_the_model_as_found():
    problem = make_cnn()
    model, (x, y) = problem.model, problem.batch
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for cls in (GGNOperator, EmpiricalFisherOperator):
        for mode in ("eval", "train"):
            op = cls(model, lambda m, b: (m(b[0]), b[1]), "cross_entropy", (x, y), mode=mode)
            A = op.matmat(_eye(op))
            torch.testing.assert_close(A, A.T, rtol=1e-10, atol=1e-12)  # one dropout mask: a symmetric operator
            assert lanczos(op, which="smallest", tol=1e-8, max_iter=81).eigenvalues[0] > -1e-9
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("loss", ["l1", nn.L1Loss(), nn.NLLLoss(), nn.HuberLoss(), "cross-entropy"])
def test_unsupported_losses_are_refused_naming_the_loss_and_the_supported_ones(loss):
    model, x = _mlp()
    name = loss if isinstance(loss, str) else type(loss).__name__
    with pytest.raises(ValueError, match=rf"loss '{name}' is not supported.*cross_entropy.*mse.*bce_with_logits"):
        GGNOperator(model, lambda m, b: (m(b), b), loss, x)


def test_bad_shapes_and_options():
    model, x = _mlp()
    with pytest.raises(ValueError, match="weight"):
        GGNOperator(model, lambda m, b: (m(b), b), nn.CrossEntropyLoss(weight=torch.ones(3)), x)
    op = GGNOperator(model, lambda m, b: (m(b), torch.zeros(3)), "mse", x)
    with pytest.raises(ValueError, match="targets must have the outputs' shape"):
        op.matvec(torch.ones(op.numel, dtype=torch.float64))
    op = GGNOperator(model, lambda m, b: m(b), "mse", x)
    with pytest.raises(ValueError, match=r"output_fn must return \(outputs, targets\)"):
        op.matvec(torch.ones(op.numel, dtype=torch.float64))
