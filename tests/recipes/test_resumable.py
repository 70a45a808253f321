"""ResumableDataModule: per-sample seeded augmentation, positions across worker counts, and ConAdv's seek."""

import random

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_gd.recipes import DigitsDataModule, ImageFolderDataModule
from lightning_gd.recipes.resumable import ResumableDataModule
from lightning_gd.strategies.lookahead import LookaheadLoader
from lightning_gd.utils.rng import seeded_rngs


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_seeded_rngs_is_a_function_of_the_key_and_leaves_the_global_streams_alone():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected_after = _draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    with seeded_rngs(7, 1, 42):
        inside = _draws()
    assert _draws() == expected_after  # the block did not move the global streams
    torch.manual_seed(123)
    with seeded_rngs(7, 1, 42):
        assert _draws() == inside  # whatever the global state was
    with seeded_rngs(7, 2, 42):
        other_epoch = _draws()
    with seeded_rngs(7, 1, 43):
        other_index = _draws()
    for a, b, c in zip(inside, other_epoch, other_index, strict=True):
        assert a != b and a != c
    with seeded_rngs(7, 1, 42):
        _draws()
        then = _draws()
    with seeded_rngs(7, 1, 42, restore=False):  # as DataLoader workers use it: the same draws ...
        assert _draws() == inside
    assert _draws() == then  # ... and the global streams are left where the block moved them


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "images"
    # Random crops and flips: every batch depends on the augmentation RNGs.
    kwargs = {"image_size": 16, "batch_size": 2, "pin_memory": False, "persistent_workers": False}
    return lambda workers=0: ImageFolderDataModule(str(root), generate_tiny=True, num_workers=workers, **kwargs)


def _epoch(loader):
    return [x.clone() for x, _ in loader]


def test_image_augmentation_is_a_function_of_seed_epoch_and_index_not_of_workers_or_the_global_rng(images):
    dm = images()
    dm.setup("fit")
    torch.manual_seed(0)
    first = _epoch(dm.train_dataloader())
    state = torch.get_rng_state()
    torch.manual_seed(99)  # another global RNG: the same images, crops and flips
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(dm.train_dataloader()), strict=True))
    torch.set_rng_state(state)
    loader = dm.train_dataloader()
    _epoch(loader), _epoch(dm.val_dataloader())
    assert torch.equal(torch.get_rng_state(), state)  # reading and augmenting drew nothing from the global RNG
    with_workers = images(workers=2)
    with_workers.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(with_workers.train_dataloader()), strict=True))
    # The same image in the next epoch gets another crop: epoch 1 is not epoch 0 in another order.
    loader.sampler.set_epoch(1)
    x0 = loader.dataset[(0, 0)][0]
    assert torch.equal(x0, loader.dataset[(0, 0)][0]) and not torch.equal(x0, loader.dataset[(1, 0)][0])


@pytest.mark.parametrize(("saved_workers", "resumed_workers"), [(0, 0), (0, 2), (2, 1)])
def test_image_loader_position_carries_over_to_another_worker_count(images, saved_workers, resumed_workers):
    dm = images(saved_workers)
    dm.setup("fit")
    full = _epoch(dm.train_dataloader())
    loader = dm.train_dataloader()
    it = iter(loader)
    head = [next(it)[0].clone() for _ in range(2)]
    state = loader.state_dict()
    del it
    resumed_dm = images(resumed_workers)
    resumed_dm.setup("fit")
    resumed = resumed_dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert len(head) + len(rest) == len(full) == 6
    assert all(torch.equal(a, b) for a, b in zip(head + rest, full, strict=True))  # exactly the rest of the epoch


class _CountingDataset(Dataset):
    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return torch.tensor([i])


class _Counting(ResumableDataModule):
    """The class docstring's example, with a dataset that counts its reads."""

    def __init__(self):
        super().__init__()
        self.dataset = _CountingDataset(20)

    def position_settings(self):
        return {"batch_size": 2, "seed": 0, "samples": len(self.dataset)}

    def train_dataloader(self):
        return self.resumable_loader(self.dataset, batch_size=2, seed=0)


def test_conadv_lookahead_seeks_a_resumable_loader_without_reading_the_skipped_batches():
    dm = _Counting()
    full = [int(i) for batch in dm.train_dataloader() for i in batch]
    dm.dataset.reads = 0
    lookahead = LookaheadLoader(dm.train_dataloader(), lambda: 0)
    lookahead.load_state_dict({"epoch": 0, "consumed": 3})
    iter(lookahead)
    assert lookahead.consumed == 3 and lookahead.peek(2) is None  # batch indices continue from the saved position
    assert lookahead.peek(4).flatten().tolist() == full[8:10]
    rest = []
    while (batch := next(lookahead, None)) is not None:  # continues the iterator begun above
        rest += [int(i) for i in batch]
    assert rest == full[6:] and dm.dataset.reads == len(full) - 6  # the 3 batches trained on were not read


@pytest.mark.parametrize(("saved_workers", "resumed_workers"), [(0, 0), (2, 2), (2, 0)])
def test_a_loader_state_written_before_the_position_sampler_still_resumes_exactly(saved_workers, resumed_workers):
    # The earlier loaders were a StatefulDataLoader over a plain seeded DistributedSampler: their position is
    # torchdata's own count (read through lightning_gd._compat).
    dm = _Counting()
    full = [int(i) for batch in dm.train_dataloader() for i in batch]
    sampler = DistributedSampler(dm.dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    old = StatefulDataLoader(dm.dataset, batch_size=2, sampler=sampler, num_workers=saved_workers, drop_last=True)
    it = iter(old)
    head = [int(i) for _ in range(3) for i in next(it)]
    state = old.state_dict()
    del it
    assert "lightning_gd_samples_read" not in str(state)  # the old format
    resumed = _Counting()
    resumed.num_workers = resumed_workers
    loader = resumed.resumable_loader(resumed.dataset, batch_size=2, seed=0, num_workers=resumed_workers)
    loader.load_state_dict(state)
    rest = [int(i) for batch in loader for i in batch]
    assert head + rest == full


def test_a_subclass_without_position_settings_and_bad_arguments_say_what_is_wrong(images):
    with pytest.raises(NotImplementedError, match="position_settings"):
        ResumableDataModule().state_dict()
    with pytest.raises(MisconfigurationException, match=r"resume_mismatch.*'never'"):
        DigitsDataModule(resume_mismatch="never")
    with pytest.raises(MisconfigurationException, match=r"num_workers.*-1"):
        images(workers=-1)


def test_image_checkpoint_with_another_batch_size_is_refused_naming_it(images):
    saved = images()
    saved.setup("fit")
    state = saved.state_dict()
    assert state["settings"] == {"batch_size": 2, "seed": 0, "train_images": 12, "classes": 3}
    other = images()
    other.batch_size = 4
    with pytest.raises(MisconfigurationException, match=r"ImageFolderDataModule.*batch_size=2 -> 4"):
        other.load_state_dict(state)
