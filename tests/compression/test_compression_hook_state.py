"""CompressionHookState's bookkeeping: argument checks, density schedule, checkpoint formats and rank memories."""

import io
import warnings

import pytest
import torch

from lightning_gd.compression import (
    QSGD,
    CompressionHookState,
    NoMemory,
    PowerSGDHookState,
    Sign,
    TopK,
    make_hook_state,
)


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
