"""The compressor registry (entries, defaults, declared hook options) and PowerSGD's checkpoints."""

import inspect
import io
from typing import get_args

import numpy as np
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

from lightning_gd.compression import (
    COMPRESSORS,
    CompressorName,
    HookState,
    load_powersgd_state_dict,
    make_hook_state,
    powersgd_state_dict,
)


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
