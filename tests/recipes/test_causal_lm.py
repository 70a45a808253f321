import math

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_gd.optim import WarmupDecayLR
from lightning_gd.optim.recipe import decay_groups
from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule
from tests.helpers.trainer import quiet_trainer


@pytest.fixture
def corpus(tmp_path):
    # A small, very learnable corpus: repeated lines of code.
    for i in range(4):
        (tmp_path / f"f{i}.txt").write_text("def add(a, b):\n    return a + b\n" * 300)
    return str(tmp_path)


def _trainer(tmp_path, **kw):
    return quiet_trainer(tmp_path, **{"max_steps": 30, "limit_val_batches": 2, "val_check_interval": 30,
                                      "num_sanity_val_steps": 0, **kw})  # fmt: skip


def test_param_groups_exclude_norms_and_embeddings_from_decay():
    module = CausalLMModule(overrides={"n_layer": 1})
    decay, no_decay = decay_groups(module.model)
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {
        "embed.weight", "blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight", "norm.weight",
    }  # fmt: skip
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == module.model.num_parameters()  # the tied head is listed once


def test_default_optimizer_and_schedule_train_the_model(tmp_path, corpus):
    seed_everything(0)
    dm = TextCorpusDataModule(data_dir=corpus, seq_len=32, batch_size=8, val_windows=16, train_windows=400)
    module = CausalLMModule(overrides={"block_size": 32, "n_layer": 2})
    trainer = _trainer(tmp_path)
    first = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm)
    last = trainer.callback_metrics["val/loss"].item()
    assert first > 5.0 and last < 0.5 * first
    assert trainer.callback_metrics["val/ppl"].item() == pytest.approx(math.exp(last), rel=1e-4)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, WarmupDecayLR) and sched.total_steps == 30
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * sched.lr_factor(30))


def test_optimizer_and_scheduler_callables(tmp_path, corpus):
    dm = TextCorpusDataModule(data_dir=corpus, seq_len=16, batch_size=4, train_windows=40)
    module = CausalLMModule(
        overrides={"block_size": 16, "n_layer": 1},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, weight_decay=0.01),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    )
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.25)


def test_resume_continues_step_and_schedule(tmp_path, corpus):
    dm = TextCorpusDataModule(data_dir=corpus, seq_len=16, batch_size=4, train_windows=400)
    module = CausalLMModule(overrides={"block_size": 16, "n_layer": 1})
    trainer = _trainer(tmp_path, max_steps=5, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "five.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _trainer(tmp_path, max_steps=10, limit_val_batches=0)
    resumed.fit(CausalLMModule(overrides={"block_size": 16, "n_layer": 1}), datamodule=dm, ckpt_path=ckpt)
    assert resumed.global_step == 10
    sched = resumed.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 10 and sched.total_steps == 5  # the schedule saved with the run continues


class _FlopsSeen(Callback):
    """What ``flops_per_batch`` says at each batch end, where ``ThroughputMonitor`` reads it."""

    def __init__(self) -> None:
        self.train: list[int] = []
        self.val: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(pl_module.flops_per_batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val.append(pl_module.flops_per_batch)


def _counted(module, batch, backward):
    """FLOPs of the module's loss on ``batch`` as torch's counter sees them (math attention: plain matmuls)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if backward:
            module._loss(batch)[0].backward()
        else:
            with torch.no_grad():
                module._loss(batch)
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_flops_per_batch_match_the_counter_for_training_and_validation(tmp_path):
    # Training batches of 2 x 16 tokens and validation batches of 3 x 8: the validation figure must be a forward
    # pass of the validation batch, not the training batch's forward + backward (3.0x too high before).
    gen = torch.Generator().manual_seed(0)
    tokens = {
        "train": torch.randint(0, 256, (4, 16), generator=gen),
        "val": torch.randint(0, 256, (3, 8), generator=gen),
    }
    loaders = {
        k: DataLoader(TensorDataset(x, x.roll(-1, 1)), batch_size=2 if k == "train" else 3) for k, x in tokens.items()
    }
    module = CausalLMModule(overrides={"block_size": 16, "n_layer": 2})
    seen = _FlopsSeen()
    trainer = _trainer(tmp_path, max_steps=2, val_check_interval=2, limit_val_batches=1, callbacks=[seen])
    trainer.fit(module, train_dataloaders=loaders["train"], val_dataloaders=loaders["val"])
    assert seen.train == [_counted(module, next(iter(loaders["train"])), backward=True)] * 2
    assert seen.val == [_counted(module, next(iter(loaders["val"])), backward=False)]
    assert seen.val[0] < seen.train[0] // 3  # fewer tokens, and forward only
