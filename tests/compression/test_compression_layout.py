"""BucketLayouts: memories follow their parameters through DDP's bucket regroupings."""

from collections.abc import Callable

import pytest
import torch

from lightning_gd.compression import (
    BucketLayouts,
)


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
