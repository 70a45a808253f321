"""``compressed_allreduce_hook`` in a real 2-process gloo DDP job on CPU.

The job (``_ddp_worker.py``, launched by ``tests/helpers/ddp.py``) runs once per module; every scenario records,
per step and bucket, the local gradient entering the hook and the averaged gradient leaving it. Here the outputs
are recomputed by hand from both ranks' inputs.
"""

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_gd.compression import QSGD, RandomK
from tests.helpers.ddp import run_spawned

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    # Two ranks of _ddp_worker.run (torch.multiprocessing; the runner retries a port taken meanwhile).
    return run_spawned("tests.compression._ddp_worker", tmp_path_factory.mktemp("ddp_compression"), world=WORLD)


def _k(density: float, n: int) -> int:
    return max(1, int(density * n + 0.5))


def _numels(result: dict[str, Any]) -> dict[str, int]:
    return {name: g.numel() for name, g in result["grads"][0].items()}


def _topk_sender(density: float) -> Callable[[int, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
    """Top-k by hand: the k largest magnitudes are sent exactly."""

    def send(rank: int, p: torch.Tensor, rec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.topk(p.abs(), _k(density, p.numel())).indices
        sent = torch.zeros_like(p)
        sent[idx] = p[idx]
        return sent, idx

    return send


def _hand_replay(
    ranks: list[dict[str, Any]],
    scenario: str,
    send: Callable[[int, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]],
    momentum: float | None = None,
    dense: Callable[[dict[str, Any]], bool] = lambda rec: False,
) -> tuple[list[torch.Tensor], list[float]]:
    """Replay compression with error feedback (or DGC momentum correction) for every rank.

    ``send(rank, p, record)`` returns what one rank sends of ``p`` (dense) and the sent indices; records for
    which ``dense(record)`` holds are averaged uncompressed and leave the memories alone. Memories are kept per
    parameter, so DDP's bucket rebuild after step 0 is followed exactly. Returns the expected hook output of
    every record and rank 0's error norm after each step.
    """
    numels = _numels(ranks[0][scenario])
    mem: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in ranks]
    recs = [r[scenario]["records"] for r in ranks]
    expected, error_norms = [], []
    for i in range(len(recs[0])):
        total = None
        for r in range(len(ranks)):
            rec = recs[r][i]
            names, g = rec["params"], rec["grad_in"]

            def cat(kind: str, names: list[str] = names, r: int = r) -> torch.Tensor:
                return torch.cat([mem[r].get(n, {}).get(kind, torch.zeros(numels[n])) for n in names])

            if dense(rec):
                total = g if total is None else total + g
                continue
            if momentum is None:
                p = g + cat("e")  # p_t = g_t + e_t
            else:
                u = momentum * cat("u") + g  # u_t = m u_{t-1} + g_t
                p = cat("v") + u  # v_t = v_{t-1} + u_t
            sent, idx = send(r, p, rec)
            if momentum is None:
                new = {"e": p - sent}
            else:
                u[idx], p[idx] = 0.0, 0.0  # momentum factor masking
                new = {"u": u, "v": p}
            for kind, flat in new.items():
                for n, piece in zip(names, flat.split([numels[n] for n in names]), strict=True):
                    mem[r].setdefault(n, {})[kind] = piece
            total = sent if total is None else total + sent
        expected.append(total / len(ranks))
        if i + 1 == len(recs[0]) or recs[0][i + 1]["step"] != recs[0][i]["step"]:
            kind = "e" if momentum is None else "v"
            error_norms.append(math.sqrt(sum(float(m[kind].pow(2).sum()) for m in mem[0].values() if kind in m)))
    return expected, error_norms


def _records(ranks: list[dict[str, Any]], scenario: str) -> list[tuple[dict[str, Any], ...]]:
    pairs = list(zip(*(r[scenario]["records"] for r in ranks), strict=True))
    for pair in pairs:
        assert len({(rec["step"], rec["bucket"]) for rec in pair}) == 1  # same bucket order on all ranks
    return pairs


# ---------------------------------------------------------------------- tests
def test_compression_layer_does_not_import_lightning(ranks: list[dict[str, Any]]) -> None:
    assert not ranks[0]["lightning_imported"]


def test_topk_full_density_equals_dense_allreduce(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        for step, grads in r["dense_ref"].items():
            for name, g in grads.items():
                torch.testing.assert_close(r["topk_full"]["grads"][step][name], g, rtol=0, atol=1e-7)
    for rec0, rec1 in _records(ranks, "topk_full"):
        torch.testing.assert_close(rec0["out"], (rec0["grad_in"] + rec1["grad_in"]) / 2, rtol=0, atol=1e-7)


def test_topk10_with_error_feedback_matches_hand_computation(ranks: list[dict[str, Any]]) -> None:
    expected, error_norms = _hand_replay(ranks, "topk10", _topk_sender(0.1))
    pairs = _records(ranks, "topk10")
    assert {len(p[0]["params"]) for p in pairs} == {4, 2}  # one bucket at step 0, two after the rebuild
    for (rec0, rec1), exp in zip(pairs, expected, strict=True):
        torch.testing.assert_close(rec0["out"], exp, rtol=0, atol=1e-7)
        assert torch.equal(rec0["out"], rec1["out"])
        # DDP copied the hook's output into .grad
        res = ranks[0]["topk10"]
        pieces = rec0["out"].split([_numels(res)[n] for n in rec0["params"]])
        for name, piece in zip(rec0["params"], pieces, strict=True):
            assert torch.equal(res["grads"][rec0["step"]][name].flatten(), piece)
    got = [s["error_norm"] for s in ranks[0]["topk10"]["stats"]]
    assert got == pytest.approx(error_norms, rel=1e-5)


def test_dgc_momentum_correction_matches_hand_computation(ranks: list[dict[str, Any]]) -> None:
    expected, error_norms = _hand_replay(ranks, "dgc", _topk_sender(0.25), momentum=0.9)
    for (rec0, _), exp in zip(_records(ranks, "dgc"), expected, strict=True):
        torch.testing.assert_close(rec0["out"], exp, rtol=1e-6, atol=1e-7)
    assert [s["error_norm"] for s in ranks[0]["dgc"]["stats"]] == pytest.approx(error_norms, rel=1e-5)


def test_randomk_allreduces_values_on_shared_indices(ranks: list[dict[str, Any]]) -> None:
    comp = RandomK(0.25, seed=5)
    calls: dict[int, int] = {}
    for rec0, rec1 in _records(ranks, "randomk"):
        key, n = rec0["bucket"], rec0["grad_in"].numel()
        idx = comp.indices(n, key=key, step=calls.get(key, 0))
        calls[key] = calls.get(key, 0) + 1
        expected = torch.zeros(n)
        expected[idx] = (rec0["grad_in"][idx] + rec1["grad_in"][idx]) / 2
        torch.testing.assert_close(rec0["out"], expected, rtol=0, atol=1e-7)
        assert torch.equal(rec0["out"], rec1["out"])


def test_sign_averages_scaled_signs(ranks: list[dict[str, Any]]) -> None:
    for rec0, rec1 in _records(ranks, "sign"):

        def scaled_sign(g: torch.Tensor) -> torch.Tensor:
            return torch.where(g >= 0, 1.0, -1.0) * g.abs().mean()  # ||g||_1 / d * sign(g)

        expected = (scaled_sign(rec0["grad_in"]) + scaled_sign(rec1["grad_in"])) / 2
        torch.testing.assert_close(rec0["out"], expected)
        assert torch.equal(rec0["out"], rec1["out"])


def test_qsgd_output_is_the_mean_of_every_ranks_seeded_quantization(ranks: list[dict[str, Any]]) -> None:
    # Each rank rounds with its own noise: QSGD(4, seed=1) salted with the rank, one call per bucket and step.
    comps = [QSGD(4, seed=1) for _ in ranks]
    for r, comp in enumerate(comps):
        comp.salt = r

    def send(rank: int, p: torch.Tensor, rec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        comp = comps[rank]
        return comp.decompress(comp.compress(p, key=rec["bucket"])), torch.empty(0, dtype=torch.long)

    expected, error_norms = _hand_replay(ranks, "qsgd", send)
    for (rec0, rec1), exp in zip(_records(ranks, "qsgd"), expected, strict=True):
        assert torch.equal(rec0["out"], rec1["out"])
        torch.testing.assert_close(rec0["out"], exp, rtol=1e-6, atol=1e-7)
    assert [s["error_norm"] for s in ranks[0]["qsgd"]["stats"]] == pytest.approx(error_norms, rel=1e-5)
    assert all(e > 0 for e in error_norms)


BYTES: dict[str, Callable[[int], int]] = {
    "topk10": lambda n: _k(0.1, n) * (4 + 4),  # fp32 values + int32 indices
    "dgc": lambda n: _k(0.25, n) * (4 + 4),
    "randomk": lambda n: _k(0.25, n) * 4,  # values only
    "sign": lambda n: math.ceil(n / 8) + 4,  # packed signs + fp32 scale
    "qsgd": lambda n: 4 + math.ceil(n * 4 / 8),  # fp32 norm + 4-bit codes (s = 4)
    "warmup": lambda n: 4 * n if n < 100 else _k(0.1, n) * 8,  # min_numel=100
}


@pytest.mark.parametrize("scenario", sorted(BYTES))
def test_bytes_accounting_equals_analytic_payload(ranks: list[dict[str, Any]], scenario: str) -> None:
    for r in ranks:
        stats = r[scenario]["stats"]
        per_step: dict[int, list[int]] = {}
        for rec in r[scenario]["records"]:
            per_step.setdefault(rec["step"], []).append(rec["grad_in"].numel())
        for step, numels in per_step.items():
            dense = sum(4 * n for n in numels)
            sent = dense if scenario == "warmup" and step == 0 else sum(BYTES[scenario](n) for n in numels)
            assert stats[step]["step"] == step
            assert stats[step]["bytes_sent"] == sent
            assert stats[step]["dense_bytes"] == dense
            assert stats[step]["ratio"] == pytest.approx(dense / sent)


def test_warmup_and_small_buckets_go_dense(ranks: list[dict[str, Any]]) -> None:
    def dense(rec: dict[str, Any]) -> bool:
        return rec["step"] == 0 or rec["grad_in"].numel() < 100

    expected, error_norms = _hand_replay(ranks, "warmup", _topk_sender(0.1), dense=dense)
    for (rec0, rec1), exp in zip(_records(ranks, "warmup"), expected, strict=True):
        if dense(rec0):
            torch.testing.assert_close(rec0["out"], (rec0["grad_in"] + rec1["grad_in"]) / 2, rtol=0, atol=1e-7)
        torch.testing.assert_close(rec0["out"], exp, rtol=0, atol=1e-7)
    stats = ranks[0]["warmup"]["stats"]
    assert [s["compressed_buckets"] for s in stats] == [0, 1, 1]
    assert [s["error_norm"] for s in stats] == pytest.approx(error_norms, rel=1e-5) and stats[0]["error_norm"] == 0.0


def test_bf16_warmup_sends_the_mean_in_bfloat16_then_compresses(ranks: list[dict[str, Any]]) -> None:
    records = _records(ranks, "warmup_bf16")
    for rec0, rec1 in records:
        if rec0["step"] == 0:  # torch's bf16_compress_hook: each rank's g / 2 in bfloat16, summed, back to fp32
            half = (rec0["grad_in"].to(torch.bfloat16) / 2, rec1["grad_in"].to(torch.bfloat16) / 2)
            expected = (half[0] + half[1]).float()
            assert torch.equal(rec0["out"], expected) and torch.equal(rec1["out"], expected)
            assert not torch.equal(rec0["out"], (rec0["grad_in"] + rec1["grad_in"]) / 2)  # not the fp32 mean
    stats = ranks[0]["warmup_bf16"]["stats"]
    assert stats[0]["bytes_sent"] == stats[0]["dense_bytes"] / 2 and stats[0]["compressed_buckets"] == 0
    assert stats[1]["compressed_buckets"] > 0 and stats[1]["bytes_sent"] < stats[1]["dense_bytes"] / 2


@pytest.mark.parametrize("scenario", ["resume_gather", "resume_local"])
def test_state_dict_round_trip_mid_run_reproduces_the_uninterrupted_run(
    ranks: list[dict[str, Any]], scenario: str
) -> None:
    for r in ranks:
        resumed = r[scenario]
        assert resumed["warnings"] == []
        # the restarted DDP uses its initial parameter order, the snapshot the rebuilt one
        assert resumed["records"][0]["params"] != resumed["records"][-1]["params"]
        for step, grads in resumed["grads"].items():
            for name, g in grads.items():
                assert torch.equal(g, r["uninterrupted"]["grads"][step][name]), (scenario, step, name)


def test_resume_with_several_buckets_compresses_the_first_step_in_the_saved_buckets(
    ranks: list[dict[str, Any]],
) -> None:
    for r in ranks:
        resumed = r["resume_buckets"]
        assert resumed["warnings"] == []
        # the restarted DDP's first step is one bucket of all 4 parameters, the uninterrupted run has two there
        assert len(resumed["records"][0]["params"]) == 4 and len(resumed["records"][-1]["params"]) == 2
        for step, grads in resumed["grads"].items():
            for name, g in grads.items():
                assert torch.equal(g, r["uninterrupted_buckets"]["grads"][step][name]), (step, name)


def test_resume_without_module_drops_mismatched_bucket_memory_with_warning(
    ranks: list[dict[str, Any]],
) -> None:
    for r in ranks:
        assert any("does not match its current parameter shapes" in w for w in r["resume_unbound"]["warnings"])
        assert all(torch.isfinite(g).all() for grads in r["resume_unbound"]["grads"].values() for g in grads.values())
