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
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 200)
    (tmp_path / "skip.md").write_text("not matched")
    dm = TextCorpusDataModule(data_dir=str(tmp_path), seq_len=16, batch_size=2, val_fraction=0.3)
    assert [f.name for f in dm.files] == [f"doc{i}.txt" for i in range(6)]
    dm.setup()
    assert len(dm.val_data) > 0 and len(dm.train_data) > len(dm.val_data)


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
    with pytest.raises(MisconfigurationException, match="seq_len"):
        TextCorpusDataModule(seq_len=0)
    with pytest.raises(MisconfigurationException, match="val_fraction"):
        TextCorpusDataModule(val_fraction=1.0)
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.txt").write_text("y" * 100)
    dm = TextCorpusDataModule(data_dir=str(tmp_path), seq_len=150)
    with pytest.raises(MisconfigurationException, match=r"`seq_len`=150 is longer than the shortest split"):
        dm.setup()
