"""lambda_max and the trace of a model nobody here wrote, against independent computations (issue 21).

torchvision's ResNet-18 (11.2M parameters, BatchNorm in eval mode) in float64 on a tiny input (4 images 3x32x32,
10 classes, cross-entropy; seeded random data and weights), measured with this package's operators and against:

* lambda_max of the whole Hessian: scipy's ``eigsh`` (ARPACK, ``which="LA"``) on a ``LinearOperator`` whose
  products are written here from ``torch.func`` alone (``jvp`` of ``grad`` of a ``functional_call``), none of this
  package's code; ours: ``lanczos(HessianOperator(model, ...))`` at the tracker's default tol (1e-2) and at 1e-6;
* the trace and the top three eigenvalues on a slice: the final ``fc`` layer (5,130 parameters), whose dense
  Hessian ``torch.func.hessian`` gives exactly from the images' features; ours (through the whole network):
  ``hutchinson_trace(..., method=m)`` for the three methods and ``lanczos(k=3)`` on
  ``HessianOperator(params=[fc.weight, fc.bias])``;
* the same slice's generalised Gauss-Newton against ``J^T H_L J`` from dense ``torch.func`` Jacobians.

Command (2-core CPU, a few minutes)::

    python benchmarks/curvature_independent_check.py
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch.func import functional_call, grad, hessian, jacrev, jvp

from lightning_gd.curvature import GGNOperator, HessianOperator, hutchinson_trace, lanczos


def main() -> None:
    import torchvision

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, load {os.getloadavg()[0]:.1f}")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7, 3, 0])
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    names = list(params)
    shapes = [p.shape for p in params.values()]
    n = sum(p.numel() for p in params.values())

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([s.numel() for s in shapes])
        state = {k: c.view(s) for k, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, {**state, **buffers}, (x,)), y)

    flat0 = torch.cat([p.reshape(-1) for p in params.values()])
    g = grad(loss_of)
    count = [0]

    def independent_hvp(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return jvp(g, (flat0,), (torch.from_numpy(np.ravel(v)),))[1].numpy()

    t0 = time.perf_counter()
    ref = eigsh(LinearOperator((n, n), matvec=independent_hvp, dtype=np.float64), k=1, which="LA", tol=1e-10, ncv=10,
                return_eigenvectors=False)[0]  # fmt: skip
    print(f"\nResNet-18, {n:,} parameters: scipy eigsh on torch.func products: lambda_max = {ref:.10g} "
          f"({count[0]} products, {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    for tol in (1e-2, 1e-6):
        t0 = time.perf_counter()
        res = lanczos(op, tol=tol, max_iter=60)
        print(f"ours lanczos tol={tol:g}: {res.eigenvalues[0].item():.10g}, relative error "
              f"{abs(res.eigenvalues[0].item() - ref) / ref:.1e}, {res.num_matvecs} products, "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    # Central differences of gradients (what the callbacks use under FSDP and ZeRO-3), float64 and a float32 copy.
    for dtype in (torch.float64, torch.float32):
        copy = torchvision.models.resnet18(num_classes=10).eval()
        copy.load_state_dict(model.state_dict())
        copy = copy.to(dtype)
        fd = HessianOperator(copy, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x.to(dtype), y),
                             hvp="finite_difference")  # fmt: skip
        t0 = time.perf_counter()
        res = lanczos(fd, tol=1e-6, max_iter=60)
        print(f"ours finite differences ({dtype}), lanczos tol=1e-6: {res.eigenvalues[0].item():.10g}, relative "
              f"error {abs(res.eigenvalues[0].item() - ref) / ref:.1e}, {res.num_matvecs} products, "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip

    # The fc slice: dense Hessian by torch.func.hessian.
    fc = [model.fc.weight, model.fc.bias]
    fc_shapes = [p.shape for p in fc]
    fc0 = torch.cat([p.detach().reshape(-1) for p in fc])

    # The fc layer is the last one: with the (fixed) features of the images the loss is a small function of its
    # weights, whose dense Hessian torch.func.hessian gives exactly, without this package's code.
    with torch.no_grad():
        feats = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)  # fmt: skip

    def fc_logits(flat):
        w, b = flat[: fc_shapes[0].numel()].view(fc_shapes[0]), flat[fc_shapes[0].numel() :]
        return feats @ w.T + b

    def fc_loss(flat):
        return F.cross_entropy(fc_logits(flat), y)

    assert torch.allclose(fc_logits(fc0), model(x), rtol=1e-10, atol=1e-12)  # the same logits as the model's
    H = hessian(fc_loss)(fc0)
    exact_trace = torch.trace(H).item()
    eigs = torch.linalg.eigvalsh(H).flip(0)
    print(f"\nfc slice ({fc0.numel():,} parameters): dense torch.func.hessian: trace {exact_trace:.10g}, top three "
          + ", ".join(f"{v:.8g}" for v in eigs[:3].tolist()))  # fmt: skip
    sl = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), params=fc)
    top = lanczos(sl, k=3, tol=1e-8, max_iter=200)
    err = ((top.eigenvalues - eigs[:3]).abs() / eigs[:3].abs()).max().item()
    print("ours lanczos k=3: " + ", ".join(f"{v:.8g}" for v in top.eigenvalues.tolist())
          + f" (worst relative error {err:.1e}, {top.num_matvecs} products)")  # fmt: skip
    for method in ("hutchinson", "hutch++", "xtrace"):
        errs = []
        for seed in range(5):
            est = hutchinson_trace(sl, 100, method=method, generator=torch.Generator().manual_seed(seed))
            errs.append(abs(est.value - exact_trace) / abs(exact_trace))
        print(f"ours {method}, 100 products: median relative error over 5 seeds {np.median(errs):.2%}"
              f" (worst {max(errs):.2%})")  # fmt: skip

    # GGN of the slice: J^T H_L J from dense Jacobians.
    out = fc_logits(fc0).detach()
    J = jacrev(fc_logits)(fc0).reshape(out.numel(), -1)
    H_L = hessian(lambda o: F.cross_entropy(o, y))(out).reshape(out.numel(), out.numel())
    G = J.T @ H_L @ J
    ggn = GGNOperator(model, lambda m, b: (m(b[0]), b[1]), "cross_entropy", (x, y), params=fc)
    V = torch.randn(fc0.numel(), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rel = ((ggn.matmat(V) - G @ V).norm() / (G @ V).norm()).item()
    g_top = lanczos(ggn, tol=1e-8, max_iter=100).eigenvalues[0].item()
    g_ref = torch.linalg.eigvalsh(G)[-1].item()
    print(f"GGN of the slice: products vs dense J^T H_L J relative error {rel:.1e}; lambda_max {g_top:.10g} vs"
          f" {g_ref:.10g} ({abs(g_top - g_ref) / g_ref:.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
