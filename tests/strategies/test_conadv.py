"""ConAdvStrategy in one process (DDP with world size 1): staleness, batch formats, BatchNorm, bad input."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_gd.strategies import ConAdvStrategy
from tests.helpers.trainer import quiet_trainer


@pytest.fixture(autouse=True)
def single_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class LinearRecorder(LightningModule):
    """A linear classifier that records every forward call made without an input gradient: the clean pass
    (inside ``training_step``) and then the adversarial pass of the strategy."""

    def __init__(self, in_dim=6, classes=3, lr=0.5, batchnorm=False):
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(in_dim) if batchnorm else nn.Identity()
        self.fc = nn.Linear(in_dim, classes)
        self.lr = lr
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x):
        if not x.requires_grad:
            self.calls.append((self.trainer.global_step, x.detach().clone()))
        return self.fc(self.bn(x))

    def training_step(self, batch, batch_idx):
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch[:2]
        self.batches[self.trainer.global_step] = (x.clone(), y.clone())
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class WeightRecorder(Callback):
    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _data(n=64, in_dim=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=gen)
    return x, (x @ torch.randn(in_dim, classes, generator=gen)).argmax(1)


def _trainer(strategy, steps, **kw):
    return quiet_trainer(devices=1, strategy=strategy, max_steps=steps, **kw)


def _fgsm(weights, x, y, eps):
    w, b = weights["fc.weight"], weights["fc.bias"]
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(xg @ w.T + b, y), xg)
    return x + eps * g.sign()


@pytest.mark.parametrize("tau", [1, 2])
def test_adversarial_batch_at_step_t_comes_from_the_weights_of_step_t_minus_tau(tau):
    seed_everything(0)
    eps, x, y = 0.3, *_data()
    model, rec = LinearRecorder(), WeightRecorder()
    strategy = ConAdvStrategy(epsilon=eps, tau=tau, targeted=False, random_start=0.0, pixel_range=None)
    _trainer(strategy, 7, callbacks=[rec]).fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    by_step: dict[int, list[torch.Tensor]] = {}
    for step, inp in model.calls:
        by_step.setdefault(step, []).append(inp)
    distinguishing = 0
    for t in range(7):
        clean, adv = by_step[t]
        bx, by = model.batches[t]  # the DistributedSampler shuffles
        torch.testing.assert_close(clean, bx)
        source = t - tau if t >= tau else t  # the first tau batches of an epoch: attacked at the current weights
        torch.testing.assert_close(adv, _fgsm(rec.weights[source], bx, by, eps), rtol=0, atol=1e-6)
        if t >= tau and not torch.allclose(adv, _fgsm(rec.weights[t], bx, by, eps)):
            distinguishing += 1  # the fresh-weight attack differs: the check above can fail
    assert distinguishing >= 3


def test_logged_metrics_and_registered_name(tmp_path):
    assert "conadv" in StrategyRegistry
    assert isinstance(Trainer(accelerator="cpu", devices=1, strategy="conadv", logger=False).strategy, ConAdvStrategy)
    seed_everything(0)
    strategy = ConAdvStrategy(epsilon=0.1, pixel_range=None)
    trainer = _trainer(strategy, 4, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(LinearRecorder(), DataLoader(TensorDataset(*_data()), batch_size=8))
    m = strategy.last_metrics
    assert set(m) == {f"conadv/{k}" for k in ("clean_loss", "adv_loss", "adv_accuracy", "staleness", "attack_ms")}
    assert m["conadv/staleness"] == 1.0 and m["conadv/attack_ms"] > 0 and m["conadv/adv_loss"] > 0
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "conadv/adv_loss" in header and "conadv/staleness" in header


class DictData(Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def test_dict_batches_with_configured_keys_and_aux_batchnorm():
    seed_everything(0)
    model = LinearRecorder(batchnorm=True)
    strategy = ConAdvStrategy(epsilon=0.1, pixel_range=None, input_key="image", target_key="label")
    _trainer(strategy, 3).fit(model, DataLoader(DictData(), batch_size=8))
    bn = model.bn
    # The clean passes moved the main statistics, the adversarial passes the auxiliary ones; the attacks (on
    # copies of the statistics) moved neither: each count is the number of steps.
    assert bn.num_batches_tracked.item() == 3 and bn.aux_num_batches_tracked.item() == 3
    assert not torch.equal(bn.running_mean, bn.aux_running_mean)


def test_both_passes_run_inside_the_ddp_wrapper_through_lightnings_own_step():
    # Lightning's Strategy.training_step redirects the module's training_step through the DDP wrapper's forward;
    # the strategy hooks its adversarial pass into that call, so both passes run inside DDP's forward.
    inside: list[bool] = []

    class Inside(LinearRecorder):
        def forward(self, x):
            if not x.requires_grad:  # the clean and the adversarial pass (the attack's input needs a gradient)
                self.flags.append(bool(inside))
            return super().forward(x)

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            wrapper = trainer.strategy.model
            assert wrapper is not pl_module  # the DDP wrapper
            wrapper.register_forward_pre_hook(lambda m, a: inside.append(True))
            wrapper.register_forward_hook(lambda m, a, o: inside.clear())  # returns None: the output is kept

    module = Inside()
    module.flags = []
    x, y = _data()
    _trainer(ConAdvStrategy(epsilon=0.1, pixel_range=None), 3, callbacks=[Probe()]).fit(
        module, DataLoader(TensorDataset(x, y), batch_size=16)
    )
    assert len(module.flags) == 6 and all(module.flags)  # 3 steps x (clean, adversarial), all inside the wrapper
    assert "training_step" not in vars(module)  # the module's own method again after each step


def test_unknown_batch_format_names_the_expected_one():
    strategy = ConAdvStrategy(pixel_range=None)
    with pytest.raises(MisconfigurationException, match=r"`\(inputs, targets, \.\.\.\)` tuple/list .* `input_key`='x'"):
        _trainer(ConAdvStrategy(pixel_range=None, input_key="x"), 2).fit(
            LinearRecorder(), DataLoader(DictData(), batch_size=8)
        )
    with pytest.raises(MisconfigurationException, match="got Tensor"):
        strategy._split(torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epsilon=-1.0), "`epsilon` must be a finite number >= 0"),
        (dict(step_size=-0.1), "`step_size` must be a finite number >= 0"),
        (dict(tau=0), "`tau` must be a positive integer"),
        (dict(tau=1.5), "`tau` must be a positive integer"),
        (dict(random_start=1.2), "`random_start` must be in"),
        (dict(label_smoothing=1.0), "`label_smoothing` must be in"),
        (dict(std=(0.0,)), "`std` must be > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        ConAdvStrategy(**kwargs)


def test_sync_batchnorm_is_refused():
    trainer = Trainer(accelerator="cpu", devices=1, strategy=ConAdvStrategy(pixel_range=None), sync_batchnorm=True,
                      max_steps=1, logger=False, enable_progress_bar=False)  # fmt: skip
    with pytest.raises(MisconfigurationException, match="sync_batchnorm"):
        trainer.fit(LinearRecorder(batchnorm=True), DataLoader(TensorDataset(*_data()), batch_size=8))
