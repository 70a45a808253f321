"""NoiseAnnealing in real Trainer runs: the variance schedule, weight noise, perturbed GD on a strict saddle,
bit-identity at eta=0, resume from a real checkpoint, bad input, and 2-process gloo DDP (shared noise, and
per-rank noise under Lightning's post-local-SGD model averaging)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gd.callbacks import NoiseAnnealing
from tests.helpers.ddp import run_ddp_script
from tests.helpers.models import TinyClassifier, classification_loader
from tests.helpers.trainer import quiet_trainer


class FlatParameter(LightningModule):
    """One big parameter vector with a zero-gradient loss: after the callback, ``.grad`` is the noise alone."""

    def __init__(self, numel: int = 20_000, lr: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(numel))
        self.lr = lr

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return 0.0 * self.w.sum() + 0.0 * batch[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class GradRecorder(Callback):
    """Copies every parameter's gradient right after NoiseAnnealing added its noise (same hook, later callback)."""

    def __init__(self) -> None:
        self.grads: list[Tensor] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        self.grads.append(torch.cat([p.grad.flatten().clone() for p in pl_module.parameters()]))


def _dummy_loader(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def test_gradient_noise_variance_follows_eta_over_one_plus_t_to_the_gamma(tmp_path) -> None:
    eta, gamma = 0.3, 0.55
    rec = GradRecorder()
    noise = NoiseAnnealing(eta=eta, gamma=gamma, seed=1)
    quiet_trainer(tmp_path, callbacks=[noise, rec], max_steps=6).fit(FlatParameter(), _dummy_loader())
    n = rec.grads[0].numel()
    for t, g in enumerate(rec.grads):
        var = eta / (1 + t) ** gamma  # the paper's sigma_t^2 is the variance
        # Sample variance of n Gaussians: relative standard error sqrt(2 / n) = 1%; allow 5 of them.
        assert abs(g.var().item() / var - 1) < 5 * math.sqrt(2 / n), t
        assert abs(g.mean().item()) < 5 * math.sqrt(var / n)
    assert noise.last_std == pytest.approx(math.sqrt(eta / 6**gamma))
    assert not torch.equal(rec.grads[0], rec.grads[1])  # fresh noise every step


def test_weight_noise_with_step_annealing(tmp_path) -> None:
    """Weights get N(0, eta gamma^(2j)) per step, j = step // decay_steps (Zhou et al.'s per-period decay)."""
    eta, gamma = 0.04, 0.5
    model = FlatParameter()
    snapshots: list[Tensor] = []

    class Snap(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            snapshots.append(pl_module.w.detach().clone())

    noise = NoiseAnnealing(eta=eta, gamma=gamma, target="weights", decay_steps=2)
    assert noise.schedule == "step"
    quiet_trainer(tmp_path, callbacks=[noise, Snap()], max_steps=6).fit(model, _dummy_loader())
    prev = torch.zeros_like(snapshots[0])
    n = prev.numel()
    for t, w in enumerate(snapshots):
        var = eta * gamma ** (2 * (t // 2))
        assert abs((w - prev).var().item() / var - 1) < 5 * math.sqrt(2 / n), t
        prev = w


def test_eta_zero_is_bit_identical_to_no_callback(tmp_path) -> None:
    def run(callbacks: list) -> list[Tensor]:
        seed_everything(0)
        model = TinyClassifier(dropout=0.3, momentum=0.9)
        quiet_trainer(tmp_path, callbacks=callbacks, max_steps=8).fit(model, classification_loader(shuffle=True))
        return [p.detach().clone() for p in model.parameters()]

    plain = run([])
    for w_plain, w_cb in zip(plain, run([NoiseAnnealing(eta=0.0)]), strict=True):
        assert torch.equal(w_plain, w_cb)
    noisy = run([NoiseAnnealing(eta=0.01)])
    assert not all(torch.equal(a, b) for a, b in zip(plain, noisy, strict=True))  # the comparison can fail


class Saddle(LightningModule):
    """f(x, y) = x^2 - y^2 started exactly at the strict saddle (0, 0), where the gradient vanishes."""

    def __init__(self) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x, y = self.xy
        return x**2 - y**2 + 0.0 * batch[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_perturbed_gd_escapes_a_strict_saddle_that_gd_never_leaves(tmp_path) -> None:
    gd = Saddle()
    quiet_trainer(tmp_path, callbacks=[], max_steps=40).fit(gd, _dummy_loader(40))
    assert torch.equal(gd.xy.detach(), torch.zeros(2, dtype=torch.float64))

    pgd = Saddle()
    noise = NoiseAnnealing(eta=0.0, grad_norm_threshold=1e-4, radius=1e-3, perturb_interval=5)
    quiet_trainer(tmp_path, callbacks=[noise], max_steps=40).fit(pgd, _dummy_loader(40))
    x, y = pgd.xy.detach().tolist()
    # Escaped along -y^2 (|y| grows 1.2x per step, from at most the radius), while x contracted back to 0.
    assert abs(y) > 10 * 1e-3 and abs(x) < 1e-5
    assert noise.perturbations == 1 and noise.last_perturbation == 0  # the gradient grew, so no second one


def test_perturbation_interval_and_ball_radius(tmp_path) -> None:
    model = FlatParameter(numel=50)  # zero gradient: a perturbation is due every perturb_interval steps
    rec: list[Tensor] = []

    class Snap(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            rec.append(pl_module.w.detach().clone())

    noise = NoiseAnnealing(eta=0.0, grad_norm_threshold=0.0, radius=0.5, perturb_interval=3)
    quiet_trainer(tmp_path, callbacks=[noise, Snap()], max_steps=7).fit(model, _dummy_loader())
    steps = [t for t in range(7) if not torch.equal(rec[t], rec[t - 1] if t else torch.zeros(50))]
    assert steps == [0, 3, 6] and noise.perturbations == 3
    for t in steps:
        jump = (rec[t] - (rec[t - 1] if t else torch.zeros(50))).norm().item()
        assert 0 < jump <= 0.5


def test_non_finite_gradient_norm_skips_the_perturbation_with_one_warning(tmp_path) -> None:
    class NaNGrad(FlatParameter):
        def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
            return float("nan") * self.w.sum()

    noise = NoiseAnnealing(eta=0.0, grad_norm_threshold=1.0, perturb_interval=1)
    with pytest.warns(UserWarning, match="non-finite gradient norm") as record:
        quiet_trainer(tmp_path, callbacks=[noise], max_steps=3).fit(NaNGrad(numel=4), _dummy_loader())
    assert sum("non-finite gradient norm" in str(w.message) for w in record) == 1
    assert noise.perturbations == 0


def test_clip_norm_clips_before_the_noise(tmp_path) -> None:
    class Big(FlatParameter):
        def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
            return 100.0 * self.w.sum()

    rec = GradRecorder()
    quiet_trainer(tmp_path, callbacks=[NoiseAnnealing(eta=0.0, clip_norm=2.0), rec], max_steps=2).fit(
        Big(numel=10), _dummy_loader()
    )
    assert rec.grads[0].norm().item() == pytest.approx(2.0)
    with pytest.warns(UserWarning, match="Lightning clips after this callback adds the noise"):
        quiet_trainer(tmp_path, callbacks=[NoiseAnnealing(clip_norm=2.0)], max_steps=1, gradient_clip_val=1.0).fit(
            Big(numel=10), _dummy_loader()
        )


def _noisy_run(tmp_path, max_steps: int, ckpt_path=None, callbacks: tuple = ()) -> list[Tensor]:
    seed_everything(0)
    model = TinyClassifier(dropout=0.0, batchnorm=False, momentum=0.9)
    noise = NoiseAnnealing(eta=0.05, target="weights", decay_steps=3, grad_norm_threshold=10.0, radius=0.1)
    quiet_trainer(
        tmp_path, callbacks=[noise, *callbacks], max_steps=max_steps, enable_checkpointing=bool(callbacks)
    ).fit(model, classification_loader(n=32), ckpt_path=ckpt_path)
    return [p.detach().clone() for p in model.parameters()]


def test_resumed_run_draws_the_same_noise(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    full = _noisy_run(tmp_path, 8, callbacks=(ckpt,))  # two batches per epoch: step 4 ends an epoch
    resumed = _noisy_run(tmp_path, 8, ckpt_path=tmp_path / "ckpt/epoch=1-step=4.ckpt")
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a, b)
    other_seed = NoiseAnnealing(eta=0.05, seed=1)
    assert other_seed.state_key != NoiseAnnealing(eta=0.05).state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": -0.1}, "`eta` must be a finite number >= 0, got -0.1"),
        ({"gamma": -1}, "`gamma` must be a finite number >= 0, got -1"),
        ({"target": "activations"}, r"`target` must be one of \('gradient', 'weights'\), got 'activations'"),
        ({"schedule": "cosine"}, r"`schedule` must be one of \('polynomial', 'step'\), got 'cosine'"),
        ({"schedule": "step", "gamma": 1.5}, "`gamma` must be at most 1 with schedule='step', got 1.5"),
        ({"radius": 0.0}, "`radius` must be a finite number > 0, got 0.0"),
        ({"perturb_interval": 0}, "`perturb_interval` must be a positive integer, got 0"),
        ({"grad_norm_threshold": float("inf")}, "`grad_norm_threshold` must be a finite number >= 0"),
        ({"per_rank": "yes"}, "`per_rank` must be a bool, got 'yes'"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        NoiseAnnealing(**kwargs)


def test_per_rank_without_model_averaging_is_refused(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match=r"per_rank=True\) needs a strategy that averages models"):
        quiet_trainer(tmp_path, callbacks=[NoiseAnnealing(per_rank=True)], max_steps=1).fit(
            FlatParameter(), _dummy_loader()
        )


_DDP_SCRIPT = """
import sys
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from lightning_gd.callbacks import NoiseAnnealing
from tests.helpers.ddp import write_result
from tests.helpers.models import TinyClassifier, classification_loader


class Snap(Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]).tolist())


def run(strategy, noise):
    seed_everything(0)
    snap = Snap()
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[noise, snap], default_root_dir=".")
    trainer.fit(TinyClassifier(dropout=0.0, batchnorm=False), classification_loader(n=128))
    return snap.weights, trainer.global_rank, float(trainer.callback_metrics["noise/std"])


shared, rank, std = run("ddp", NoiseAnnealing(eta=0.01, seed=3))
# Local SGD from step 2, averaging every 2 steps. On CPU Lightning registers no comm hook (CUDA only), so DDP still
# all-reduces gradients; the post-local-SGD model averager runs, and per-rank weight noise splits the replicas.
local = DDPStrategy(ddp_comm_state=PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=2),
                    ddp_comm_hook=post_localSGD_hook, model_averaging_period=2)
per_rank, _, _ = run(local, NoiseAnnealing(eta=1e-4, target="weights", decay_steps=100, per_rank=True))
write_result({"shared": shared, "per_rank": per_rank, "std": std}, rank)
"""


def test_noise_is_shared_across_ddp_ranks_and_per_rank_under_local_sgd(tmp_path) -> None:
    r0, r1 = run_ddp_script(_DDP_SCRIPT, tmp_path, launcher="external")
    assert r0["shared"] == r1["shared"]  # identical noise on the all-reduced gradients: replicas equal every step
    assert r0["std"] == pytest.approx(math.sqrt(0.01 / 6**0.55))  # sigma_5 = sqrt(eta / (1 + 5)^gamma)
    same = [a == b for a, b in zip(r0["per_rank"], r1["per_rank"], strict=True)]
    # Steps 0, 1: local-SGD warm-up (shared noise). Then the averager averages after steps 2 and 4 (its own
    # counter: (step - 2) % 2 == 0), and replicas differ after steps 3 and 5 by their own noise.
    assert same == [True, True, True, False, True, False]
