"""HessianOperator: exact products, method agreement, determinism and no side effects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gd.curvature import DenseOperator, HessianOperator, PreconditionedOperator
from tests.helpers.hessian import untouched

METHODS = ["double_backward", "forward_over_reverse", "auto"]


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def probes(n: int, m: int, seed: int = 1) -> Tensor:
    return torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_products_match_dense_hessian(kind, method, request, make_problem):
    p = make_problem(kind)
    H = request.getfixturevalue("mlp_hessian" if kind == "mlp" else "cnn_hessian_eval")
    op = HessianOperator(p.model, p.loss_fn, p.batch, hvp=method)
    assert op.numel == H.shape[0]
    V = probes(op.numel, 4)
    assert rel_err(op.matvec(V[:, 0]), H @ V[:, 0]) < 1e-10
    assert rel_err(op.matmat(V), H @ V) < 1e-10
    assert op.num_matvecs == 5
    expected = "double_backward" if method == "auto" else method  # CPU prefers double backward
    assert op.hvp_method == expected


def test_methods_agree(cnn):
    V = probes(81, 3)
    out = {m: HessianOperator(cnn.model, cnn.loss_fn, cnn.batch, hvp=m).matmat(V) for m in METHODS[:2]}
    assert rel_err(out["double_backward"], out["forward_over_reverse"]) < 1e-8


@pytest.mark.parametrize("method", METHODS[:2])
def test_train_mode_is_deterministic_and_exact(method, cnn, cnn_hessian_train, cnn_hessian_eval):
    op = HessianOperator(cnn.model, cnn.loss_fn, cnn.batch, hvp=method, mode="train")
    running = {n: b.clone() for n, b in cnn.model.named_buffers()}
    v = probes(op.numel, 1)[:, 0]
    first, second = op.matvec(v), op.matvec(v)
    assert torch.equal(first, second)  # same dropout mask in every forward
    assert rel_err(first, cnn_hessian_train @ v) < 1e-10
    assert rel_err(cnn_hessian_train @ v, cnn_hessian_eval @ v) > 1e-3  # train mode really differs
    V = probes(op.numel, 3)
    assert rel_err(op.matmat(V), cnn_hessian_train @ V) < 1e-10
    for name, buf in cnn.model.named_buffers():
        assert torch.equal(buf, running[name]), name


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("method", METHODS)
def test_no_side_effects(method, mode, cnn):
    model = cnn.model
    model.train()
    model.head.eval()  # mixed modes must come back exactly
    check = untouched(model)  # gradients of 0.5, buffers, modes and the RNG state, recorded
    model.conv.bias.requires_grad_(False)  # excluded by default, must stay frozen

    op = HessianOperator(model, cnn.loss_fn, cnn.batch, hvp=method, mode=mode)
    assert "conv.bias" not in op.param_names
    op.matvec(probes(op.numel, 1)[:, 0])
    op.matmat(probes(op.numel, 2))
    op.gradient()
    op.loss()

    check()
    assert not model.conv.bias.requires_grad
    assert model.bn.track_running_stats


def test_auto_falls_back_without_forward_mode_ad(mlp, mlp_hessian):
    class Square(torch.autograd.Function):  # no jvp / setup_context: torch.func cannot use it
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    def loss_fn(model, batch):
        return cross_entropy_sq(model, batch, Square.apply)

    op = HessianOperator(mlp.model, loss_fn, mlp.batch)
    assert op.hvp_method is None
    V = probes(op.numel, 2)
    out = op.matmat(V)
    assert op.hvp_method == "double_backward"  # preferred on CPU, and the one that works here
    reference = HessianOperator(mlp.model, lambda m, b: cross_entropy_sq(m, b, lambda t: t * t), mlp.batch)
    assert rel_err(out, reference.matmat(V)) < 1e-10
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.func raises
        HessianOperator(mlp.model, loss_fn, mlp.batch, hvp="forward_over_reverse").matmat(V)


def test_auto_falls_back_without_double_backward(mlp):
    class Cube(torch.autograd.Function):
        """Forward-mode AD (jvp) but no double backward: stands in for such ops in torch."""

        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            # create_graph=True backward (grad mode on) outside torch.func's transforms: refuse.
            if torch.is_grad_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(g):
                raise RuntimeError("Cube has no double backward")
            return 3 * x * x * g

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return 3 * x * x * t

    def cube_loss(model, batch, cube):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y) + 0.05 * cube(model(x)).pow(2).mean()

    V = probes(sum(p.numel() for p in mlp.model.parameters()), 2)
    with pytest.raises(RuntimeError, match="no double backward"):
        HessianOperator(mlp.model, lambda m, b: cube_loss(m, b, Cube.apply), mlp.batch, hvp="double_backward").matmat(V)
    op = HessianOperator(mlp.model, lambda m, b: cube_loss(m, b, Cube.apply), mlp.batch)
    out = op.matmat(V)
    assert op.hvp_method == "forward_over_reverse"  # double backward (preferred on CPU) raised
    reference = HessianOperator(mlp.model, lambda m, b: cube_loss(m, b, lambda t: t**3), mlp.batch)
    assert rel_err(out, reference.matmat(V)) < 1e-10


def cross_entropy_sq(model, batch, square):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y) + 0.1 * square(model(x)).mean()


def test_param_subset_gradient_and_chunks(mlp, mlp_hessian):
    first, second = mlp.model[0], mlp.model[2]
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch, params=[second.weight, second.bias, second.weight])
    assert op.param_names == ("2.weight", "2.bias")
    assert op.param_numels == (18, 3)
    block = mlp_hessian[30:, 30:]
    V = probes(21, 5)
    assert rel_err(op.matmat(V), block @ V) < 1e-10
    chunked = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch, params=[second.weight, second.bias], chunk_size=2)
    assert rel_err(chunked.matmat(V), block @ V) < 1e-10

    full = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    loss = mlp.loss_fn(mlp.model, mlp.batch)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(mlp.model.parameters()))])
    assert rel_err(full.gradient(), expected) < 1e-12
    assert torch.allclose(full.loss(), loss.detach())
    assert first.weight.grad is None


def test_caller_contexts_do_not_leak(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    v = probes(op.numel, 1)[:, 0]
    with torch.no_grad():
        assert rel_err(op.matvec(v), mlp_hessian @ v) < 1e-10
    with torch.inference_mode():
        assert rel_err(op.matvec(v), mlp_hessian @ v) < 1e-10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op.matvec(v)
    assert out.dtype == torch.float64 and rel_err(out, mlp_hessian @ v) < 1e-10


def test_preconditioned_operator(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    diag = torch.rand(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    pre = PreconditionedOperator(op, diag)
    scale = diag.rsqrt()
    dense = scale[:, None] * mlp_hessian * scale[None, :]
    V = probes(op.numel, 3)
    assert rel_err(pre.matmat(V), dense @ V) < 1e-10
    assert rel_err(pre.matvec(V[:, 0]), dense @ V[:, 0]) < 1e-10
    assert pre.param_names == op.param_names and pre.num_matvecs == 4
    with pytest.raises(ValueError, match="diag"):
        PreconditionedOperator(op, -diag)
    with pytest.raises(ValueError, match="diag"):
        PreconditionedOperator(op, diag[:-1])


def test_bad_arguments(mlp):
    m, f, b = mlp.model, mlp.loss_fn, mlp.batch
    with pytest.raises(ValueError, match="hvp.*'bogus'"):
        HessianOperator(m, f, b, hvp="bogus")
    with pytest.raises(ValueError, match="mode.*'training'"):
        HessianOperator(m, f, b, mode="training")
    with pytest.raises(ValueError, match="chunk_size.*0"):
        HessianOperator(m, f, b, chunk_size=0)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        HessianOperator(m, f, b, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="params.*\\[\\]"):
        HessianOperator(m, f, b, params=[])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="params=None"):
        HessianOperator(frozen, f, b)
    op = HessianOperator(m, f, b)
    with pytest.raises(ValueError, match="v must"):
        op.matvec(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="V must"):
        op.matmat(torch.zeros(op.numel, dtype=torch.float64))
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(m, lambda model, batch: model(batch[0]), b).matvec(torch.zeros(op.numel))
    with pytest.raises(ValueError, match="symmetric"):
        DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS[:2])
def test_cuda_matches_cpu_and_keeps_cuda_rng(method, cnn):
    model = cnn.model.cuda()
    batch = tuple(t.cuda() for t in cnn.batch)
    cuda_rng, cpu_rng = torch.cuda.get_rng_state(), torch.get_rng_state()
    op = HessianOperator(model, cnn.loss_fn, batch, hvp=method, mode="train")
    V = probes(op.numel, 3)
    out = op.matmat(V.cuda()).cpu()
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng) and torch.equal(torch.get_rng_state(), cpu_rng)
    assert torch.equal(out, op.matmat(V.cuda()).cpu())  # deterministic dropout on the GPU too
    # CUDA dropout masks differ from CPU ones: compare symmetry and the train-mode structure instead.
    assert rel_err(V.T @ out, (V.T @ out).T) < 1e-10


def _central_difference_hvp(model: nn.Module, loss_fn, batch, names, v: Tensor, h: float = 1e-4) -> Tensor:
    """(g(theta + h v) - g(theta - h v)) / 2h with g = autograd.grad of the loss: the independent reference."""
    base = dict(model.named_parameters())
    chunks = dict(zip(names, v.split([base[n].numel() for n in names]), strict=True))

    def grad_at(sign: float) -> Tensor:
        shifted = {n: (base[n].detach() + sign * h * chunks[n].view_as(base[n])).requires_grad_() for n in names}
        loss = loss_fn(lambda b: torch.func.functional_call(model, shifted, (b,)), batch)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [shifted[n] for n in names])])

    return (grad_at(1.0) - grad_at(-1.0)) / (2 * h)


@pytest.mark.parametrize("hvp", ["double_backward", "forward_over_reverse", "auto"])
def test_attention_models_are_measured_through_the_math_kernel(hvp):
    # The fused CPU/GPU attention kernels support neither double backward nor forward-mode AD.
    from lightning_gd.recipes.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny", block_size=8, n_layer=1, n_embd=16, n_head=2, n_kv_head=1))
    model.double().eval()
    x = torch.randint(0, 256, (2, 8))

    def loss_fn(m, b):
        return F.cross_entropy(m(b).flatten(0, 1), b.flatten())

    op = HessianOperator(model, loss_fn, x, hvp=hvp)
    v = torch.randn(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v /= v.norm()
    ref = _central_difference_hvp(model, loss_fn, x, op.param_names, v)
    assert rel_err(op.matvec(v), ref) < 1e-6
