import math

import pytest
import torch

from lightning_gd.optim import Conda
from tests.helpers.optim import run_and_resume


def _param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_first_step_by_hand():
    # m_1 = 0.1 g has singular vectors e1, e2; the projected g' = g up to column signs, so
    # m'_1 / (sqrt(v_1) + eps) = (1 - b1) / sqrt(1 - b2) * sign(g') and the step is lr * scale * sign(g) here.
    w = _param([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    opt = Conda([w], lr=0.1, betas=(0.9, 0.999), eps=1e-12, scale=0.5)
    w.grad = torch.tensor([[3.0, 0.0], [0.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    opt.step()
    expect = torch.tensor([[1.0 - 0.05, 2.0], [3.0, 4.0 + 0.05], [5.0, 6.0]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expect, rtol=0, atol=1e-10)
    assert opt.state[w]["basis"].shape == (2, 2)  # rows >= cols: Vh (c x c)
    assert opt.state[w]["exp_avg_sq"].shape == (3, 2)


def _conda_reference(w, grads, lr, betas, eps, wd, scale, gap):
    """The update of ANCHORS section 6 written out step by step, for comparison."""
    w = w.clone()
    b1, b2 = betas
    m = torch.zeros_like(w)
    v = None
    basis = None
    r, c = w.shape
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(m.float(), full_matrices=False)  # in float32, as the official code
            basis = (vh if r >= c else u).double()
        gp, mp = (g @ basis.T, m @ basis.T) if r >= c else (basis.T @ g, basis.T @ m)
        v = (1 - b2) * gp**2 if v is None else b2 * v + (1 - b2) * gp**2
        y = mp / (v.sqrt() + eps)
        w = w - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * scale * (y @ basis if r >= c else basis @ y)
        w = w - lr * wd * w
    return w


@pytest.mark.parametrize("shape", [(3, 5), (5, 3)])
def test_three_steps_match_the_written_rule(shape):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(5)]
    w = torch.nn.Parameter(w0.clone())
    opt = Conda([w], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, scale=0.25, update_proj_gap=2)
    bases = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        bases.append(opt.state[w]["basis"].clone())
    expect = _conda_reference(w0, grads, 0.05, (0.8, 0.95), 1e-6, 0.1, 0.25, 2)
    torch.testing.assert_close(w.detach(), expect, rtol=0, atol=1e-12)
    # the basis is refreshed at steps 1, 3, 5 and kept at steps 2, 4
    assert torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])
    assert torch.equal(bases[2], bases[3]) and not torch.equal(bases[3], bases[4])
    side = min(shape)
    assert bases[0].shape == (side, side)


def test_vectors_and_conda_false_groups_take_the_adamw_step():
    # AdamW with the same step-size form: p - lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v)+eps), then decay.
    bias = _param([1.0, -1.0])
    emb = _param([[0.5, 0.5], [1.0, 2.0]])
    opt = Conda([{"params": [bias]}, {"params": [emb], "conda": False}], lr=0.1, eps=0.0, weight_decay=0.5)
    bias.grad = torch.tensor([2.0, -4.0], dtype=torch.float64)
    emb.grad = torch.tensor([[1.0, -1.0], [3.0, 0.5]], dtype=torch.float64)
    opt.step()
    # step 1: m / (sqrt(v)) = (1-b1)/sqrt(1-b2) sign(g); times lr sqrt(1-b2)/(1-b1): lr sign(g); then *(1 - lr wd)
    torch.testing.assert_close(bias.detach(), torch.tensor([0.9, -0.9], dtype=torch.float64) * 0.95)
    expect = (torch.tensor([[0.5, 0.5], [1.0, 2.0]]) - 0.1 * torch.tensor([[1.0, -1.0], [1.0, 1.0]])) * 0.95
    torch.testing.assert_close(emb.detach(), expect.double())
    assert "basis" not in opt.state[emb] and "basis" not in opt.state[bias]


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, 6, generator=gen)
    grads = [torch.randn(4, 6, generator=gen) for _ in range(6)]

    def make(w):
        return Conda([w], lr=0.01, weight_decay=0.01, update_proj_gap=2)

    full, resumed, saved = run_and_resume(make, w0, grads, split=3)
    assert all(torch.is_tensor(v) for v in saved["state"][0].values())  # the basis is a tensor, no Python object
    assert torch.equal(resumed, full)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"scale": 0.0}, "scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conda([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
