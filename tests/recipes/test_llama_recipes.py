"""The llama-* pretraining recipes parse, state their global batch truthfully, and train (shrunk) on CPU."""

import csv
import math
import re

import pytest
import torch
import yaml

from lightning_gd.cli import main
from lightning_gd.recipes import recipe_path, recipes
from lightning_gd.recipes.prepare_text import prepare_text

_LLAMA = sorted(n for n in recipes() if n.startswith("llama-"))
_GPU = [n for n in _LLAMA if n != "llama-tiny"]


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path_factory.mktemp("tokens")
    prepare_text([root], out, val_fraction=0.3)
    return out


def test_the_family_is_shipped():
    assert _LLAMA == ["llama-125m", "llama-1b", "llama-350m", "llama-tiny"]


@pytest.mark.parametrize("name", _GPU)
def test_gpu_recipes_parse_and_the_header_states_the_global_batch(name, token_data, capsys):
    # Parsed and validated by the CLI (no model is built: --print_config stops before instantiation).
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", name, "--data.train_dir", str(token_data / "train"), "--print_config"])
    assert done.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    assert trainer["precision"] == "bf16-mixed"
    assert model["preset"] == name.removeprefix("llama-")
    assert model["activation_checkpointing"] == (name == "llama-1b")
    text = recipe_path(name).read_text()
    stated = int(re.search(r"Global batch: ([\d,]+) tokens", text).group(1).replace(",", ""))
    assert stated == data["batch_size"] * data["seq_len"] * trainer["accumulate_grad_batches"]
    # The 8-GPU variants keep the same global batch.
    acc8 = int(
        re.search(r"--trainer.devices 8 --trainer.strategy ddp --trainer.accumulate_grad_batches (\d+)", text)[1]
    )
    assert acc8 * 8 == trainer["accumulate_grad_batches"]
    assert "deepspeed_stage_2" in text and "--model.compile true" in text


def test_the_1b_recipe_trains_shrunk_on_cpu(token_data, tmp_path, monkeypatch):
    # The recipe's own code path (stream, accumulation, activation checkpointing, schedule, throughput) with a tiny
    # model on CPU; the other GPU recipes differ only in numbers, checked above.
    name = "llama-1b"
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", name, "--data.train_dir", str(token_data / "train"), "--model.preset", "tiny",
        "--data.seq_len", "32", "--data.batch_size", "2", "--data.num_workers", "0",
        "--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "0.05",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    rows = list(csv.DictReader(open(next(tmp_path.glob(f"runs/{name}/version_0/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert val and 0 < val[0] < math.log(256) + 1  # validated on the val split (byte-level: below ln 256 + 1)
    assert any(r.get("train/lengths") for r in rows)  # ThroughputMonitor counted tokens


def test_llama_tiny_trains_on_cpu_and_logs_tokens_per_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", "llama-tiny", "--trainer.max_steps", "22", "--trainer.val_check_interval", "22",
        "--trainer.limit_val_batches", "1", "--data.seq_len", "32", "--data.batch_size", "4",
        "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "runs/llama-tiny/version_0/metrics.csv")))
    rates = [float(r["train/device/items_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    assert rates and all(v > 0 for v in rates)  # tokens/s once the 20-batch window is full
    samples = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")]
    assert rates[-1] == pytest.approx(samples[-1] * 32, rel=1e-6)  # tokens = sequences x seq_len
    assert not any("train/device/mfu" in r and r["train/device/mfu"] for r in rows)  # no peak known on CPU
    assert torch.isfinite(torch.tensor([float(r["val/loss"]) for r in rows if r.get("val/loss")])).all()


def test_recipes_command_shows_a_recipes_variants(capsys):
    main(["recipes", "llama-1b"])
    out = capsys.readouterr().out
    assert (
        "lightning-gd fit --config llama-1b" in out and "deepspeed_stage_2" in out and "--model.optimizer_recipe" in out
    )
    assert "seed_everything" not in out  # the header only
    with pytest.raises(SystemExit):
        main(["recipes", "llama-2b"])
    assert "Unknown recipe 'llama-2b'" in capsys.readouterr().err
