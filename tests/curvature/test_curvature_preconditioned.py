"""Adam's preconditioner and stability thresholds (Cohen et al. 2022) against closed forms."""

import math

import pytest
import torch

from lightning_gd.curvature import DenseOperator, PreconditionedOperator, lanczos
from lightning_gd.curvature.preconditioned import (
    adam_preconditioner,
    adam_threshold,
    combine_preconditioners,
    gd_threshold,
)


def test_adam_preconditioner_is_the_matrix_adam_divides_its_momentum_by():
    # w_t - w_{t-1} = -lr P_t^{-1} m_t with m_t torch's exp_avg, at every step (bias corrections included).
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    target = torch.randn(5, dtype=torch.float64)
    opt = torch.optim.Adam([w], lr=0.05, betas=(0.9, 0.99), eps=1e-3)
    for t in range(1, 4):
        before = w.detach().clone()
        opt.zero_grad()
        ((w - target) ** 4).sum().backward()
        opt.step()
        state = opt.state[w]
        P = adam_preconditioner(state["exp_avg_sq"], t, 0.9, 0.99, 1e-3)
        by_hand = (1 - 0.9**t) * ((state["exp_avg_sq"] / (1 - 0.99**t)).sqrt() + 1e-3)
        torch.testing.assert_close(P, by_hand, rtol=1e-15, atol=0)
        torch.testing.assert_close(w.detach() - before, -0.05 * state["exp_avg"] / P, rtol=1e-10, atol=0)


def test_clipping_factor_undoes_the_moments_of_the_clipped_gradient():
    # Moments of c * g: P_c = c P (eps = 0), so P_c / c = P: the clipped run's corrected preconditioner is the
    # unclipped run's, and Adam's step is the same (scale invariance).
    g = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = 0.125
    beta2, t = 0.95, 3
    v = (1 - beta2) * sum(beta2**i for i in range(t)) * g**2  # the same gradient t times
    v_clipped = (1 - beta2) * sum(beta2**i for i in range(t)) * (c * g) ** 2
    P = adam_preconditioner(v, t, 0.9, beta2, 0.0)
    torch.testing.assert_close(adam_preconditioner(v_clipped, t, 0.9, beta2, 0.0, clip_factor=c), P)
    torch.testing.assert_close(adam_preconditioner(v_clipped, t, 0.9, beta2, 0.0), c * P)


def test_thresholds():
    assert adam_threshold(0.9, 0.01) == pytest.approx(3800.0)
    assert adam_threshold(0.0, 0.5) == gd_threshold(0.5) == 4.0  # beta1 = 0, P = I: gradient descent
    assert gd_threshold(0.05) == pytest.approx(40.0)
    for bad in [lambda: adam_threshold(1.0, 0.1), lambda: adam_threshold(0.9, 0.0), lambda: gd_threshold(-1.0)]:
        with pytest.raises(ValueError):
            bad()


def test_combined_preconditioner_gives_the_edge_of_each_block():
    # Block-diagonal H: the combined operator's lambda_max / reference threshold is the largest edge ratio of the
    # blocks, each against its own threshold.
    h1, h2 = torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([20.0, 5.0], dtype=torch.float64)
    p1, p2 = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)
    t1, t2 = adam_threshold(0.9, 1e-2), adam_threshold(0.5, 1e-3)
    D, ref = combine_preconditioners([p1, p2], [t1, t2])
    assert ref == t1
    op = PreconditionedOperator(DenseOperator(torch.diag(torch.cat([h1, h2]))), D)
    edge = lanczos(op, tol=1e-12).eigenvalues[0].item() / ref
    assert edge == pytest.approx(max((h1 / p1).max().item() / t1, (h2 / p2).max().item() / t2), rel=1e-12)
    same, _ = combine_preconditioners([p1, p2], [t1, t1])
    assert torch.equal(same, torch.cat([p1, p2]))


def test_heavy_ball_edge_is_the_threshold():
    # Frozen P on a 1-D quadratic h w^2 / 2: Adam's linear iteration (EMA momentum) is stable iff h / P < threshold.
    lr, beta1, P = 0.1, 0.9, 2.0
    edge_h = adam_threshold(beta1, lr) * P

    def grows(h):
        w, m = 1.0, 0.0
        for _ in range(4000):
            m = beta1 * m + (1 - beta1) * h * w
            w -= lr * m / P
        return abs(w) > 1.0

    assert not grows(0.99 * edge_h) and grows(1.01 * edge_h)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": 0}, "step"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"eps": -1.0}, "eps"),
        ({"clip_factor": 0.0}, "clip_factor"),
        ({"clip_factor": 1.5}, "clip_factor"),
        ({"clip_factor": math.nan}, "clip_factor"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"exp_avg_sq": torch.ones(2), "step": 1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, **kwargs}
    with pytest.raises(ValueError, match=match):
        adam_preconditioner(**args)
