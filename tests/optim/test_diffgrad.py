import math

import pytest
import torch

from lightning_gd.optim import DiffGrad
from tests.helpers.optim import run_and_resume


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_two_steps_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = DiffGrad([p], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.1)
    raw = torch.tensor([0.5, 1.0], dtype=torch.float64)
    p.grad = raw.clone()
    opt.step()
    # g_1 = raw + 0.1 p = (0.6, 0.8); xi_1 = sigmoid(|0 - g_1|); the Adam part at t=1 is lr * sign(g_1)
    p1 = [1.0 - 0.1 * _sigmoid(0.6), -2.0 - 0.1 * _sigmoid(0.8)]
    assert p.tolist() == pytest.approx(p1, abs=1e-14)
    p.grad = raw.clone()
    opt.step()
    g1 = [0.6, 0.8]
    g2 = [0.5 + 0.1 * p1[0], 1.0 + 0.1 * p1[1]]
    b1, b2, lr = 0.9, 0.999, 0.1
    step_size = lr * math.sqrt(1 - b2**2) / (1 - b1**2)
    expect = []
    for i in range(2):
        m = b1 * (1 - b1) * g1[i] + (1 - b1) * g2[i]
        v = b2 * (1 - b2) * g1[i] ** 2 + (1 - b2) * g2[i] ** 2
        xi = _sigmoid(abs(g1[i] - g2[i]))
        expect.append(p1[i] - step_size * xi * m / math.sqrt(v))
    assert p.tolist() == pytest.approx(expect, abs=1e-14)


def test_previous_gradient_is_a_copy():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = DiffGrad([p])
    p.grad = torch.tensor([0.3, -0.7])
    opt.step()
    p.grad.mul_(100.0)  # the next backward writes into the same tensor
    assert opt.state[p]["previous_grad"].tolist() == pytest.approx([0.3, -0.7])


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 2, generator=gen) for _ in range(6)]
    full, resumed, _ = run_and_resume(lambda w: DiffGrad([w], lr=0.01, weight_decay=0.01), torch.ones(3, 2), grads, 3)
    assert torch.equal(resumed, full)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffGrad([torch.nn.Parameter(torch.zeros(2))], **kwargs)
