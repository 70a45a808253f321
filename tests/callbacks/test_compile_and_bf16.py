"""Every callback on a ``torch.compile``d model and under ``bf16-mixed``, single process on CPU, against the eager
float32 run of the same seed (the README's backend matrix names these tests).

The compiled models use ``backend="aot_eager"``: TorchDynamo's graph capture and AOTAutograd (the compiled
autograd functions a Hessian-vector product must differentiate through) without Inductor's kernel generation,
which takes ~45 s per model on this CPU; Inductor only changes the kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_gd.callbacks import (
    GradientFlossing,
    HessianTraceMonitor,
    MetricPlotter,
    NoiseAnnealing,
    SharpnessTracker,
    TextSampler,
)
from tests.callbacks.test_gradient_flossing import RNNTask, _loader
from tests.helpers.models import TinyClassifier, classification_loader
from tests.helpers.trainer import quiet_trainer


class CompiledClassifier(TinyClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = torch.compile(self.net, backend="aot_eager")


class CompiledRNN(RNNTask):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rnn = torch.compile(self.rnn, backend="aot_eager")


def _fit(tmp_path, model, loader, callbacks, max_steps=4, **kwargs):
    trainer = quiet_trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, **kwargs)
    trainer.fit(model, loader)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _classifier(compiled):
    seed_everything(0)
    return (CompiledClassifier if compiled else TinyClassifier)(dropout=0.0, batchnorm=False)


def test_curvature_callbacks_through_a_compiled_model(tmp_path):
    def run(compiled):
        trace = HessianTraceMonitor(max_overhead=None, every_n_steps=2, num_probes=8, batch="fixed")
        sharp = SharpnessTracker(max_overhead=None, every_n_steps=2, smallest=True, batch="fixed", tol=1e-6)
        weights = _fit(tmp_path, _classifier(compiled), classification_loader(), [trace, sharp])
        return weights, {**trace.last_metrics, **sharp.last_metrics}

    eager_w, eager = run(False)
    torch._dynamo.utils.counters.clear()
    compiled_w, compiled = run(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # Dynamo did capture the model
    assert torch.allclose(compiled_w, eager_w, atol=1e-6)
    assert compiled.keys() == eager.keys() and "sharpness/lambda_min" in compiled
    for key, value in eager.items():  # the products go through the compiled graph and give the eager numbers
        assert compiled[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("mode", ["compile", "bf16-mixed"])
def test_noise_annealing_and_metric_plotter(tmp_path, mode):
    compiled = mode == "compile"
    kwargs = {"precision": "bf16-mixed"} if mode == "bf16-mixed" else {}
    plain = _fit(tmp_path / "plain", _classifier(compiled), classification_loader(), [], **kwargs)
    plotter = MetricPlotter(every_n_steps=1)
    noise = NoiseAnnealing(eta=0.1, clip_norm=0.5, grad_norm_threshold=10.0, radius=0.5, perturb_interval=2)
    noisy = _fit(tmp_path / "noisy", _classifier(compiled), classification_loader(), [noise, plotter], **kwargs)
    assert torch.isfinite(noisy).all() and not torch.equal(noisy, plain) and noise.perturbations == 2
    assert len(plotter.history["train/loss"]) == 4 and (tmp_path / "noisy" / "loss_curves.png").is_file()
    if compiled:  # the noise acts on the gradients and weights, not the graph: the eager run's weights
        eager = NoiseAnnealing(eta=0.1, clip_norm=0.5, grad_norm_threshold=10.0, radius=0.5, perturb_interval=2)
        reference = _fit(tmp_path / "eager", _classifier(False), classification_loader(), [eager])
        assert torch.allclose(noisy, reference, atol=1e-6)


@pytest.mark.parametrize("mode", ["compile", "bf16-mixed"])
def test_gradient_flossing(tmp_path, mode):
    def run(model, **kwargs):
        flosser = GradientFlossing(k=4, pre_train_steps=3, every_n_steps=1, floss_steps=1, max_rounds=1,
                                   sequence_length=12, warmup=2, batch_size=2, lr=0.02, plot=False)  # fmt: skip
        _fit(tmp_path, model, _loader(), [flosser], max_steps=2, **kwargs)
        return flosser.history

    seed_everything(0)
    eager = run(RNNTask())
    seed_everything(0)
    got = run(CompiledRNN()) if mode == "compile" else run(RNNTask(), precision=mode)
    phases = ["initial", "pre_train", "round", "end"]
    assert [phase for _, phase, _ in got] == [phase for _, phase, _ in eager] == phases
    # Pre-training runs before any training step and outside autocast: the eager float32 spectrum exactly.
    assert got[1][2] == eager[1][2]
    assert all(math.isfinite(v) for _, _, spectrum in got for v in spectrum)


def test_text_sampler_under_bf16(tmp_path):
    from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 100)
    sampler = TextSampler(prompt="def", max_new_tokens=8)
    seed_everything(0)
    model = CausalLMModule(overrides={"block_size": 16, "n_layer": 1})
    data = TextCorpusDataModule(data_dir=str(corpus), seq_len=16, batch_size=4, train_windows=16, num_workers=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, precision="bf16-mixed", limit_val_batches=0, callbacks=[sampler])
    trainer.fit(model, datamodule=data)
    assert sampler.last_sample.startswith("def")
    assert [p.read_text() for p in tmp_path.rglob("sample.txt")] == [sampler.last_sample]


@pytest.mark.parametrize("mode", ["compile", "bf16-mixed"])
def test_adam_preconditioned_sharpness(tmp_path, mode):
    def run(compiled, **kwargs):
        seed_everything(0)
        cls = CompiledClassifier if compiled else TinyClassifier
        sharp = SharpnessTracker(max_overhead=None, every_n_steps=2, batch="fixed", tol=1e-6)
        _fit(tmp_path, cls(dropout=0.0, batchnorm=False, optimizer="adam", lr=0.01), classification_loader(),
             [sharp], **kwargs)  # fmt: skip
        return sharp.last_metrics

    key = "sharpness/preconditioned_lambda_max"
    eager = run(False)
    got = run(True) if mode == "compile" else run(False, precision=mode)
    assert math.isfinite(got[key]) and got["sharpness/threshold"] == pytest.approx(38 / 0.01)
    if mode == "compile":  # the same Adam state and products as the eager run
        assert got[key] == pytest.approx(eager[key], rel=1e-5)
    else:  # bf16 autocast changes the trajectory a little; moments and products stay float32
        assert got[key] == pytest.approx(eager[key], rel=0.2)
