"""Lyapunov spectra against closed forms, torch's recurrent layers, gradients and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_gd.dynamics import RecurrentDynamics, lyapunov_spectrum, recurrent_dynamics, recurrent_step


def _orthogonal(n: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize("s", [0.7, 1.0, 1.6])
def test_scaled_orthogonal_linear_rnn_has_every_exponent_log_s(s: float) -> None:
    N = 8
    W = s * _orthogonal(N)  # singular values all s: every exponent is log s exactly, at every step
    x = torch.randn(30, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lam = lyapunov_spectrum(lambda h, u: h @ W.T + u, torch.zeros(N, dtype=torch.float64), x, k=N)
    assert lam.shape == (N,)
    torch.testing.assert_close(lam, torch.full((N,), math.log(s), dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("reorth_every", [1, 4])
def test_diagonal_linear_rnn_gives_sorted_log_abs_diagonal(reorth_every: int) -> None:
    w = torch.tensor([0.5, -2.0, 1.1, 0.3, -0.9, 1.5], dtype=torch.float64)
    B, N, k = 3, w.numel(), 4
    x = torch.randn(150, B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lam = lyapunov_spectrum(lambda h, u: h * w + u, torch.zeros(B, N, dtype=torch.float64), x, k, warmup=80,
                            reorth_every=reorth_every)  # fmt: skip
    expected = torch.sort(w.abs().log(), descending=True).values[:k]
    assert lam.shape == (B, k)
    # The QR basis converges to the eigenvectors geometrically; after the transient the error is tiny.
    torch.testing.assert_close(lam, expected.expand(B, k), rtol=0, atol=1e-6)


def test_batched_trajectories_match_unbatched_runs() -> None:
    torch.manual_seed(0)
    rnn = nn.RNN(3, 10).double()
    step = recurrent_step(rnn)
    h0 = torch.randn(3, 10, dtype=torch.float64)
    x = torch.randn(25, 3, 3, dtype=torch.float64)
    lam = lyapunov_spectrum(step, h0, x, k=5, warmup=10)
    for b in range(3):
        torch.testing.assert_close(lam[b], lyapunov_spectrum(step, h0[b], x[:, b], k=5, warmup=10))
    assert torch.all(lam[:, :-1] >= lam[:, 1:])  # sorted descending


def _roll(dyn: RecurrentDynamics, x: Tensor) -> Tensor:
    h = torch.zeros(x.shape[1], dyn.state_size, dtype=x.dtype)
    for t in range(x.shape[0]):
        h = dyn.step(h, x[t])
    return h


@pytest.mark.parametrize(
    "module",
    [
        nn.RNN(3, 6, num_layers=2),
        nn.RNN(3, 6, nonlinearity="relu", bias=False),
        nn.GRU(3, 6, num_layers=2),
        nn.LSTM(3, 6, num_layers=2),
        nn.LSTM(3, 6, proj_size=4),
    ],
    ids=["rnn2", "rnn_relu", "gru2", "lstm2", "lstm_proj"],
)
def test_step_functions_follow_torch_layers(module: nn.Module) -> None:
    module = module.double()
    x = torch.randn(12, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, state = module(x)
    dyn = recurrent_dynamics(module)
    expected = torch.cat([*state[0], *state[1]], dim=-1) if isinstance(state, tuple) else torch.cat([*state], dim=-1)
    assert dyn.state_size == expected.shape[-1] and dyn.input_size == 3
    torch.testing.assert_close(_roll(dyn, x), expected)


@pytest.mark.parametrize("cell", [nn.RNNCell(3, 6), nn.GRUCell(3, 6), nn.LSTMCell(3, 6)], ids=["rnn", "gru", "lstm"])
def test_step_functions_follow_torch_cells(cell: nn.Module) -> None:
    cell = cell.double()
    x = torch.randn(5, 3, dtype=torch.float64)
    h = torch.randn(5, 6, dtype=torch.float64)
    dyn = recurrent_dynamics(cell)
    if isinstance(cell, nn.LSTMCell):
        c = torch.randn(5, 6, dtype=torch.float64)
        expected = torch.cat(cell(x, (h, c)), dim=-1)
        state = torch.cat([h, c], dim=-1)
    else:
        expected, state = cell(x, h), h
    torch.testing.assert_close(dyn.step(state, x), expected)


@pytest.mark.parametrize("module", [nn.RNN(2, 8), nn.GRU(2, 8), nn.LSTM(2, 8)], ids=["rnn", "gru", "lstm"])
def test_flossing_loss_gradients_reach_recurrent_weights(module: nn.Module) -> None:
    dyn = recurrent_dynamics(module)
    x = torch.randn(40, 4, 2, generator=torch.Generator().manual_seed(4))
    lam = lyapunov_spectrum(dyn.step, torch.zeros(4, dyn.state_size), x, k=3, warmup=5)
    (lam**2).mean().backward()
    for name in ("weight_hh_l0", "weight_ih_l0", "bias_hh_l0"):
        grad = getattr(module, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_gradient_matches_finite_differences() -> None:
    """d lambda / d s for h' = tanh(s W h + x): autograd through JVPs and QR against central differences
    (no warmup: the transient is outside the graph by design)."""
    N = 5
    W = _orthogonal(N, seed=5)
    x = 0.5 * torch.randn(30, 2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    h0 = torch.zeros(2, N, dtype=torch.float64)

    def spectrum_sum(s: Tensor) -> Tensor:
        return lyapunov_spectrum(lambda h, u: torch.tanh(s * (h @ W.T) + u), h0, x, k=3).sum()

    s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(spectrum_sum(s), s)
    eps = 1e-6
    with torch.no_grad():
        fd = (spectrum_sum(s + eps) - spectrum_sum(s - eps)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_user_cell_and_no_grad_measurement() -> None:
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(0.5 * torch.eye(4))
    with torch.no_grad():
        lam = lyapunov_spectrum(lambda h, u: lin(h) + u, torch.zeros(4), torch.zeros(10, 4), k=2)
    torch.testing.assert_close(lam, torch.full((2,), math.log(0.5)))
    assert not lam.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "`k` must be a positive integer, got 0"),
        ({"k": 9}, "`k` must be at most the state size N = 8, got 9"),
        ({"k": 2, "warmup": -1}, "`warmup` must be an integer >= 0, got -1"),
        ({"k": 2, "warmup": 10}, "`warmup` must be smaller than the number of steps T = 10, got 10"),
        ({"k": 2, "reorth_every": 0}, "`reorth_every` must be a positive integer, got 0"),
        ({"k": 2, "h0": torch.zeros(2, 2, 8)}, "`h0` must be a tensor of shape"),
        ({"k": 2, "h0": torch.zeros(3, 8)}, r"`inputs` must have shape \(T, B, ...\) with B = 3"),
        ({"k": 2, "step": lambda h, x: h[:, :4]}, r"`step` must return the state's shape \(1, 8\), got \(1, 4\)"),
        ({"k": 2, "step": 3}, "`step` must be callable, got 3"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs: dict, match: str) -> None:
    args = {"step": lambda h, x: 0.5 * h + x, "h0": torch.zeros(8), "inputs": torch.zeros(10, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        lyapunov_spectrum(**args)


def test_unsupported_modules_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="bidirectional"):
        recurrent_dynamics(nn.GRU(2, 4, bidirectional=True))
    with pytest.raises(ValueError, match="got Linear"):
        recurrent_dynamics(nn.Linear(2, 2))
