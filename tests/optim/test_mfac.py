import pytest
import torch

from lightning_gd.optim import MFAC
from tests.helpers.optim import run_and_resume


def _dense_fisher(window, damp, m):
    d = window.shape[1]
    return damp * torch.eye(d, dtype=torch.float64) + window.T @ window / m


def _sherman_morrison(window, damp, m):
    """(damp I + (1/m) sum g g^T)^-1 built by m rank-one updates of (1/damp) I."""
    d = window.shape[1]
    inv = torch.eye(d, dtype=torch.float64) / damp
    for g in window:
        hg = inv @ g
        inv = inv - torch.outer(hg, hg) / (m + g @ hg)
    return inv


def test_steps_match_the_dense_inverse_and_sherman_morrison():
    # two parameters (d = 3 + 4 = 7), a window of m = 3 that wraps around twice, coupled weight decay
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(2, 2, generator=gen, dtype=torch.float64))
    m, damp, lr, wd = 3, 0.05, 0.1, 0.01
    opt = MFAC([a, b], lr=lr, num_grads=m, damp=damp, weight_decay=wd)
    inserted = []
    for _ in range(7):
        a.grad = torch.randn(3, generator=gen, dtype=torch.float64)
        b.grad = torch.randn(2, 2, generator=gen, dtype=torch.float64)
        before = torch.cat([a.detach().flatten(), b.detach().flatten()])
        g = torch.cat([a.grad + wd * a.detach(), (b.grad + wd * b.detach()).flatten()])  # g = grad + wd p
        inserted.append(g)
        opt.step()
        after = torch.cat([a.detach().flatten(), b.detach().flatten()])
        window = torch.stack(inserted[-m:] + [torch.zeros(7, dtype=torch.float64)] * (m - len(inserted[-m:])))
        dense = torch.linalg.solve(_dense_fisher(window, damp, m), g)
        torch.testing.assert_close((before - after) / lr, dense, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(_sherman_morrison(window, damp, m) @ g, dense, rtol=1e-9, atol=1e-9)
    # any vector, through the stored coefficients
    x = torch.randn(7, generator=gen, dtype=torch.float64)
    window = torch.stack(inserted[-m:])
    expect = torch.linalg.solve(_dense_fisher(window, damp, m), x)
    torch.testing.assert_close(opt.inverse_fisher_product(x), expect, rtol=1e-8, atol=1e-8)


def test_first_step_by_hand():
    # one gradient in a window of m: F = damp I + g g^T / m, so F^-1 g = g / (damp + |g|^2 / m)
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = MFAC([p], lr=0.5, num_grads=4, damp=0.5)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)  # |g|^2 = 25, so F^-1 g = g / 6.75
    opt.step()
    assert p.tolist() == pytest.approx([1.0 - 0.5 * 3.0 / 6.75, 2.0 - 0.5 * 4.0 / 6.75], abs=1e-12)


def test_momentum_averages_the_preconditioned_steps():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = MFAC([p], lr=1.0, momentum=0.5, num_grads=2, damp=1.0)
    p.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt.step()  # F = I + e1 e1^T / 2: u = (1/1.5, 0); v = 0.5 u
    assert p.tolist() == pytest.approx([-0.5 / 1.5, 0.0], abs=1e-12)
    p.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    opt.step()  # F = diag(1.5, 3): u = (0, 2/3); v = 0.5 v + 0.5 u
    assert p.tolist() == pytest.approx([-0.5 / 1.5 - 0.25 / 1.5, -0.5 * 2.0 / 3.0], abs=1e-12)


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(8)]

    def make(p):
        return MFAC([p], lr=0.01, momentum=0.9, weight_decay=1e-3, num_grads=4, damp=1e-3)

    def check_loaded(opt, w):  # right after the load: the window's Gram matrix and slot came back
        assert opt.state[w]["gram"].dtype == torch.float32 and int(opt.state[w]["slot"]) == 1

    full, resumed, _ = run_and_resume(make, torch.ones(5, 3), grads, 5, after_load=check_loaded)
    assert torch.equal(resumed, full)


def test_memory_limit_names_the_number():
    params = [torch.nn.Parameter(torch.zeros(1000, 1000))]  # d = 1e6; m = 1024 would need 4.1 GB
    with pytest.raises(ValueError, match=r"needs 4\.1\d GB .*1024000000 floats.*max_memory_gb"):
        MFAC(params, num_grads=1024, max_memory_gb=1.0)
    opt = MFAC(params, num_grads=8, max_memory_gb=1.0)  # 32 MB is fine
    params[0].grad = torch.ones(1000, 1000)
    opt.step()
    assert opt.memory_bytes() == 8 * 10**6 * 4 + 2 * 8 * 8 * 4 + 8  # window + Gram + factor + slot


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"num_grads": 0}, "num_grads"),
        ({"damp": 0.0}, "damp"),
        ({"damp": -1e-5}, "damp"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFAC([torch.nn.Parameter(torch.zeros(2))], **kwargs)
