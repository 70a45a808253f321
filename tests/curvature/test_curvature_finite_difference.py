"""Central-difference Hessian-vector products: accuracy against dense Hessians, the weights restored bit for bit,
no side effects, the ``hvp="auto"`` fallback, gradients from a callable (``.backward()``, a compiled module), and the
sharded probe draw."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gd.curvature import (
    FiniteDifferenceOperator,
    GGNOperator,
    HessianOperator,
    finite_difference_eps,
    finite_difference_error,
    lanczos,
)
from lightning_gd.curvature._utils import _gaussian, _rademacher
from tests.helpers.hessian import untouched


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def probes(n: int, m: int, seed: int = 1) -> Tensor:
    return torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_products_match_the_dense_hessian_float64(mode, cnn, cnn_hessian_eval, cnn_hessian_train):
    H = cnn_hessian_eval if mode == "eval" else cnn_hessian_train
    op = HessianOperator(cnn.model, cnn.loss_fn, cnn.batch, hvp="finite_difference", mode=mode)
    assert op.hvp_method == "finite_difference"
    V = probes(op.numel, 3)
    assert rel_err(op.matmat(V), H @ V) < 1e-8  # float64: error about eps^(2/3) = 4e-11, times the model's constants
    assert op.num_matvecs == 3
    assert torch.equal(op.matvec(V[:, 0]), op.matmat(V[:, :1])[:, 0])  # deterministic (one dropout mask)


def test_float32_products_and_eigenvalues_within_the_stated_error(mlp, mlp_hessian):
    model = mlp.model.float()
    batch = (mlp.batch[0].float(), mlp.batch[1])
    op = HessianOperator(model, mlp.loss_fn, batch, hvp="finite_difference")
    assert op._fd_eps == pytest.approx(finite_difference_eps(torch.float32))
    V = probes(op.numel, 4)
    assert rel_err(op.matmat(V.float()).double(), mlp_hessian @ V) < 1e-3
    exact = torch.linalg.eigvalsh(mlp_hessian)
    top = lanczos(op, tol=1e-6, max_iter=60).eigenvalues[0].item()
    bottom = lanczos(op, which="smallest", tol=1e-6, max_iter=60).eigenvalues[0].item()
    assert top == pytest.approx(exact[-1].item(), rel=1e-3) and bottom == pytest.approx(exact[0].item(), rel=1e-2)


def test_weights_are_restored_bit_for_bit_even_when_a_gradient_fails(cnn):
    model = cnn.model.float()
    batch = (cnn.batch[0].float(), cnn.batch[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # float32 weights: theta + h v - h v is not theta; the saved copy is.
    op = HessianOperator(model, cnn.loss_fn, batch, hvp="finite_difference")
    op.matmat(probes(op.numel, 2).float())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    calls = []

    def failing() -> list[Tensor]:
        calls.append(1)
        if len(calls) == 2:  # at theta - h v
            raise RuntimeError("boom")
        return [torch.zeros_like(p) for p in model.parameters()]

    fd = FiniteDifferenceOperator(model, failing)
    with pytest.raises(RuntimeError, match="boom"):
        fd.matvec(torch.ones(fd.numel))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_no_side_effects(mode, cnn):
    model = cnn.model
    model.train()
    model.head.eval()
    check = untouched(model)  # gradients of 0.5, buffers, modes and the RNG state, recorded

    def gradient_fn() -> list[Tensor | None]:
        cnn.loss_fn(model, cnn.batch).backward()  # accumulates into .grad: the operator clears it around the call
        return [p.grad for p in model.parameters()]

    for op in (
        HessianOperator(model, cnn.loss_fn, cnn.batch, hvp="finite_difference", mode=mode),
        FiniteDifferenceOperator(model, gradient_fn, loss_fn=lambda: cnn.loss_fn(model, cnn.batch), mode=mode),
    ):
        op.matmat(probes(op.numel, 2))
        op.gradient()
        op.loss()
    check()


def test_backward_gradients_give_the_exact_products(cnn, cnn_hessian_train):
    model = cnn.model

    def gradient_fn() -> list[Tensor | None]:
        cnn.loss_fn(model, cnn.batch).backward()
        return [p.grad for p in model.parameters()]

    op = FiniteDifferenceOperator(model, gradient_fn, mode="train")
    assert op.allreduce is None and op.global_numel == op.numel == 81 and op.segments == ((0, 81),)
    V = probes(op.numel, 2)
    assert rel_err(op.matmat(V), cnn_hessian_train @ V) < 1e-8
    exact = HessianOperator(model, cnn.loss_fn, cnn.batch, mode="train")
    assert rel_err(op.gradient(), exact.gradient()) < 1e-12


class _Square(torch.autograd.Function):
    """Neither a double backward nor forward-mode AD: stands in for such kernels (custom CUDA ops, ...)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):  # no setup_context: torch.func refuses the Function
        if torch.is_grad_enabled():  # a create_graph backward (double backward's first pass): refuse too
            raise RuntimeError("_Square has no double backward")
        (x,) = ctx.saved_tensors
        return 2 * x * g


def _square_loss(square):
    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y) + 0.1 * square(model(x)).mean()

    return loss_fn


def test_auto_falls_back_to_finite_differences_only_where_no_exact_method_works(mlp, caplog):
    V = probes(sum(p.numel() for p in mlp.model.parameters()), 2)
    for method in ("double_backward", "forward_over_reverse"):
        with pytest.raises(Exception):  # noqa: B017 - whatever autograd / torch.func raises
            HessianOperator(mlp.model, _square_loss(_Square.apply), mlp.batch, hvp=method).matmat(V)
    op = HessianOperator(mlp.model, _square_loss(_Square.apply), mlp.batch)
    with caplog.at_level("INFO", logger="lightning_gd.curvature.operator"):
        out = op.matmat(V)
    assert op.hvp_method == "finite_difference"
    failed = [r.getMessage().split(" HVP failed")[0] for r in caplog.records]
    assert failed == ["double_backward", "forward_over_reverse"]
    assert "using finite_difference" in caplog.records[-1].getMessage()
    reference = HessianOperator(mlp.model, _square_loss(lambda t: t * t), mlp.batch).matmat(V)
    assert rel_err(out, reference) < 1e-8
    # Where an exact method works, "auto" keeps it.
    assert HessianOperator(mlp.model, mlp.loss_fn, mlp.batch).matmat(V) is not None


def test_a_compiled_module_is_measured_through_its_compiled_graph(mlp, mlp_hessian):
    # Earlier tests compiled modules sharing this forward's code object: past dynamo's recompile limit it falls back
    # to eager silently, which has double backward. A fresh dynamo makes this test independent of the order.
    torch._dynamo.reset()
    compiled = torch.compile(mlp.model, backend="aot_eager")  # AOTAutograd: first-order backward only
    V = probes(mlp_hessian.shape[0], 2)
    with pytest.raises(RuntimeError, match="double backward"):
        HessianOperator(compiled, mlp.loss_fn, mlp.batch, hvp="double_backward").matmat(V)
    op = HessianOperator(compiled, mlp.loss_fn, mlp.batch, hvp="finite_difference")
    assert rel_err(op.matmat(V), mlp_hessian @ V) < 1e-8


def test_errors_and_the_stated_step(mlp):
    m, f, b = mlp.model, mlp.loss_fn, mlp.batch
    with pytest.raises(ValueError, match="fd_eps.*0"):
        HessianOperator(m, f, b, hvp="finite_difference", fd_eps=0)
    with pytest.raises(ValueError, match="hvp must be one of.*'finite_difference'"):
        GGNOperator(m, lambda model, batch: (model(batch[0]), batch[1]), "cross_entropy", b, hvp="finite_difference")
    with pytest.raises(ValueError, match="gradient_fn must be callable"):
        FiniteDifferenceOperator(m, None)
    with pytest.raises(ValueError, match="needs the loss_fn"):
        FiniteDifferenceOperator(m, lambda: []).loss()
    with pytest.raises(ValueError, match="must return 4 gradients, got 1"):
        FiniteDifferenceOperator(m, lambda: [None]).matvec(torch.ones(sum(p.numel() for p in m.parameters())))
    with pytest.raises(ValueError, match="not a range"):
        FiniteDifferenceOperator(m, lambda: [], shard_fn=lambda p: (p, 1))
    # The step and the error it buys: eps^(1/3) and eps^(2/3) of the dtype.
    assert finite_difference_eps(torch.float64) == pytest.approx(6.06e-6, rel=1e-3)
    assert finite_difference_error(torch.float32) == pytest.approx(2.44e-5, rel=1e-2)
    assert finite_difference_error(torch.bfloat16) == pytest.approx(0.0394, rel=1e-2)


class _Shards:
    """A rank holding two ranges of a 50-entry space (a non-contiguous part, as with several sharded parameters)."""

    numel, global_numel, dtype, device = 12, 50, torch.float32, torch.device("cpu")
    segments = ((3, 7), (40, 5))

    @staticmethod
    def allreduce(t: Tensor) -> Tensor:
        return t


@pytest.mark.parametrize("draw", [_rademacher, _gaussian])
@pytest.mark.parametrize("rows", [1, 3])
def test_sharded_draws_are_the_global_draw_at_the_rank_s_positions(draw, rows, monkeypatch):
    monkeypatch.setattr("lightning_gd.curvature._utils._DRAW_CHUNK", 32)  # many chunks, ranges across chunk ends
    index = torch.cat([torch.arange(3, 10), torch.arange(40, 45)])

    class Whole:
        numel, dtype, device = 50, torch.float32, torch.device("cpu")

    shape = (rows, 12) if rows > 1 else (12,)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    part = draw(shape, gen_a, _Shards())
    whole = draw((rows, 50) if rows > 1 else (50,), gen_b, Whole())
    assert torch.equal(part, whole[..., index])
    assert torch.equal(gen_a.get_state(), gen_b.get_state())  # the next draw is the same too


def test_a_half_precision_model_gets_the_coarse_error_it_is_told(mlp, mlp_hessian):
    model = mlp.model.to(torch.bfloat16)
    batch = (mlp.batch[0].to(torch.bfloat16), mlp.batch[1])

    def loss_fn(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(b[0]).float(), b[1])

    op = HessianOperator(model, loss_fn, batch, hvp="finite_difference")
    assert op._fd_eps == pytest.approx(finite_difference_eps(torch.bfloat16))
    top = lanczos(op, tol=1e-3, max_iter=40).eigenvalues[0].item()
    exact = torch.linalg.eigvalsh(mlp_hessian)[-1].item()
    # bfloat16 weights: the stated error is eps^(2/3) = 3.9%; the model's constants give a few times that at most.
    assert abs(top / exact - 1) < 5 * finite_difference_error(torch.bfloat16)
