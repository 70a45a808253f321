"""Error feedback, DGC momentum correction, hook-state bookkeeping and PowerSGD checkpoints."""

import io
import warnings

import numpy as np
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

from lightning_gd.compression import (
    QSGD,
    CompressionHookState,
    Compressor,
    ErrorFeedback,
    MomentumCorrection,
    RandomK,
    Sign,
    TopK,
    load_powersgd_state_dict,
    powersgd_state_dict,
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


# ---------------------------------------------------------------------- hook state
def test_hook_state_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="momentum=0.9.*sparse"):
        CompressionHookState(Sign(), momentum=0.9)
    with pytest.raises(ValueError, match="error_feedback"):
        CompressionHookState(TopK(0.1), momentum=0.9, error_feedback=False)
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        CompressionHookState(TopK(0.1), warmup_steps=-1)
    with pytest.raises(ValueError, match="min_numel=-5"):
        CompressionHookState(TopK(0.1), min_numel=-5)
    with pytest.raises(TypeError, match="compressor"):
        CompressionHookState("topk")  # type: ignore[arg-type]
    state = CompressionHookState(TopK(0.1))
    assert state.stats() == {}
    with pytest.raises(ValueError, match="version"):
        state.load_state_dict({"version": 99})


def _block(value: float) -> dict:
    return {"params": ["w"], "shapes": [[3]], "tensors": {"error": torch.full((3,), value)}}


def _local_sd(rank: int, world: int, value: float) -> dict:
    return {
        "version": 1,
        "step": 7,
        "rank": rank,
        "world_size": world,
        "compressor_class": "TopK",
        "compressor": {"counters": {"0": 7}},
        "memory": {"0": _block(value)},
    }


def _loaded(sd: dict, rank: int, world: int) -> tuple[CompressionHookState, list[str]]:
    """Load ``sd`` into a state that believes it is ``rank`` of ``world`` and place the memories."""
    state = CompressionHookState(TopK(0.1), module=torch.nn.Linear(3, 1, bias=False))
    state._rank, state._world_size = rank, world  # what _init_dist() reads from the process group
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state.load_state_dict(sd)
        state._resolve_load(sd)
    assert state.step == 7 and state.compressor.step_of(0) == 7  # shared state always loaded
    return state, [str(w.message) for w in caught]


def test_resume_world_size_change_keeps_own_rank_memory() -> None:
    per_rank = {
        "version": 1,
        "format": "per_rank",
        "world_size": 2,
        "step": 7,
        "compressor_class": "TopK",
        "compressor": {"counters": {"0": 7}},
        "ranks": {0: _local_sd(0, 2, 1.0), 1: _local_sd(1, 2, 2.0)},
    }
    # 2 -> 1 ranks: rank 0 keeps its residual, rank 1's is dropped with a warning
    state, msgs = _loaded(per_rank, rank=0, world=1)
    assert torch.equal(state._pending_params["w"]["error"], torch.full((3,), 1.0))
    assert any("world size 2, now 1" in m and "[1] dropped" in m for m in msgs)
    # 2 -> 3 ranks: rank 1 keeps its own, the new rank 2 starts from zero
    state, _ = _loaded(per_rank, rank=1, world=3)
    assert torch.equal(state._pending_params["w"]["error"], torch.full((3,), 2.0))
    state, msgs = _loaded(per_rank, rank=2, world=3)
    assert not state._pending_params and any("no compression memory saved for rank 2" in m for m in msgs)


def test_resume_never_applies_another_ranks_memory() -> None:
    state, msgs = _loaded(_local_sd(0, 2, 1.0), rank=1, world=2)
    assert not state._pending_params and any("belongs to rank 0" in m for m in msgs)
    state, msgs = _loaded(_local_sd(1, 2, 1.0), rank=1, world=4)  # same rank, new world: kept
    assert "w" in state._pending_params and any("keeps its own" in m for m in msgs)


def test_hook_state_dict_is_plain_data() -> None:
    state = CompressionHookState(QSGD(4, seed=2))
    state.load_state_dict(_local_sd(0, 1, 1.0) | {"compressor_class": "QSGD", "compressor": {"seed": 2}})
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["step"] == 7


# ---------------------------------------------------------------------- PowerSGD
def test_powersgd_state_dict_round_trip() -> None:
    src = PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2, random_seed=3)
    src.error_dict = {0: torch.randn(10), 1: torch.randn(4)}
    src.p_memory_dict = {0: torch.randn(5, 2)}
    src.q_memory_dict = {0: torch.randn(2, 2)}
    src.iter, src.total_numel_before_compression, src.total_numel_after_compression = 9, 100, 20
    src.rng.randn(7)  # advance the RNG, leaving a cached gaussian
    sd = powersgd_state_dict(src)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # plain data only
    dst = PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2, random_seed=0)
    load_powersgd_state_dict(dst, sd, device="cpu")
    for name in ("error_dict", "p_memory_dict", "q_memory_dict"):
        a, b = getattr(src, name), getattr(dst, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (dst.iter, dst.total_numel_before_compression, dst.total_numel_after_compression) == (9, 100, 20)
    np.testing.assert_array_equal(src.rng.randn(5), dst.rng.randn(5))
    assert dst.matrix_approximation_rank == 2 and dst.process_group is None
