"""GradientFlossing in real Trainer runs: pre-training and periodic flossing, the added loss term, discovery of
the dynamics, checkpoints and resume, the plot, bad input, and 2-process gloo DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gd.callbacks import GradientFlossing
from lightning_gd.dynamics import RecurrentDynamics, recurrent_dynamics
from tests.helpers.ddp import run_ddp_script
from tests.helpers.trainer import quiet_trainer


class RNNTask(LightningModule):
    """A tanh RNN with a readout; ``gain`` < 1 makes it strongly contracting (every exponent well below 0)."""

    def __init__(self, hidden: int = 12, gain: float = 0.5, lr: float = 0.05, loss_scale: float = 1.0) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(gain)
        self.lr = lr
        self.loss_scale = loss_scale

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out, _ = self.rnn(x)  # (B, T, H)
        return self.loss_scale * F.mse_loss(self.readout(out[:, -1]).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(n: int = 32, T: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, T, 2, generator=gen)
    return DataLoader(TensorDataset(x, x[:, :, 0].sum(1)), batch_size=8)


def _small(**kwargs) -> GradientFlossing:
    args = {"k": 4, "pre_train_steps": 0, "sequence_length": 25, "warmup": 5, "batch_size": 3, "lr": 0.02}
    return GradientFlossing(**{**args, **kwargs})


def test_pre_training_flossing_moves_exponents_to_zero_and_leaves_the_readout(tmp_path) -> None:
    seed_everything(0)
    model = RNNTask(lr=0.0)  # lr 0: only flossing moves weights
    readout = model.readout.weight.detach().clone()
    w_hh = model.rnn.weight_hh_l0.detach().clone()
    floss = _small(pre_train_steps=25, lr=0.05, plot=True)
    quiet_trainer(tmp_path, callbacks=[floss], max_steps=1).fit(model, _loader())
    phases = [p for _, p, _ in floss.history]
    assert phases == ["initial", "pre_train", "end"]
    before, after = floss.history[0][2], floss.history[1][2]
    assert before[0] < -0.3  # vanishing gradients at gain 0.5
    assert sum(v**2 for v in after) < 0.5 * sum(v**2 for v in before)
    assert torch.equal(model.readout.weight, readout)  # flossing updates the dynamics, not the readout
    assert not torch.equal(model.rnn.weight_hh_l0, w_hh)
    for name in ("lyapunov/max", "lyapunov/mean", "lyapunov/loss"):
        assert math.isfinite(floss.last_metrics[name])
    assert floss.last_metrics["lyapunov/max"] == pytest.approx(max(floss.history[-1][2]))
    assert (tmp_path / "lyapunov_spectrum.png").stat().st_size > 10_000


def test_periodic_rounds_log_and_plot_to_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_everything(0)
    model = RNNTask()
    floss = _small(every_n_steps=2, floss_steps=2, max_rounds=2)
    logger = TensorBoardLogger(tmp_path, name="tb")
    quiet_trainer(tmp_path, callbacks=[floss], max_steps=7, logger=logger).fit(model, _loader())
    assert floss.rounds == 2
    assert [(s, p) for s, p, _ in floss.history] == [(2, "round"), (4, "round"), (7, "end")]
    assert floss._draws == 2 * (2 + 1) + 1  # two rounds of two flossing steps and a measurement, and the end
    events = EventAccumulator(logger.log_dir).Reload()
    assert [e.step for e in events.Scalars("lyapunov/max")] == [2, 4, 7]
    assert events.Scalars("lyapunov/loss")[-1].value == pytest.approx(floss.last_metrics["lyapunov/loss"])
    assert "lyapunov/spectrum" in events.Tags()["images"]
    assert (Path(logger.log_dir) / "lyapunov_spectrum.png").is_file()


def test_continuous_flossing_adds_its_gradient_to_the_training_step(tmp_path) -> None:
    seed_everything(0)
    model = RNNTask(lr=0.1, loss_scale=0.0)  # task gradients are zero: only the flossing term moves weights
    readout = model.readout.weight.detach().clone()
    w_hh = model.rnn.weight_hh_l0.detach().clone()
    floss = _small(continuous=True, weight=2.0, plot=False)
    quiet_trainer(tmp_path, callbacks=[floss], max_steps=3).fit(model, _loader())
    assert torch.equal(model.readout.weight, readout)
    assert not torch.equal(model.rnn.weight_hh_l0, w_hh)
    assert [p for _, p, _ in floss.history] == ["measure", "measure", "measure", "end"]


class MethodTask(RNNTask):
    """Brings its own dynamics (a GRU cell driven by +-1 bits) through ``flossing_dynamics``."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(2, 5)
        self.calls = 0

    def flossing_dynamics(self) -> RecurrentDynamics:
        self.calls += 1
        dyn = recurrent_dynamics(self.cell)

        def bits(T: int, B: int, gen: torch.Generator) -> Tensor:
            return 2.0 * torch.randint(0, 2, (T, B, 2), generator=gen) - 1.0

        return RecurrentDynamics(dyn.step, dyn.state_size, dyn.input_size, sample_inputs=bits)


def test_discovery_protocol(tmp_path) -> None:
    model = MethodTask()  # has both an nn.RNN and a GRUCell: the method wins over the search
    cell = model.cell.weight_hh.detach().clone()
    rnn = model.rnn.weight_hh_l0.detach().clone()
    floss = _small(pre_train_steps=2, plot=False)
    quiet_trainer(tmp_path, callbacks=[floss], max_steps=1).fit(model, _loader())
    assert model.calls == 1
    assert not torch.equal(model.cell.weight_hh, cell)
    # With lr > 0 the RNN moved through training only; check the name route on a fresh model with lr 0.
    model = MethodTask()
    model.lr = 0.0
    rnn = model.rnn.weight_hh_l0.detach().clone()
    floss = _small(pre_train_steps=2, dynamics="rnn", plot=False)
    quiet_trainer(tmp_path, callbacks=[floss], max_steps=1).fit(model, _loader())
    assert model.calls == 0 and not torch.equal(model.rnn.weight_hh_l0, rnn)
    with pytest.raises(MisconfigurationException, match=r"found several \(rnn, cell\)"):
        quiet_trainer(tmp_path, callbacks=[_small(pre_train_steps=1)], max_steps=1).fit(_TwoRNNs(), _loader())
    with pytest.raises(MisconfigurationException, match="has no attribute 'lstm'"):
        quiet_trainer(tmp_path, callbacks=[_small(dynamics="lstm")], max_steps=1).fit(RNNTask(), _loader())
    with pytest.raises(MisconfigurationException, match="neither an nn.RNN"):
        quiet_trainer(tmp_path, callbacks=[_small(dynamics="readout")], max_steps=1).fit(RNNTask(), _loader())


class _TwoRNNs(RNNTask):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(2, 4)


class _NoRNN(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.lin(batch[0][:, -1]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_setup_errors(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match=r"found no nn.RNN/GRU/LSTM \(or cell\) in _NoRNN"):
        quiet_trainer(tmp_path, callbacks=[_small()], max_steps=1).fit(_NoRNN(), _loader())
    with pytest.raises(MisconfigurationException, match="`k` must be at most the state size N = 12 .*got 13"):
        quiet_trainer(tmp_path, callbacks=[_small(k=13)], max_steps=1).fit(RNNTask(), _loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "`k` must be a positive integer, got 0"),
        ({"k": 2, "weight": 0.0}, "`weight` must be a finite number > 0, got 0.0"),
        ({"k": 2, "target": float("nan")}, "`target` must be a finite number, got nan"),
        ({"k": 2, "pre_train_steps": -1}, "`pre_train_steps` must be an integer >= 0, got -1"),
        ({"k": 2, "every_n_steps": 0}, "`every_n_steps` must be a positive integer, got 0"),
        ({"k": 2, "warmup": 100, "sequence_length": 100}, "`warmup` must be smaller than `sequence_length` = 100"),
        ({"k": 2, "lr": -1.0}, "`lr` must be a finite number > 0, got -1.0"),
        ({"k": 2, "dynamics": 3}, "`dynamics` must be an attribute name or None, got 3"),
        ({"k": 2, "max_rounds": 0}, "`max_rounds` must be a positive integer, got 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        GradientFlossing(**kwargs)


def test_non_finite_exponents_skip_with_one_warning(tmp_path) -> None:
    model = RNNTask(lr=0.0)
    with torch.no_grad():
        model.rnn.weight_hh_l0[0, 0] = float("nan")
    floss = _small(pre_train_steps=3, plot=False)
    with pytest.warns(UserWarning, match="non-finite Lyapunov exponents") as record:
        quiet_trainer(tmp_path, callbacks=[floss], max_steps=1).fit(model, _loader())
    assert sum("non-finite Lyapunov" in str(w.message) for w in record) == 1
    assert floss.history == [] and floss.pretrained


def test_checkpoint_resume_keeps_schedule_and_optimizer(tmp_path) -> None:
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    floss = _small(pre_train_steps=3, every_n_steps=2, floss_steps=1, plot=False)
    # Two batches per epoch: the step-2 checkpoint is at an epoch boundary, where a resume replays the same data.
    quiet_trainer(tmp_path, callbacks=[floss, ckpt], max_steps=4, enable_checkpointing=True).fit(
        RNNTask(), _loader(n=16)
    )
    full_history = floss.history

    seed_everything(0)
    resumed = _small(pre_train_steps=3, every_n_steps=2, floss_steps=1, plot=False)
    quiet_trainer(tmp_path, callbacks=[resumed], max_steps=4).fit(
        RNNTask(), _loader(n=16), ckpt_path=tmp_path / "ckpt/epoch=0-step=2.ckpt"
    )
    assert resumed.pretrained and resumed.rounds == 2  # no second pre-training; one more round after the resume
    assert resumed._optimizer is not None and resumed._optimizer.state_dict()["state"][0]["step"] == 3 + 2
    # Same draws, same weights: the resumed run measures exactly what the uninterrupted one did.
    assert [(s, p) for s, p, _ in resumed.history] == [(s, p) for s, p, _ in full_history]
    assert resumed.history[-1][2] == full_history[-1][2]


_DDP_SCRIPT = """
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning_gd.callbacks import GradientFlossing
from tests.callbacks.test_gradient_flossing import RNNTask, _loader
from tests.helpers.ddp import write_result

seed_everything(0)
model = RNNTask()
floss = GradientFlossing(k=4, pre_train_steps=3, every_n_steps=2, floss_steps=2, sequence_length=20, warmup=4,
                         batch_size=2, lr=0.02)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[floss], default_root_dir=".")
trainer.fit(model, _loader())
own = floss._spectrum(trainer, model).mean(0).tolist()  # this rank's own trajectories
write_result({"weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
              "metrics": floss.last_metrics, "own": own, "rounds": floss.rounds}, trainer.global_rank)
"""


def test_flossing_under_two_process_ddp_keeps_replicas_in_sync(tmp_path) -> None:
    r0, r1 = run_ddp_script(_DDP_SCRIPT, tmp_path, launcher="external")
    assert r0["own"] != r1["own"]  # each rank floss its own random trajectories...
    assert r0["weights"] == r1["weights"]  # ...and the averaged flossing gradients keep replicas identical
    assert r0["metrics"] == r1["metrics"] and r0["rounds"] == 2
    assert (tmp_path / "lyapunov_spectrum.png").is_file()
