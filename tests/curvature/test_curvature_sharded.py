"""The estimators on sharded operators (vectors split across 2 gloo ranks) against the same unsharded operators.

One job (``_sharded_job.py``, torch only): a dense float64 matrix split unevenly and out of order across the ranks
(exact products: the sharded estimators must reproduce the unsharded ones to rounding), and a float64 MLP under
FSDP2 (``fully_shard``) measured by :class:`FiniteDifferenceOperator` from the sharded backward's gradients, against
the exact Hessian of the global batch on an unsharded copy, with the same seeds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers.ddp import run_spawned

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_spawned("tests.curvature._sharded_job", tmp_path_factory.mktemp("sharded"), world=WORLD)


def _index(scenario: dict[str, Any]) -> torch.Tensor:
    if "index" in scenario:
        return scenario["index"]
    return torch.cat([torch.arange(start, start + n) for start, n in scenario["segments"]])


def _assemble(ranks: list[dict[str, Any]], scenario: str, key: str) -> torch.Tensor:
    """The global vectors from every rank's part (vectors as columns; probes, drawn as rows, are transposed)."""
    rows = key in ("rademacher", "gaussian")
    whole = ranks[0][scenario]["whole"][key]
    out = torch.full_like(whole.T if rows else whole, float("nan"))
    for r in ranks:
        part = r[scenario]["sharded"][key]
        out[_index(r[scenario])] = part.T if rows else part
    return out


@pytest.mark.parametrize(("scenario", "rel"), [("dense", 1e-12), ("fsdp", 1e-8)])
def test_sharded_estimators_match_the_unsharded_ones(ranks, scenario, rel):
    # rel: rounding only for the exact dense products; central differences in float64 (about 1e-10) for FSDP2.
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["sharded"]["top"] == r1["sharded"]["top"]  # every rank runs the same iteration
    whole, sharded = r0["whole"], r0["sharded"]
    for key in ("top", "bottom", "restarted"):
        assert sharded[key] == pytest.approx(whole[key], rel=rel), key
    for method in ("hutchinson", "hutch++", "xtrace"):  # the same probes: the same estimate, not just a close one
        (value, stderr, per_param), (ref, ref_stderr, ref_per_param) = sharded[method], whole[method]
        assert (value, stderr) == pytest.approx((ref, ref_stderr), rel=rel), method
        assert r1["sharded"][method][:2] == (value, stderr)
        assert sum(per_param.values()) == pytest.approx(value, rel=1e-9)
        if scenario == "fsdp":  # the parameters are the same on both sides: each one's block trace too
            assert per_param == pytest.approx(ref_per_param, rel=1e-6, abs=1e-9)
    nodes, weights = sharded["density"]
    torch.testing.assert_close(nodes, whole["density"][0], rtol=rel, atol=rel)
    torch.testing.assert_close(weights, whole["density"][1], rtol=1e-6, atol=rel)


@pytest.mark.parametrize("scenario", ["dense", "fsdp"])
def test_every_rank_holds_its_part_of_the_same_global_vectors(ranks, scenario):
    sizes = [len(_index(r[scenario])) for r in ranks]
    assert sum(sizes) == ranks[0][scenario]["whole"]["rademacher"].shape[1] and min(sizes) > 0
    for key in ("rademacher", "gaussian"):  # the same seed: the unsharded draw, bit for bit
        assert torch.equal(_assemble(ranks, scenario, key), ranks[0][scenario]["whole"][key].T), key
    vectors = _assemble(ranks, scenario, "top_vectors")  # Ritz vectors: the same up to sign (block: up to rotation)
    overlap = vectors.T @ ranks[0][scenario]["whole"]["top_vectors"]
    torch.testing.assert_close(overlap.abs().sum(dim=0), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


def test_fsdp2_products_leave_weights_and_gradients_as_found(ranks):
    for r in ranks:
        fsdp = r["fsdp"]
        product, exact = fsdp["product"]
        assert ((product - exact).norm() / exact.norm()).item() < 1e-8
        assert fsdp["weights_equal"] and fsdp["grads_kept"]  # bit-identical shards; the found .grad objects
        assert fsdp["loss"] == fsdp["local_loss"]
        assert fsdp["numel"] < fsdp["global_numel"]  # each rank holds its shards only
    assert ranks[0]["fsdp"]["numel"] + ranks[1]["fsdp"]["numel"] == ranks[0]["fsdp"]["global_numel"]
    assert not ranks[0]["lightning_imported"]  # the math layer
