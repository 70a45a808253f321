"""Lyapunov spectrum of a discrete-time recurrent map ``h_{t+1} = step(h_t, x_t)``.

Benettin et al. 1980 / Shimada & Nagashima 1979 QR method, as used by Engelken 2023 ("Gradient Flossing:
Improving Gradient Descent through Dynamic Control of Jacobians", NeurIPS): a basis ``Q`` of ``k`` tangent
vectors is pushed through the step Jacobians ``D_t = d step(h_t, x_t) / d h_t`` and re-orthonormalized,
``Q R = D_t Q``; the ``i``-th exponent is the time average of ``log |R_ii|``.

The Jacobian-vector products are exact (``torch.func.jvp``, no hand-written derivative) and every operation
is differentiable, so ``lyapunov_spectrum`` can be a loss on the parameters ``step`` closes over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.func import jvp, vmap

from lightning_gd.utils.checks import check_positive_int

__all__ = ["StepFn", "lyapunov_spectrum"]

StepFn = Callable[[Tensor, Tensor], Tensor]
"""``step(h, x) -> h_next`` with ``h`` of shape ``(B, N)`` and ``x`` of shape ``(B, ...)``, one sample per row."""

# Seed of the tangent basis when no generator is given: reproducible, and the global RNG is never consumed.
_DEFAULT_SEED = 0


def _tangent_map(step: StepFn, h: Tensor, x: Tensor, Q: Tensor) -> Tensor:
    """``D Q`` for the step Jacobian ``D`` at ``(h, x)``, one exact JVP per tangent column: ``(B, N, k)``."""

    def push(v: Tensor) -> Tensor:  # v: (B, N)
        return jvp(lambda state: step(state, x), (h,), (v,))[1]

    return vmap(push, in_dims=2, out_dims=2)(Q)


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU kernels on one intra-op thread (no-op on other devices); the thread count is restored.

    The QR factors and the small matrix products of a spectrum (and of its backward) are far too small to gain
    from threads, and threaded LAPACK on shared cores costs a lot: measured on two busy cores, 10 ms per
    threaded QR call against 10 us on one thread, and a flossing step (spectrum + backward) 3x faster.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _qr(Q: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of each ``(N, k)`` matrix of the batch ``(B, N, k)``, on one CPU thread (see above)."""
    with _single_cpu_thread(Q.device):
        return torch.linalg.qr(Q, mode="reduced")


def lyapunov_spectrum(
    step: StepFn,
    h0: Tensor,
    inputs: Tensor,
    k: int,
    warmup: int = 0,
    reorth_every: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ``k`` leading Lyapunov exponents of ``h_{t+1} = step(h_t, x_t)`` (natural log, per time step).

    The state runs ``warmup`` steps first (a transient, tangent basis re-orthonormalized but not counted, and
    outside the autograd graph), then ``T - warmup`` counted steps. The tangent basis starts as the ``Q``
    factor of a random Gaussian ``N x k`` matrix, is propagated with exact Jacobian-vector products and
    re-orthonormalized by QR every ``reorth_every`` steps (and after the last step); exponent ``i`` is
    ``sum log|R_ii| / (T - warmup)``. The result is differentiable with respect to every tensor ``step``
    closes over (through the counted steps). Re-orthonormalize often when the spectrum is wide: between two
    QRs the columns align with the leading direction and the small exponents lose precision.

    Args:
        step: ``step(h, x) -> h_next`` acting row-wise on a batch ``h`` of shape ``(B, N)``; e.g.
            :func:`~lightning_gd.dynamics.recurrent_step` of an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``, or any
            differentiable user cell.
        h0: Initial state, ``(N,)`` or ``(B, N)`` (``B`` independent trajectories).
        inputs: ``(T, ...)`` when ``h0`` is ``(N,)``, ``(T, B, ...)`` when ``h0`` is ``(B, N)``.
        k: Number of exponents, ``1 <= k <= N``.
        warmup: Transient steps not counted, ``0 <= warmup < T``.
        reorth_every: Steps between QR re-orthonormalizations (>= 1).
        generator: Source of the initial tangent basis; ``None`` uses a fixed seed (global RNG untouched).

    Returns:
        ``(k,)`` or ``(B, k)``: the exponents, sorted descending.

    Raises:
        ValueError: on a bad shape or argument, naming it.

    Example::

        >>> from torch import nn
        >>> from lightning_gd.dynamics import recurrent_step
        >>> rnn = nn.RNN(3, 16)
        >>> lam = lyapunov_spectrum(recurrent_step(rnn), torch.zeros(8, 16), torch.randn(100, 8, 3), k=4, warmup=20)
        >>> loss = (lam**2).mean()  # gradient flossing (Engelken 2023)
        >>> loss.backward()
        >>> rnn.weight_hh_l0.grad is not None  # the loss reaches the recurrent weights
        True
    """
    check_positive_int("k", k)
    check_positive_int("warmup", warmup, minimum=0)
    check_positive_int("reorth_every", reorth_every)
    if not callable(step):
        raise ValueError(f"`step` must be callable, got {step!r}")
    if not isinstance(h0, Tensor) or h0.dim() not in (1, 2):
        raise ValueError(f"`h0` must be a tensor of shape (N,) or (B, N), got {getattr(h0, 'shape', h0)!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or None, got {generator!r}")
    unbatched = h0.dim() == 1
    h = h0.unsqueeze(0) if unbatched else h0  # (B, N)
    if not isinstance(inputs, Tensor) or inputs.dim() < 1:
        raise ValueError(f"`inputs` must be a tensor of shape (T, ...) or (T, B, ...), got {inputs!r}")
    xs = inputs.unsqueeze(1) if unbatched else inputs  # (T, B, ...)
    B, N = h.shape
    T = xs.shape[0]
    if not unbatched and (xs.dim() < 2 or xs.shape[1] != B):
        raise ValueError(
            f"`inputs` must have shape (T, B, ...) with B = {B} (the batch of h0), got {tuple(inputs.shape)}"
        )
    if k > N:
        raise ValueError(f"`k` must be at most the state size N = {N}, got {k}")
    if warmup >= T:
        raise ValueError(f"`warmup` must be smaller than the number of steps T = {T}, got {warmup}")

    gen = generator if generator is not None else torch.Generator().manual_seed(_DEFAULT_SEED)
    A = torch.randn(N, k, generator=gen, device=gen.device, dtype=torch.float64)
    Q = torch.linalg.qr(A, mode="reduced")[0].to(device=h.device, dtype=h.dtype).expand(B, N, k)  # (B, N, k)

    log_r = h.new_zeros(B, k)  # (B, k): sum of log|R_ii| over counted steps
    for t in range(T):
        counted = t >= warmup
        with torch.set_grad_enabled(counted and torch.is_grad_enabled()):
            x = xs[t]  # (B, ...)
            Q = _tangent_map(step, h, x, Q)  # (B, N, k)
            h = step(h, x)  # (B, N)
            if h.shape != (B, N):
                raise ValueError(f"`step` must return the state's shape {(B, N)}, got {tuple(h.shape)}")
            if not counted or (t + 1 - warmup) % reorth_every == 0 or t == T - 1:
                Q, R = _qr(Q)  # (B, N, k), (B, k, k)
                if counted:
                    log_r = log_r + torch.log(torch.diagonal(R, dim1=-2, dim2=-1).abs())
        if t + 1 == warmup:  # end of the transient: start the counted part from constants
            h, Q = h.detach(), Q.detach()
    lam = torch.sort(log_r / (T - warmup), dim=-1, descending=True).values  # (B, k)
    return lam[0] if unbatched else lam
