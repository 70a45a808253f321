import math

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.compression import QSGD, RandomK, Sign, TopK
from lightning_gd.strategies import CompressedDDPStrategy
from tests.helpers.models import TinyClassifier, classification_loader


@pytest.fixture
def single_process_group():
    """DDP with one process runs in this process; tear its process group down afterwards."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _fit(strategy, steps=4, **module_kw):
    seed_everything(0)
    model = TinyClassifier(dropout=0.0, **module_kw)
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, classification_loader())
    return trainer, model


def test_registered_names_build_the_strategy():
    for name in ("topk", "randomk", "sign", "qsgd", "powersgd"):
        assert f"ddp_{name}" in StrategyRegistry
        trainer = Trainer(accelerator="cpu", devices=2, strategy=f"ddp_{name}", logger=False)
        assert isinstance(trainer.strategy, CompressedDDPStrategy) and trainer.strategy.compressor == name


@pytest.mark.parametrize(
    ("compressor", "payload"),
    [
        ("topk", lambda n: TopK(0.01).payload_bytes(n)),
        ("randomk", lambda n: RandomK(0.01).payload_bytes(n)),
        ("sign", lambda n: math.ceil(n / 8) + 4),  # packed bits + one fp32 scale
        ("qsgd", lambda n: QSGD(16).payload_bytes(n)),
    ],
)
def test_logged_bytes_equal_the_analytic_payload(compressor, payload, single_process_group):
    trainer, model = _fit(CompressedDDPStrategy(compressor))
    n = sum(p.numel() for p in model.parameters())  # one bucket: the model is tiny
    m = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("compression/")}
    assert m["compression/dense_bytes"] == 4 * n
    assert m["compression/bytes_sent"] == payload(n)
    assert m["compression/ratio"] == pytest.approx(4 * n / payload(n))
    # Memory by default for the biased compressors; none for QSGD, which is unbiased and no contraction.
    assert (m["compression/error_norm"] > 0) == (compressor != "qsgd")
    if compressor == "topk":
        assert payload(n) == round(0.01 * n) * 8  # k fp32 values + k int32 indices
        assert m["compression/density"] == pytest.approx(round(0.01 * n) / n)
    assert Sign().payload_bytes(n) == math.ceil(n / 8) + 4


def test_warmup_steps_are_dense(single_process_group):
    trainer, model = _fit(CompressedDDPStrategy("topk", warmup_steps=10), steps=3)
    assert trainer.callback_metrics["compression/ratio"].item() == 1.0


def test_momentum_correction_refuses_an_optimizer_with_momentum(single_process_group):
    with pytest.raises(MisconfigurationException, match="SGD\\(momentum=0\\)"):
        _fit(CompressedDDPStrategy("topk", momentum_correction=0.9), momentum=0.9)


def test_powersgd_runs_and_accounts(single_process_group):
    trainer, _ = _fit(CompressedDDPStrategy("powersgd", warmup_steps=2), steps=5)
    m = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("compression/")}
    assert m["compression/bytes_sent"] < m["compression/dense_bytes"] / 1.5
    assert m["compression/ratio"] == pytest.approx(m["compression/dense_bytes"] / m["compression/bytes_sent"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compressor": "top_k"}, "`compressor` must be one of .*, got 'top_k'"),
        ({"density": 0.0}, "`density` must be in \\(0, 1\\], got 0.0"),
        ({"density": 1.5}, "`density` must be in \\(0, 1\\], got 1.5"),
        ({"compressor": "qsgd", "levels": 0}, "`levels` must be an integer >= 1, got 0"),
        ({"warmup_steps": -1}, "`warmup_steps` must be >= 0, got -1"),
        ({"momentum_correction": 1.0}, "`momentum_correction` must be in \\[0, 1\\), got 1.0"),
        ({"compressor": "sign", "momentum_correction": 0.9}, "needs a sparse compressor"),
        ({"ddp_comm_hook": lambda s, b: None}, "drop `ddp_comm_hook`"),
        ({"density_warmup_steps": -2}, "`density_warmup_steps` must be >= 0, got -2"),
        ({"compressor": "sign", "density_warmup_steps": 5}, "applies to topk and randomk, not 'sign'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        CompressedDDPStrategy(**kwargs)


def test_yaml_strategy_name_parses(capsys):
    from lightning_gd.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", "quickstart", "--trainer.strategy", "ddp_topk", "--print_config"])
    assert "strategy: ddp_topk" in capsys.readouterr().out


class _DensityLog(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(trainer.callback_metrics["compression/density"].item())


def test_dgc_density_warmup_decays_exponentially(single_process_group):
    strategy = CompressedDDPStrategy("topk", density=0.01, warmup_steps=1, density_warmup_steps=4)
    expected = [0.25 * (0.04 ** (t / 4)) for t in range(4)]  # after one dense step
    assert [strategy.density_at(s) for s in range(1, 5)] == pytest.approx(expected)
    assert strategy.density_at(5) == strategy.density_at(50) == 0.01
    log = _DensityLog()
    seed_everything(0)
    model = TinyClassifier(in_dim=32, hidden=64, dropout=0.0)
    Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[log],
    ).fit(model, classification_loader(in_dim=32))  # fmt: skip
    n = sum(p.numel() for p in model.parameters())
    assert log.values == pytest.approx([1.0] + [round(d * n) / n for d in expected] + [round(0.01 * n) / n])


def test_accumulation_compresses_only_on_synchronizing_steps(single_process_group):
    seed_everything(0)
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=CompressedDDPStrategy("sign"), max_steps=3, accumulate_grad_batches=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(TinyClassifier(dropout=0.0), classification_loader(n=128))
    assert trainer.strategy.hook_state.step == 3  # 6 backward passes, 3 of them synchronizing


def test_bf16_autocast_and_unused_parameters(single_process_group):
    class WithUnused(TinyClassifier):
        def __init__(self) -> None:
            super().__init__(dropout=0.0)
            self.unused = torch.nn.Linear(4, 4)

    seed_everything(0)
    model = WithUnused()
    before = model.unused.weight.detach().clone()
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=CompressedDDPStrategy("topk", density=0.1, find_unused_parameters=True),
        precision="bf16-mixed", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, classification_loader())
    assert torch.equal(model.unused.weight, before)
    assert math.isfinite(trainer.callback_metrics["compression/error_norm"].item())
    assert trainer.callback_metrics["compression/ratio"].item() > 1
