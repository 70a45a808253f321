import sysconfig
import zlib
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.recipes import TextCorpusDataModule


@pytest.fixture(scope="module")
def stdlib_dm():
    dm = TextCorpusDataModule(seq_len=64, batch_size=4, train_windows=32, val_windows=8)
    dm.setup("fit")
    return dm


def test_default_corpus_is_the_stdlib_without_site_packages(stdlib_dm):
    root = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib_dm.root == root
    assert len(stdlib_dm.files) > 500
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in stdlib_dm.files)
    total = len(stdlib_dm.train_data) + len(stdlib_dm.val_data)
    assert total > 10_000_000  # tens of MB of real text
    assert 0.01 < len(stdlib_dm.val_data) / total < 0.15


def test_split_is_deterministic_and_by_file(stdlib_dm):
    other = TextCorpusDataModule(seq_len=64, batch_size=4, train_windows=32, val_windows=8)
    other.setup("fit")
    assert torch.equal(other.val_data, stdlib_dm.val_data)
    # whole files, chosen by a hash of the relative path, joined by newlines
    root = stdlib_dm.root
    val = [f for f in stdlib_dm.files if zlib.crc32(f.relative_to(root).as_posix().encode()) / 2**32 < 0.05]
    train = [f for f in stdlib_dm.files if f not in set(val)]
    assert bytes(stdlib_dm.val_data.numpy()) == b"\n".join(f.read_bytes() for f in val)
    assert len(stdlib_dm.train_data) == sum(f.stat().st_size for f in train) + len(train) - 1


def test_windows_are_next_byte_pairs(stdlib_dm):
    x, y = next(iter(stdlib_dm.train_dataloader()))
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256
    ds = stdlib_dm.val_dataloader().dataset
    s = int(ds.starts[0])
    assert torch.equal(ds[0][0], stdlib_dm.val_data[s : s + 64].long())


def test_user_directory_with_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(6):
        (tmp_path / ("sub" if i % 2 else ".") / f"doc{i}.md").write_text(f"document {i} " * 200)
    (tmp_path / "notes.txt").write_text("the default pattern (**/*.txt) would take this file only")
    (tmp_path / "sub" / "skip.rst").write_text("not matched")
    dm = TextCorpusDataModule(data_dir=str(tmp_path), glob="**/*.md", seq_len=16, batch_size=2, val_fraction=0.3)
    assert sorted(f.name for f in dm.files) == [f"doc{i}.md" for i in range(6)]
    assert {f.parent.name for f in dm.files} == {tmp_path.name, "sub"}  # ** reaches the subdirectory
    dm.setup()
    assert len(dm.val_data) > 0 and len(dm.train_data) > len(dm.val_data)
    assert b"notes" not in bytes(dm.train_data.tolist()) + bytes(dm.val_data.tolist())
    default = TextCorpusDataModule(data_dir=str(tmp_path))  # no glob: **/*.txt
    assert [f.name for f in default.files] == ["notes.txt"]
    with pytest.raises(MisconfigurationException, match=r"No files match `glob`='\*\.py'"):
        TextCorpusDataModule(data_dir=str(tmp_path), glob="*.py")


def test_single_file_is_split_by_position(tmp_path):
    text = bytes(range(256)) * 40
    path = tmp_path / "one.txt"
    path.write_bytes(text)
    dm = TextCorpusDataModule(data_dir=str(path), seq_len=32, val_fraction=0.25)
    dm.setup()
    assert bytes(dm.train_data.tolist()) == text[: len(text) * 3 // 4]
    assert bytes(dm.val_data.tolist()) == text[len(text) * 3 // 4 :]


def test_same_seed_same_windows_other_seed_other_windows():
    a = TextCorpusDataModule(seq_len=32, train_windows=16, seed=1)
    b = TextCorpusDataModule(seq_len=32, train_windows=16, seed=1)
    c = TextCorpusDataModule(seq_len=32, train_windows=16, seed=2)
    for dm in (a, b, c):
        dm.setup()
    starts = [dm.train_dataloader().dataset.starts for dm in (a, b, c)]
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])


def test_bad_input(tmp_path):
    with pytest.raises(MisconfigurationException, match="does not exist"):
        TextCorpusDataModule(data_dir=str(tmp_path / "missing"))
    with pytest.raises(MisconfigurationException, match=r"No files match `glob`='\*\*/\*.txt'"):
        TextCorpusDataModule(data_dir=str(tmp_path))
    # Every bad-argument error names the argument and the value it got.
    with pytest.raises(MisconfigurationException, match=r"`seq_len` must be a positive integer, got 0"):
        TextCorpusDataModule(seq_len=0)
    with pytest.raises(MisconfigurationException, match=r"`seq_len` must be a positive integer, got 12.5"):
        TextCorpusDataModule(seq_len=12.5)
    with pytest.raises(MisconfigurationException, match=r"`batch_size` must be a positive integer, got -4"):
        TextCorpusDataModule(batch_size=-4)
    with pytest.raises(MisconfigurationException, match=r"`val_fraction` must be in \(0, 1\), got 1.0"):
        TextCorpusDataModule(val_fraction=1.0)
    with pytest.raises(MisconfigurationException, match=r"`val_fraction` must be in \(0, 1\), got -0.1"):
        TextCorpusDataModule(val_fraction=-0.1)
    with pytest.raises(MisconfigurationException, match=r"`num_workers` must be an integer >= 0, got -1"):
        TextCorpusDataModule(num_workers=-1)
    with pytest.raises(
        MisconfigurationException, match=r"`resume_mismatch` must be one of \('error', 'warn'\), got 'x'"
    ):
        TextCorpusDataModule(resume_mismatch="x")
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.txt").write_text("y" * 100)
    dm = TextCorpusDataModule(data_dir=str(tmp_path), seq_len=150)
    with pytest.raises(MisconfigurationException, match=r"`seq_len`=150 is longer than the shortest split"):
        dm.setup()


def _order(loader, n=None):
    out = []
    for i, (x, _) in enumerate(loader):
        if n is not None and i == n:
            break
        out.append(x[:, 0].tolist())
    return out


def test_training_order_depends_on_seed_and_epoch_only(stdlib_dm):
    # Not on the global RNG (which dropout uses) and not on the number of workers.
    torch.manual_seed(0)
    first = _order(stdlib_dm.train_dataloader())
    torch.manual_seed(1)
    assert _order(stdlib_dm.train_dataloader()) == first
    loader = stdlib_dm.train_dataloader()
    loader.sampler.set_epoch(1)  # Lightning calls set_epoch every epoch: a new order
    assert _order(loader) != first
    state = torch.get_rng_state()
    _order(stdlib_dm.train_dataloader())
    _order(stdlib_dm.val_dataloader())
    assert torch.equal(torch.get_rng_state(), state)  # the loaders drew nothing from the global RNG


@pytest.mark.parametrize(("saved_workers", "resumed_workers"), [(0, 0), (0, 2), (2, 0), (2, 1)])
def test_loader_position_carries_over_to_another_worker_count(saved_workers, resumed_workers):
    dm = TextCorpusDataModule(seq_len=32, batch_size=4, train_windows=40, val_windows=8, num_workers=saved_workers)
    dm.setup()
    full = _order(dm.train_dataloader())
    loader = dm.train_dataloader()
    it = iter(loader)
    head = [next(it)[0][:, 0].tolist() for _ in range(3)]
    state = loader.state_dict()
    del it
    dm.hparams.num_workers = resumed_workers
    resumed = dm.train_dataloader()
    assert resumed.num_workers == resumed_workers
    resumed.load_state_dict(state)
    assert head + _order(resumed) == full  # exactly the rest of the epoch
