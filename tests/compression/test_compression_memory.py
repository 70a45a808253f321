"""Error feedback, DGC momentum correction, hook-state bookkeeping and PowerSGD checkpoints."""

import inspect
import io
import warnings
from collections.abc import Callable
from typing import get_args

import numpy as np
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

from lightning_gd.compression import (
    COMPRESSORS,
    QSGD,
    BucketLayouts,
    CompressionHookState,
    Compressor,
    CompressorName,
    ErrorFeedback,
    HookState,
    MomentumCorrection,
    NoMemory,
    PowerSGDHookState,
    RandomK,
    Sign,
    TopK,
    load_powersgd_state_dict,
    make_hook_state,
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
    with pytest.raises(ValueError, match="momentum_correction=0.9 needs a sparse compressor"):
        CompressionHookState(Sign(), momentum_correction=0.9)
    with pytest.raises(ValueError, match="momentum_correction=0.9 needs error_feedback=True"):
        CompressionHookState(TopK(0.1), momentum_correction=0.9, error_feedback=False)
    with pytest.raises(ValueError, match=r"`momentum_correction` must be in \[0, 1\), got 1.0"):
        CompressionHookState(TopK(0.1), momentum_correction=1.0)
    with pytest.raises(ValueError, match="`warmup_steps` must be an integer >= 0, got -1"):
        CompressionHookState(TopK(0.1), warmup_steps=-1)
    with pytest.raises(ValueError, match="`min_numel` must be an integer >= 0, got -5"):
        CompressionHookState(TopK(0.1), min_numel=-5)
    with pytest.raises(ValueError, match="density_warmup_steps=3 needs a sparse compressor"):
        CompressionHookState(Sign(), density_warmup_steps=3)
    with pytest.raises(TypeError, match="compressor"):
        CompressionHookState("topk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum_correction=0.9 is not supported by 'powersgd': it applies to topk"):
        make_hook_state("powersgd", momentum_correction=0.9)  # the registry entry declares what PowerSGD accepts
    assert CompressionHookState(TopK(0.1)).stats() == {}


def test_error_feedback_defaults_to_on_for_contractive_compressors_only() -> None:
    assert CompressionHookState(TopK(0.1), error_feedback=None).memory.enabled
    assert CompressionHookState(Sign(), error_feedback=None).memory.enabled
    assert isinstance(CompressionHookState(QSGD(4), error_feedback=None).memory, NoMemory)  # the null memory
    with pytest.warns(UserWarning, match="no contraction"):
        CompressionHookState(QSGD(4), error_feedback=True)


def test_density_schedule_is_dense_then_dgc_warmup_then_nominal() -> None:
    state = CompressionHookState(TopK(0.01), warmup_steps=2, density_warmup_steps=4)
    # DGC: 0.25 * (0.01 / 0.25) ** (t / 4) for t = 0..3 after the dense steps
    expected = [1.0, 1.0, 0.25, 0.25 * 0.04**0.25, 0.25 * 0.04**0.5, 0.25 * 0.04**0.75, 0.01, 0.01]
    assert [state.density_at(s) for s in range(8)] == pytest.approx(expected, rel=1e-12)
    assert CompressionHookState(Sign(), warmup_steps=1).density_at(5) == 1.0
    assert PowerSGDHookState(warmup_steps=3).density_at(2) == 1.0 and PowerSGDHookState().density_at(9) is None


def _block(value: float) -> dict:
    return {"params": ["w"], "shapes": [[3]], "tensors": {"error": torch.full((3,), value)}}


def _v1_local_sd(rank: int, world: int, value: float) -> dict:
    """One rank's CompressionHookState.state_dict() as commit 5545262 wrote it (format version 1)."""
    return {
        "version": 1,
        "step": 7,
        "rank": rank,
        "world_size": world,
        "compressor_class": "TopK",
        "compressor": {"counters": {"0": 7}},
        "memory": {"0": _block(value)},
    }


def _v1_per_rank(values: dict[int, float]) -> dict:
    """The strategy checkpoint entry of commit 5545262: every rank's state gathered under "kind": "hook"."""
    world = len(values)
    return {
        "kind": "hook",
        "state": {
            "version": 1,
            "format": "per_rank",
            "world_size": world,
            "step": 7,
            "compressor_class": "TopK",
            "compressor": {"counters": {"0": 7}},
            "ranks": {r: _v1_local_sd(r, world, v) for r, v in values.items()},
        },
    }


def _loaded(sd: dict, rank: int, world: int) -> tuple[CompressionHookState, list[str]]:
    """Load ``sd`` into a state that believes it is ``rank`` of ``world``; its memories wait per parameter."""
    state = CompressionHookState(TopK(0.1), module=torch.nn.Linear(3, 1, bias=False))
    state._rank, state._world_size = rank, world  # what _init_dist() reads from the process group
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state.load_state_dict(sd)
    assert state.step == 7 and state.compressor.step_of(0) == 7  # shared state always loaded
    return state, [str(w.message) for w in caught]


def _pending(state: CompressionHookState) -> dict:
    return {name: pieces["error"] for name, pieces in state.layouts.pieces.items()}


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_resume_world_size_change_keeps_own_rank_memory(fmt: str) -> None:
    per_rank = _v1_per_rank({0: 1.0, 1: 2.0})
    if fmt == "v2":  # the same content in today's format
        ranks = per_rank["state"]["ranks"]
        per_rank = {"format_version": 2, "compressor": "TopK", "world_size": 2, "ranks": ranks}
    # 2 -> 1 ranks: rank 0 keeps its residual, rank 1's is dropped with a warning
    state, msgs = _loaded(per_rank, rank=0, world=1)
    assert torch.equal(_pending(state)["w"], torch.full((3,), 1.0))
    assert any("world size 2, now 1" in m and "[1] dropped" in m for m in msgs)
    # 2 -> 3 ranks: rank 1 keeps its own, the new rank 2 starts from zero
    state, _ = _loaded(per_rank, rank=1, world=3)
    assert torch.equal(_pending(state)["w"], torch.full((3,), 2.0))
    state, msgs = _loaded(per_rank, rank=2, world=3)
    assert not state.layouts.pieces and any("no compression memory saved for rank 2" in m for m in msgs)


def test_resume_never_applies_another_ranks_memory() -> None:
    state, msgs = _loaded(_v1_local_sd(0, 2, 1.0), rank=1, world=2)  # one rank's v1 state of rank 0
    assert not state.layouts.pieces and any("no compression memory saved for rank 1" in m for m in msgs)
    state, msgs = _loaded(_v1_local_sd(1, 2, 1.0), rank=1, world=4)  # same rank, new world: kept
    assert "w" in state.layouts.pieces and not any("world size" in m for m in msgs)  # rank zero says it, once
    state, msgs = _loaded(_v1_local_sd(0, 2, 1.0), rank=0, world=4)
    assert "w" in state.layouts.pieces and any("world size 2, now 4" in m for m in msgs)


def test_state_dict_round_trip_is_plain_data_and_keeps_waiting_memories() -> None:
    state, _ = _loaded(_v1_per_rank({0: 1.0}), rank=0, world=1)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["format_version"] == 2 and sd["compressor"] == "TopK" and sd["world_size"] == 1
    assert sd["ranks"][0]["step"] == 7 and torch.equal(
        sd["ranks"][0]["memory"]["param:w"]["tensors"]["error"], torch.ones(3)
    )
    again, _ = _loaded(sd, rank=0, world=1)
    assert torch.equal(_pending(again)["w"], torch.ones(3))


def test_checkpoint_of_another_compressor_or_unknown_version_raises_naming_both() -> None:
    saved = CompressionHookState(Sign()).state_dict()
    with pytest.raises(ValueError, match="holds compression state of 'Sign', this run uses 'TopK'"):
        CompressionHookState(TopK(0.1)).load_state_dict(saved)
    with pytest.raises(ValueError, match="holds compression state of 'PowerSGD', this run uses 'TopK'"):
        CompressionHookState(TopK(0.1)).load_state_dict({"kind": "powersgd", "ranks": {}, "world_size": 1})
    with pytest.raises(ValueError, match="format_version=99; this lightning_gd reads format 2"):
        CompressionHookState(TopK(0.1)).load_state_dict({**saved, "format_version": 99})
    with pytest.raises(ValueError, match="version=7 and no format_version"):
        CompressionHookState(TopK(0.1)).load_state_dict({"version": 7})


# ---------------------------------------------------------------------- bucket layouts
def _take(store: dict) -> Callable:
    return lambda key: store.pop(key, None)


def test_bucket_layouts_follow_parameters_through_a_regrouping() -> None:
    layouts, store = BucketLayouts(), {}
    one = (("a", (2,)), ("b", (1, 1)), ("c", (2,)))
    assert layouts.update(0, one, _take(store)) and layouts.assemble(0, ["e"], torch.zeros(0)) == {}
    assert not layouts.update(0, one, _take(store))  # unchanged: nothing to do
    store[0] = {"e": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}
    # DDP's rebuild: two buckets in another order; bucket 1 holds a parameter bucket 0 never had
    assert layouts.update(0, (("c", (2,)), ("a", (2,))), _take(store))
    assert torch.equal(layouts.assemble(0, ["e"], torch.zeros(0))["e"], torch.tensor([4.0, 5.0, 1.0, 2.0]))
    assert layouts.update(1, (("b", (1, 1)), ("d", (2,))), _take(store))
    out = layouts.assemble(1, ["e", "f"], torch.zeros(0, dtype=torch.float64), complete=())
    assert out["e"].dtype == torch.float64 and out["e"].tolist() == [3.0, 0.0, 0.0] and "f" not in out
    assert not layouts.pieces and not store
    # A parameter moving in from a bucket of another index: that bucket is cut too, not only the same index.
    store.update({0: {"e": torch.tensor([4.0, 5.0, 1.0, 2.0])}, 1: {"e": torch.tensor([3.0, 6.0, 7.0])}})
    assert layouts.update(0, (("d", (2,)), ("c", (2,))), _take(store))
    assert layouts.assemble(0, ["e"], torch.zeros(0))["e"].tolist() == [6.0, 7.0, 4.0, 5.0]
    assert 1 not in layouts.layouts and set(layouts.pieces) == {"a", "b"}


def test_bucket_layouts_complete_kinds_and_custom_segments() -> None:
    layouts = BucketLayouts(lambda kind, layout: [(i, 1) for i, s in layout if kind == "e" or len(s) == 2])
    layouts.load_state_dict(
        {"0": {"params": ["a", "b"], "shapes": [[2, 2], [3]], "tensors": {"q": torch.tensor([7.0])}}}
    )
    assert layouts.pieces == {"a": {"q": torch.tensor([7.0])}}
    layouts.update(0, (("b", (3,)), ("x", (4, 4)), ("a", (2, 2))), _take({}))
    assert layouts.assemble(0, ["q"], torch.zeros(0), complete=["q"]) == {}  # x's piece is missing
    layouts.load_state_dict(
        {"0": {"params": ["a", "b"], "shapes": [[2, 2], [3]], "tensors": {"q": torch.tensor([7.0])}}}
    )
    layouts.update(3, (("a", (2, 2)),), _take({}))
    assert torch.equal(layouts.assemble(3, ["q"], torch.zeros(0), complete=["q"])["q"], torch.tensor([7.0]))


def test_bucket_layouts_unnamed_memory_needs_the_same_shapes() -> None:
    blocks = {"0": {"params": None, "shapes": [[2], [1]], "tensors": {"e": torch.tensor([1.0, 2.0, 3.0])}}}
    layouts = BucketLayouts()
    layouts.load_state_dict(blocks)
    assert layouts.state_dict(lambda key: {})["0"]["tensors"]["e"].tolist() == [1.0, 2.0, 3.0]
    layouts.update(0, ((11, (2,)), (12, (1,))), _take({}))
    assert layouts.assemble(0, ["e"], torch.zeros(0))["e"].tolist() == [1.0, 2.0, 3.0]
    layouts.load_state_dict(blocks)
    layouts.update(0, ((12, (1,)), (11, (2,))), _take({}))
    with pytest.warns(UserWarning, match="does not match its current parameter shapes"):
        assert layouts.assemble(0, ["e"], torch.zeros(0)) == {}


# ---------------------------------------------------------------------- registry
def test_registry_entries_build_hook_states_with_their_defaults() -> None:
    assert get_args(CompressorName) == tuple(COMPRESSORS)
    for name, entry in COMPRESSORS.items():
        assert set(entry.options) <= set(inspect.signature(entry.cls).parameters), name
        assert isinstance(make_hook_state(name), HookState) and entry.description
    state = make_hook_state("qsgd")
    assert state.compressor.levels == 16 and not state.memory.enabled  # QSGD: no memory by default
    assert make_hook_state("randomk", density=0.1, seed=3).compressor.seed == 3
    assert make_hook_state("powersgd", powersgd_rank=2).state.matrix_approximation_rank == 2
    assert make_hook_state("topk", density=None).compressor.density == 0.01
    assert make_hook_state("topk", sampled=True).compressor.sampled and not make_hook_state("topk").compressor.sampled


def test_registry_rejects_unknown_names_and_foreign_options() -> None:
    with pytest.raises(
        ValueError, match=r"`compressor` must be one of \('topk', 'randomk', 'sign', 'qsgd', 'powersgd'\), got 'top_k'"
    ):
        make_hook_state("top_k")
    with pytest.raises(ValueError, match="levels=4 applies to qsgd, not to 'topk'"):
        make_hook_state("topk", levels=4)
    with pytest.raises(ValueError, match="density=0.5 applies to topk, randomk, not to 'sign'"):
        make_hook_state("sign", density=0.5)
    with pytest.raises(ValueError, match="unknown option denisty=0.5 for 'topk'"):
        make_hook_state("topk", denisty=0.5)
    with pytest.raises(ValueError, match="nesterov=True is not supported by 'powersgd'"):
        make_hook_state("powersgd", nesterov=True)


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
