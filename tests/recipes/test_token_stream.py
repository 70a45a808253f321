"""prepare-text writes litdata token data; TokenStreamDataModule streams it deterministically and resumes exactly."""

import json
import os
import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.cli import main as cli_main
from lightning_gd.recipes import CausalLMModule, TokenStreamDataModule
from lightning_gd.recipes.prepare_text import prepare_text

_TEXTS = {
    "a.txt": "the quick brown fox jumps over the lazy dog\n" * 40,
    "b.txt": "pack my box with five dozen liquor jugs\n" * 40,
    "c.txt": "sphinx of black quartz, judge my vow\n" * 40,
    "d.txt": "how vexingly quick daft zebras jump\n" * 40,
    "empty.txt": "",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, text in _TEXTS.items():
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    info = prepare_text([corpus], out, val_fraction=0.3)
    return out, info


def _all_tokens(split_dir):
    from litdata import StreamingDataset, TokensLoader

    ds = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1), shuffle=False)
    return torch.cat([ds[i] for i in range(len(ds))])


def test_bytes_are_stored_exactly_and_split_by_file(prepared, corpus):
    out, info = prepared
    assert (info.kind, info.vocab_size, info.dtype) == ("bytes", 256, "uint8")
    assert json.loads((out / "tokens.json").read_text())["vocab_size"] == 256
    train, val = _all_tokens(out / "train"), _all_tokens(out / "val")
    expected = sum(len(t.encode()) for t in _TEXTS.values())
    assert len(train) + len(val) == expected  # every byte once, none lost at chunk edges
    assert len(val) > 0 and len(train) > 0
    # The multiset of bytes is exactly the corpus's: split by whole files, nothing re-encoded.
    corpus_counts = torch.bincount(torch.tensor(list(b"".join(t.encode() for t in _TEXTS.values()))), minlength=256)
    assert torch.equal(torch.bincount(torch.cat([train, val]).long(), minlength=256), corpus_counts)


def test_windows_are_next_token_pairs_and_deterministic(prepared):
    out, _ = prepared
    dm = TokenStreamDataModule(str(out / "train"), seq_len=16, batch_size=4, seed=7)
    assert dm.val_dir == str(out / "val")  # found beside train/
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one token
    again = next(iter(TokenStreamDataModule(str(out / "train"), seq_len=16, batch_size=4, seed=7).train_dataloader()))
    other = next(iter(TokenStreamDataModule(str(out / "train"), seq_len=16, batch_size=4, seed=8).train_dataloader()))
    assert torch.equal(x, again[0])
    assert not torch.equal(x, other[0])


def test_hf_tokenizer_and_a_bad_tokenizer_file(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train(
        [str(corpus / "a.txt"), str(corpus / "b.txt")], tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    info = prepare_text([corpus], tmp_path / "out", tokenizer=str(tmp_path / "tokenizer.json"), val_fraction=0.3)
    assert info.kind == "hf" and info.vocab_size == tok.get_vocab_size() and info.dtype == "int32"
    tokens = torch.cat([_all_tokens(tmp_path / "out" / "train"), _all_tokens(tmp_path / "out" / "val")])
    assert int(tokens.max()) < info.vocab_size
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"--tokenizer '{bad}' is not a Hugging Face tokenizer.json"):
        prepare_text([corpus], tmp_path / "never", tokenizer=str(bad))
    assert not (tmp_path / "never").exists()  # refused before any work


def test_cli_prepare_text_refuses_a_bad_tokenizer_and_a_missing_input(tmp_path, capsys):
    bad = tmp_path / "tok.json"
    bad.write_text("[]")
    for args, message in [
        (["--tokenizer", str(bad)], f"--tokenizer '{bad}' is not a Hugging Face tokenizer.json"),
        ([str(tmp_path / "missing")], "does not exist"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["prepare-text", *args, "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, err


def test_not_an_optimized_dataset_names_the_command(tmp_path):
    with pytest.raises(MisconfigurationException, match="is not a litdata optimized dataset.*prepare-text"):
        TokenStreamDataModule(str(tmp_path))
    with pytest.raises(MisconfigurationException, match="`seq_len` must be a positive integer, got 0"):
        TokenStreamDataModule(str(tmp_path), seq_len=0)


def _fit(dm, tmp_path, max_steps, ckpt_path=None, callbacks=()):
    seed_everything(0)
    model = CausalLMModule(overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1}, block_size=16)
    trainer = Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0,
        callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_resume_mid_epoch_sees_the_same_batches(prepared, tmp_path):
    out, _ = prepared

    def dm():
        return TokenStreamDataModule(str(out / "train"), seq_len=16, batch_size=4, seed=3)

    # The uninterrupted run saves a checkpoint at step 4 (same max_steps, so the same LR schedule).
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=4, save_top_k=-1)
    full = _fit(dm(), tmp_path / "full", max_steps=8, callbacks=[ckpt])
    path = os.path.join(tmp_path / "ck", "epoch=0-step=4.ckpt")
    loops = torch.load(path, weights_only=False)["loops"]["fit_loop"]
    assert loops["state_dict"]["combined_loader"][0]["num_samples_yielded"] == 16  # the loader's position
    resumed = _fit(dm(), tmp_path / "second", max_steps=8, ckpt_path=path)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_vocabulary_larger_than_the_model_is_refused(prepared, tmp_path):
    out, _ = prepared
    dm = TokenStreamDataModule(str(out / "train"), seq_len=16, batch_size=4)
    model = CausalLMModule(overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "vocab_size": 100})
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(MisconfigurationException, match=r"vocabulary \(256 tokens, bytes\) is larger.*vocab_size=100"):
        trainer.fit(model, datamodule=dm)


def test_cli_links_the_window_to_the_block_size(tmp_path, monkeypatch):
    # As a new user: a longer window than the recipe's block_size just works.
    from lightning_gd.cli import LightningGDCLI, _resolve_config_names

    monkeypatch.chdir(tmp_path)
    args = _resolve_config_names(["--config", "quickstart", "--data.seq_len", "256", "--trainer.logger", "false"])
    cli = LightningGDCLI(args=args, run=False)
    assert cli.datamodule.hparams.seq_len == 256
    assert cli.model.config.block_size == 256
    assert cli.model(torch.zeros(1, 256, dtype=torch.long)).shape == (1, 256, 256)


def _first_batches(loader, n):
    it = iter(loader)
    return [next(it)[0].clone() for _ in range(n)]


def test_other_settings_are_refused_or_with_warn_restart_the_epoch(prepared):
    # The rule every resumable data module shares (StatefulDataModule): an error naming the change, or with
    # resume_mismatch="warn" one warning and the epoch's data from its beginning.
    out, _ = prepared
    saved = TokenStreamDataModule(str(out / "train"), seq_len=16, batch_size=4, seed=3)
    loader = saved.train_dataloader()
    _first_batches(loader, 2)
    position, entry = loader.state_dict(), saved.state_dict()
    assert entry["settings"]["seq_len"] == 16 and len(entry["rng"]) == 1
    with pytest.raises(MisconfigurationException, match=r"TokenStreamDataModule.*seq_len=16 -> 8.*resume_mismatch"):
        TokenStreamDataModule(str(out / "train"), seq_len=8, batch_size=4, seed=3).load_state_dict(entry)
    fresh = _first_batches(TokenStreamDataModule(str(out / "train"), seq_len=8, batch_size=4, seed=3)
                           .train_dataloader(), 1)  # fmt: skip
    warned = TokenStreamDataModule(str(out / "train"), seq_len=8, batch_size=4, seed=3, resume_mismatch="warn")
    with pytest.warns(UserWarning, match=r"seq_len=16 -> 8.*restarts from its beginning"):
        warned.load_state_dict(entry)
    resumed = warned.train_dataloader()
    resumed.load_state_dict(position)
    assert torch.equal(_first_batches(resumed, 1)[0], fresh[0])  # the epoch's first batch, not the third


def test_a_checkpoint_entry_written_before_the_shared_base_still_loads(prepared):
    # Entries of the earlier TokenStreamDataModule hold only the settings and the RNG states.
    out, _ = prepared
    dm = TokenStreamDataModule(str(out / "train"), seq_len=16, batch_size=4, seed=3)
    old = {"settings": dict(dm.position_settings()), "rng": dm.state_dict()["rng"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.load_state_dict(old)
    assert dm._pending_rng is not None and not dm._resume_plan.restart_epoch


def test_litdata_loader_epoch_reads_the_saved_epoch(prepared):
    from lightning_gd._compat import litdata_loader_epoch

    out, _ = prepared
    loader = TokenStreamDataModule(str(out / "train"), seq_len=16, batch_size=4, seed=3).train_dataloader()
    _first_batches(loader, 1)
    assert litdata_loader_epoch(loader.state_dict()) == 1  # litdata counts epochs from 1
