"""The schedule CausalLMModule advertises, pinned by number: AdamW at lr 1e-3, 5% linear warm-up, cosine to 10%."""

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule


class _LrPerStep(Callback):
    """The lr of every parameter group as each optimizer step uses it."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def test_default_schedule_warms_up_over_5_percent_and_ends_at_10_percent_of_the_peak(tmp_path):
    for i in range(2):
        (tmp_path / f"f{i}.txt").write_text("def add(a, b):\n    return a + b\n" * 100)
    dm = TextCorpusDataModule(data_dir=str(tmp_path), seq_len=16, batch_size=2, train_windows=80, val_windows=2)
    module = CausalLMModule(overrides={"block_size": 16, "n_layer": 1, "n_embd": 16, "n_head": 2, "n_kv_head": 1})
    seen = _LrPerStep()
    trainer = Trainer(
        accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[seen], default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert len(seen.lrs) == 40
    assert all(a == b for a, b in seen.lrs)  # both parameter groups follow the same schedule
    lr = [a for a, _ in seen.lrs]
    peak = 1e-3
    # 5% of 40 steps = 2 warm-up steps from 0: peak/3, 2 peak/3, then the peak at step 2.
    assert lr[:3] == pytest.approx([peak / 3, 2 * peak / 3, peak], rel=1e-12)
    assert max(lr) == pytest.approx(peak, rel=1e-12) and lr.index(max(lr)) == 2
    assert all(b <= a for a, b in zip(lr[2:], lr[3:], strict=False))  # then it only decays
    # Cosine from the peak to the 10% floor over the remaining 38 steps: halfway (step 2 + 19) it is at 55%.
    assert lr[21] == pytest.approx(0.55 * peak, rel=1e-12)
    assert lr[11] == pytest.approx(peak * (0.1 + 0.9 * (1 + math.cos(math.pi * 9 / 38)) / 2), rel=1e-12)
    assert min(lr) > 0.1 * peak
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * peak, rel=1e-12)  # after the last step: the floor
