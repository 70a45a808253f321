"""Error feedback and DGC momentum correction against their formulas."""

import pytest
import torch

from lightning_gd.compression import (
    QSGD,
    Compressor,
    ErrorFeedback,
    MomentumCorrection,
    NoMemory,
    RandomK,
    Sign,
    TopK,
)


def _grads(steps: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(steps)]


# ---------------------------------------------------------------------- error feedback
@pytest.mark.parametrize("comp", [TopK(0.1), RandomK(0.2, seed=1), Sign(), QSGD(2, seed=0)], ids=repr)
def test_error_feedback_telescopes(comp: Compressor) -> None:
    """sum_t D(C(p_t)) + e_T == sum_t g_t: error feedback delays, never loses."""
    ef = ErrorFeedback()
    grads = _grads(20, 97)
    sent = torch.zeros(97, dtype=torch.float64)
    for g in grads:
        p = ef.compensate("w", g)  # p_t = g_t + e_t
        d = comp.decompress(comp.compress(p, key="w"))
        ef.update("w", p, d)  # e_{t+1} = p_t - D(C(p_t))
        sent += d
    torch.testing.assert_close(sent + ef.residual("w"), torch.stack(grads).sum(0), rtol=0, atol=1e-10)


def test_error_feedback_norm_state_dict_and_shape_check() -> None:
    ef = ErrorFeedback()
    g = torch.tensor([3.0, -4.0, 1.0])
    assert torch.equal(ef.compensate(0, g), g)  # no residual yet
    ef.update(0, g, torch.tensor([0.0, -4.0, 0.0]))
    ef.update("b", torch.ones(2), torch.zeros(2))
    assert ef.error_norm() == pytest.approx((9 + 1 + 2) ** 0.5)
    sd = ef.state_dict()
    assert set(sd) == {"0", "b"} and torch.equal(sd["0"], torch.tensor([3.0, 0.0, 1.0]))
    other = ErrorFeedback()
    other.load_state_dict(sd)
    assert torch.equal(other.compensate(0, g), torch.tensor([6.0, -4.0, 2.0]))  # int key == "0"
    with pytest.raises(ValueError, match="shape"):
        other.compensate("b", torch.ones(3))


# ---------------------------------------------------------------------- momentum correction
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_correction_matches_dgc_formulas(nesterov: bool) -> None:
    m = 0.9
    mc = MomentumCorrection(m, nesterov=nesterov)
    u = v = torch.zeros(4, dtype=torch.float64)
    for g in _grads(3, 4):
        if nesterov:
            u = m * (u + g)
            v = v + u + g
        else:
            u = m * u + g
            v = v + u
        torch.testing.assert_close(mc.accumulate("k", g), v)
    mask = torch.tensor([True, False, True, False])
    mc.mask("k", mask)
    bu, bv = mc.buffers("k")
    assert torch.equal(bu[mask], torch.zeros(2, dtype=torch.float64)) and torch.equal(bv[~mask], v[~mask])
    assert mc.error_norm() == pytest.approx(float(v[~mask].norm()))
    other = MomentumCorrection(m)
    other.load_state_dict(mc.state_dict())
    assert torch.equal(other.buffers("k")[1], bv)


def test_momentum_zero_reduces_to_error_feedback_for_topk() -> None:
    mc, ef, comp = MomentumCorrection(0.0), ErrorFeedback(), TopK(0.1)
    for g in _grads(5, 50):
        v = mc.accumulate(0, g)
        c = comp.compress(v, key=0)
        d_mc = comp.decompress(c)
        mc.mask(0, comp.sent_mask(c))
        p = ef.compensate(0, g)
        d_ef = comp.decompress(comp.compress(p, key=0))
        ef.update(0, p, d_ef)
        torch.testing.assert_close(d_mc, d_ef)
        torch.testing.assert_close(mc.buffers(0)[1], ef.residual(0))


@pytest.mark.parametrize("momentum", [1.0, -0.1])
def test_momentum_correction_rejects_bad_momentum(momentum: float) -> None:
    with pytest.raises(ValueError, match=f"momentum.*{momentum}"):
        MomentumCorrection(momentum)


def test_no_memory_passes_the_gradient_through_and_keeps_nothing() -> None:
    # The null memory of a hook without error feedback: p_t = g_t, nothing is kept, nothing is lost or added.
    mem, g = NoMemory(), torch.tensor([1.0, -3.0, 0.5])
    comp = TopK(0.34)
    p = mem.compensate("w", g)
    mem.update("w", p, comp.decompress(comp.compress(p)))
    assert p is g and mem.residual("w") is None and mem.keys() == [] and mem.error_norm() == 0.0
    assert not mem.enabled and ErrorFeedback.enabled and mem.state_dict() == {}
