"""One 2-process gloo job: the same seeded fits under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2, every callback attached.

Run by ``tests/strategies/conftest.py`` through :func:`tests.helpers.ddp.run_ddp_script` (``python
_backends_job.py OUT`` on each rank, started together). Each rank writes ``{backend: {case: result}}``;
``test_deepspeed.py`` and ``test_fsdp.py`` check them. One job instead of one per check: starting a 2-process
DeepSpeed job costs ~10 s on 2 cores, a fit on these tiny models well under 1 s.
"""

import tests.helpers.deepspeed  # noqa: I001  first: sets DS_ACCELERATOR=cpu before DeepSpeed is imported

import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402

from lightning_gd.callbacks import (  # noqa: E402
    GradientFlossing,
    HessianTraceMonitor,
    MetricPlotter,
    NoiseAnnealing,
    SharpnessTracker,
    TextSampler,
)
from lightning_gd.optim import OptimizerRecipe  # noqa: E402
from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule  # noqa: E402
from tests.callbacks.test_gradient_flossing import RNNTask, _loader  # noqa: E402
from tests.helpers.ddp import write_result  # noqa: E402
from tests.helpers.models import KinkedRegressor, TinyClassifier, classification_loader, kinked_loader  # noqa: E402
from tests.helpers.trainer import quiet_trainer  # noqa: E402

BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
# Gradient flossing needs whole parameters on every rank: refused (at setup) where they are sharded. The curvature
# callbacks measure there by finite differences of the strategy's own gradients (the "curvature" case).
SHARDED = ("zero3", "fsdp2")


def _shard_under_fsdp2(module, *parts):
    # FSDP2 shards what `configure_model` wraps with `fully_shard`, over the data-parallel ranks; DDP and DeepSpeed
    # ignore it.
    if isinstance(module.trainer.strategy, ModelParallelStrategy):
        for part in parts:
            fully_shard(part, mesh=module.device_mesh["data_parallel"])


class Classifier(TinyClassifier):
    def configure_model(self):
        _shard_under_fsdp2(self, self.net)


class CondaClassifier(Classifier):
    def configure_optimizers(self):
        return OptimizerRecipe(optimizer="conda", lr=0.01, warmup_steps=0).build(self)


class ZeroRedundancyClassifier(Classifier):
    def configure_optimizers(self):  # each rank keeps the Adam state of its own share of the parameters
        return ZeroRedundancyOptimizer(self.parameters(), optimizer_class=torch.optim.Adam, lr=self.hparams.lr)


class RNN(RNNTask):
    def configure_model(self):
        _shard_under_fsdp2(self, self.rnn, self.readout)  # its training_step calls them, not `self.forward`


class Kinked(KinkedRegressor):
    def configure_model(self):
        _shard_under_fsdp2(self, self.net)


class LM(CausalLMModule):
    def configure_model(self):
        _shard_under_fsdp2(self, *self.model.blocks, self.model)


def strategy(name):
    if name == "ddp":
        return "ddp"
    if name == "fsdp2":
        # Runs on CPU (gloo) as it is. Its "auto" sizes make every device tensor-parallel: 2-way data parallel here.
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return tests.helpers.deepspeed.zero(int(name[-1]))


def weights(trainer, model):
    params = list(model.parameters())
    if type(trainer.strategy).__name__ == "CPUDeepSpeedStrategy":
        # DeepSpeed's fp32 master weights, whole (a collective): ZeRO-3 partitions the module's own parameters.
        from deepspeed.utils import safe_get_full_fp32_param

        params = [safe_get_full_fp32_param(p) for p in params]
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]  # FSDP2's DTensors
    return torch.cat([p.detach().reshape(-1) for p in params]).tolist()


def fit(name, case, model, data, callbacks, max_steps=4, ckpt_path=None, checkpoint=None, **trainer_kwargs):
    seed_everything(0)
    extra = [checkpoint] if checkpoint else []
    trainer = quiet_trainer(
        f"{name}_{case}", devices=2, strategy=strategy(name), max_steps=max_steps, enable_checkpointing=bool(extra),
        callbacks=[*callbacks, *extra], limit_val_batches=0, **trainer_kwargs,
    )  # fmt: skip
    loaders = {"datamodule": data} if isinstance(data, TextCorpusDataModule) else {"train_dataloaders": data}
    try:
        trainer.fit(model, ckpt_path=ckpt_path, **loaders)
    except (MisconfigurationException, ValueError) as err:  # raised at setup on every rank: the job goes on
        return {"error": str(err)}
    return {"weights": weights(trainer, model)}


def same(a, b):
    """Exact equality of two callback states, wall-clock entries aside (they measure the machine)."""
    if isinstance(a, dict):
        keys = [k for k in a if not any(w in str(k) for w in ("spent", "elapsed", "cost"))]
        return isinstance(b, dict) and keys == [k for k in b if k in keys] and all(same(a[k], b[k]) for k in keys)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def classifier():
    seed_everything(0)
    return Classifier(dropout=0.0, batchnorm=False)  # no BatchNorm: DeepSpeed does not broadcast buffers


def rnn():
    seed_everything(0)
    return RNN()


def kinked():
    seed_everything(0)
    return Kinked()


def floss(**kwargs):
    kwargs = {"k": 4, "pre_train_steps": 0, "sequence_length": 12, "warmup": 2, "batch_size": 2, "lr": 0.02, **kwargs}
    return GradientFlossing(plot=False, **kwargs)


def run(name):
    res = {"plain": fit(name, "plain", classifier(), classification_loader(), [])}

    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=2, num_probes=10)
    sharp = SharpnessTracker(max_overhead=None, every_n_steps=2, smallest=True, density_every_n_steps=4)
    r = fit(name, "curvature", classifier(), classification_loader(), [trace, sharp])
    res["curvature"] = {**r, "trace": trace.last_metrics, "sharp": sharp.last_metrics}

    if name != "fsdp2":  # a shape-dependent optimizer recipe: refused under ZeRO, trains under DDP
        seed_everything(0)
        res["conda_recipe"] = fit(name, "conda_recipe", CondaClassifier(dropout=0.0, batchnorm=False),
                                  classification_loader(), [])  # fmt: skip

    # Adam: SharpnessTracker("auto") reads the second moments through utils/optim_state.py (DeepSpeed's flat
    # partitions, ZeroRedundancyOptimizer's shards) and tracks lambda_max(P^-1 H) against 38/lr.
    # "adam_clipped": gradients clipped to norm 0.05 (every step here), by Lightning under DDP, inside DeepSpeed's
    # step under ZeRO: the clip factor c enters the preconditioner.
    def adam():
        return Classifier(dropout=0.0, batchnorm=False, optimizer="adam", lr=0.01)

    def zero_redundancy():
        return ZeroRedundancyClassifier(dropout=0.0, batchnorm=False, lr=0.01)

    adam_cases = {"adam": (adam, {}), "adam_clipped": (adam, {"gradient_clip_val": 0.05})}
    if name == "ddp":
        adam_cases["zero_redundancy"] = (zero_redundancy, {})
    for case, (make, trainer_kwargs) in adam_cases.items():
        sharp = SharpnessTracker(max_overhead=None, every_n_steps=2, tol=1e-6)
        seed_everything(0)
        r = fit(name, case, make(), classification_loader(), [sharp], **trainer_kwargs)
        res[case] = {**r, "sharp": sharp.last_metrics, "history": sharp.history}

    # The RNN uses its recurrent weights several times per forward (ZeRO-3 keeps such gathered copies between
    # forwards): a check at every step, against DDP's exact products, and training untouched.
    if name in ("ddp", *SHARDED):
        sharp = SharpnessTracker(max_overhead=None, every_n_steps=1)
        r = fit(name, "rnn_sharpness", rnn(), _loader(), [sharp])
        res["rnn_sharpness"] = {**r, "history": sharp.history, "plain": fit(name, "rnn_plain", rnn(), _loader(), [])}

    # A ReLU unit held at its kink: the central differences depend on their step, so every check is skipped on
    # both ranks together (the step check's change all-reduced), said once, and training left as it was.
    if name in SHARDED:
        sharp = SharpnessTracker(max_overhead=None, every_n_steps=1, plot=False, max_iter=20)
        trace = HessianTraceMonitor(max_overhead=None, every_n_steps=1, num_probes=4)
        r = fit(name, "kinked", kinked(), kinked_loader(n=64), [sharp, trace], max_steps=3)
        plain = fit(name, "kinked_plain", kinked(), kinked_loader(n=64), [], max_steps=3)
        res["kinked"] = {**r, "sharp": sharp.history, "trace": trace.history, "plain": plain}

    plotter = MetricPlotter(every_n_steps=1)
    r = fit(name, "plotter", classifier(), classification_loader(), [plotter])
    res["plotter"] = {**r, "history": plotter.history, "png": Path(f"{name}_plotter/loss_curves.png").is_file()}

    noises = {  # gradient noise after NoiseAnnealing's own clipping, with perturbed GD's kicks on the weights
        "gradient_noise": lambda: NoiseAnnealing(eta=0.1, clip_norm=0.5, grad_norm_threshold=10.0, radius=0.5,
                                                 perturb_interval=2),
        "weight_noise": lambda: NoiseAnnealing(eta=0.01, target="weights"),
    }  # fmt: skip
    for case, make in noises.items():
        noise = make()
        r = fit(name, case, classifier(), classification_loader(), [noise])
        res[case] = {**r, "perturbations": noise.perturbations}

    flossings = {
        "floss_rounds": lambda: floss(pre_train_steps=3, every_n_steps=2, floss_steps=2),
        "floss_continuous": lambda: floss(continuous=True, weight=10.0),
    }
    for case, make in flossings.items():
        flosser = make()
        r = fit(name, case, rnn(), _loader(), [flosser])
        res[case] = {**r, "lyapunov": flosser.last_metrics}

    corpus = Path("corpus")
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 100)
    sampler = TextSampler(prompt="def", max_new_tokens=8)
    seed_everything(0)
    lm = LM(overrides={"block_size": 16, "n_layer": 1})
    data = TextCorpusDataModule(data_dir=str(corpus), seq_len=16, batch_size=4, train_windows=32, num_workers=0)
    r = fit(name, "text_sampler", lm, data, [sampler], max_steps=2)
    res["text_sampler"] = {**r, "sample": sampler.last_sample}

    # Save at step 2 (an epoch boundary: 32 sequences, batch 8, 2 ranks) and resume to step 4, every callback that
    # the backend supports attached; against the uninterrupted 4 steps.
    # Under ZeRO-3 and FSDP2 the tracker's warm-start vectors are each rank's shard: the checkpoint keeps every rank's.
    def callbacks():
        cbs = [MetricPlotter(every_n_steps=1), NoiseAnnealing(eta=0.01)]
        if name not in SHARDED:
            cbs += [floss(every_n_steps=2, floss_steps=1)]
        return [*cbs, SharpnessTracker(max_overhead=None, every_n_steps=1)]

    full = callbacks()
    r_full = fit(name, "resume_full", rnn(), _loader(), full)
    ckpt = ModelCheckpoint(dirpath=f"{name}_ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(name, "resume_first", rnn(), _loader(), callbacks(), max_steps=2, checkpoint=ckpt)
    path = Path(f"{name}_ckpt/epoch=0-step=2.ckpt")
    resumed = callbacks()
    r_resumed = fit(name, "resume_second", rnn(), _loader(), resumed, ckpt_path=str(path))
    res["resume"] = {
        "full": r_full["weights"],
        "resumed": r_resumed["weights"],
        "states_equal": [same(a.state_dict(), b.state_dict()) for a, b in zip(full, resumed, strict=True)],
        # SharpnessTracker's checks after the resume log what the uninterrupted run logged (states_equal)
        "sharpness": getattr(resumed[-1], "history", None),
        "warm_start_ranks": len(resumed[-1].state_dict().get("warm_start_by_rank", [])),
        "files": sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.is_dir() else None,
    }
    return res


if __name__ == "__main__":
    out = {name: run(name) for name in BACKENDS}
    write_result(out, int(os.environ.get("LOCAL_RANK", 0)))
