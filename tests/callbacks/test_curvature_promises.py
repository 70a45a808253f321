"""README promises of the curvature callbacks, each against an independent reference (single process).

The 2-process DDP promises are in ``test_curvature_promises_ddp.py``.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.func import functional_call

from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from tests.callbacks.test_curvature_callbacks import _adam_p_by_hand
from tests.helpers.hessian import exact_hessian
from tests.helpers.models import TinyClassifier, classification_loader
from tests.helpers.trainer import quiet_trainer


def _ce(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def _nan_loss_at_step_2(module, batch):
    loss = _ce(module, batch)
    return loss * math.nan if module.trainer.global_step == 2 else loss


def _nan_curvature_at_step_2(module, batch):
    """A finite loss whose gradient, hence every Hessian-vector product, is NaN at step 2 (d sqrt(u)/du at 0, x 0)."""
    x, y = batch
    out = module(x)
    loss = F.cross_entropy(out, y)
    if module.trainer.global_step == 2:
        loss = loss + 0.0 * (out - out.detach()).abs().sqrt().sum()
    return loss


def _small_model():
    return TinyClassifier(hidden=4, batchnorm=False, dropout=0.0)  # 59 parameters: Lanczos converges fast


@pytest.mark.parametrize(
    ("bad_loss_fn", "which"),
    [
        (_nan_loss_at_step_2, ("trace", "sharpness")),
        (_nan_curvature_at_step_2, ("trace",)),
        (_nan_curvature_at_step_2, ("sharpness",)),
    ],
    ids=["nan-loss", "nan-curvature-trace", "nan-curvature-sharpness"],
)
def test_a_nonfinite_step_is_skipped_and_measuring_resumes_afterwards(tmp_path, bad_loss_fn, which):
    def run(loss_fn):
        seed_everything(0)
        callbacks = {
            "trace": HessianTraceMonitor(max_overhead=None, every_n_steps=1, num_probes=4, loss_fn=loss_fn),
            "sharpness": SharpnessTracker(max_overhead=None, every_n_steps=1, loss_fn=loss_fn, tol=1e-7, max_iter=60),
        }
        callbacks = [callbacks[name] for name in which]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(tmp_path, callbacks=callbacks, max_steps=4, precision="64-true").fit(
                _small_model(), classification_loader()
            )
        messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
        return [c.history for c in callbacks], messages

    histories, warned = run(bad_loss_fn)
    clean_histories, clean_warned = run(_ce)
    assert clean_warned == [] and len(warned) == len(which)  # once per callback, not once per step
    assert all("at step 2" in w for w in warned)
    for history, clean in zip(histories, clean_histories, strict=True):
        key = "hessian/trace" if "hessian/trace" in clean else "sharpness/lambda_max"
        assert [s for s, _ in clean[key]] == [1, 2, 3, 4]
        assert [s for s, _ in history[key]] == [1, 3, 4]
        # The skipped step changes nothing else: the other checks give the clean run's values (lambda_max to
        # Lanczos' tolerance: its warm start at step 3 came from step 1 instead of step 2).
        reference = dict(clean[key])
        for step, value in history[key]:
            assert value == pytest.approx(reference[step], rel=1e-9 if key == "hessian/trace" else 1e-6)


def test_self_log_is_silenced_while_measuring(tmp_path):
    # Dropout makes the callbacks' eval-mode loss differ from the logged train-mode one; log_every_n_steps=1 and
    # a check after every step: any leak of the measurement's self.log would change the logged train/loss.
    def run(callbacks, name):
        seed_everything(2)
        model = TinyClassifier(dropout=0.3)
        logger = CSVLogger(tmp_path, name=name, version=0)
        trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=logger, log_every_n_steps=1, max_steps=3)
        trainer.fit(model, classification_loader())
        rows = (tmp_path / name / "version_0" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        col, step = header.index("train/loss"), header.index("step")
        logged = [(r.split(",")[step], r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
        return logged, float(trainer.callback_metrics["train/loss"])

    plain, plain_last = run([], "plain")
    measured, measured_last = run(
        [
            HessianTraceMonitor(max_overhead=None, every_n_steps=1, num_probes=2),
            SharpnessTracker(max_overhead=None, every_n_steps=1, max_iter=3),
        ],
        "measured",
    )
    assert len(plain) == 3 and measured == plain
    assert measured_last == plain_last


def test_fixed_batch_mode_measures_the_mean_loss_over_num_batches(tmp_path):
    seed_everything(0)
    model = _small_model()
    sharp = SharpnessTracker(
        max_overhead=None, every_n_steps=4, batch="fixed", num_batches=3, k=2, tol=1e-9, max_iter=59
    )
    quiet_trainer(tmp_path, callbacks=[sharp], max_steps=4, precision="64-true").fit(model, classification_loader())
    loader = list(classification_loader())
    assert len(sharp._fixed) == 3
    for kept, (x, y) in zip(sharp._fixed, loader[:3], strict=True):
        assert torch.equal(kept[0], x.double()) and torch.equal(kept[1], y)
    # Reference: the dense Hessian of the mean of the three batch losses at the final weights.
    hessians = [exact_hessian(model, (x.double(), y)) for x, y in loader[:3]]
    H = sum(hessians) / 3
    eig = torch.linalg.eigvalsh(H)
    m = sharp.last_metrics
    assert m["sharpness/lambda_max"] == pytest.approx(eig[-1].item(), rel=1e-6)
    assert m["sharpness/eig_2"] == pytest.approx(eig[-2].item(), rel=1e-6)
    first_only = torch.linalg.eigvalsh(hessians[0])[-1].item()
    assert abs(first_only - eig[-1].item()) > 1e-3 * abs(eig[-1].item())  # the test tells one batch from three


def _finite_difference_hvp(model, batch, v, h=1e-5):
    """Central difference of autograd.grad of the eval-mode next-byte loss along v (float64, unit step direction)."""
    scale = v.norm()
    v = v / scale
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    base = dict(model.named_parameters())
    chunks = dict(zip(names, v.split([base[n].numel() for n in names]), strict=True))
    x, y = batch

    def grad_at(sign):
        shifted = {n: (base[n].detach() + sign * h * chunks[n].view_as(base[n])).requires_grad_() for n in names}
        logits = functional_call(model, shifted, (x,))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [shifted[n] for n in names])])

    model.eval()
    try:
        return (grad_at(1.0) - grad_at(-1.0)) * (scale / (2 * h))
    finally:
        model.train()


def test_curvature_callbacks_on_the_llama_model_in_a_trainer(tmp_path):
    from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule

    for i in range(2):
        (tmp_path / f"f{i}.py").write_text("def add(a, b):\n    return a + b\n" * 50)
    dm = TextCorpusDataModule(data_dir=str(tmp_path), glob="*.py", seq_len=16, batch_size=2, train_windows=8)
    seed_everything(0)
    module = CausalLMModule(preset="tiny", overrides={"block_size": 16, "n_layer": 1})  # every kind of block
    sharp = SharpnessTracker(
        max_overhead=None, every_n_steps=2, batch="fixed", preconditioned=True, tol=1e-3, max_iter=12, plot=False
    )
    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=2, batch="fixed", num_probes=4, per_layer=True)
    trainer = quiet_trainer(tmp_path, callbacks=[sharp, trace], max_steps=2, precision="64-true", limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    m, t = sharp.last_metrics, trace.last_metrics
    assert [s for s, _ in sharp.history["sharpness/preconditioned_lambda_max"]] == [2]
    x, y = sharp._fixed[0]
    batch = (x.to(torch.long), y.to(torch.long))
    # lambda_max of P^-1/2 H P^-1/2 (AdamW's own P_t, rebuilt by hand): its Ritz vector u must satisfy
    # P^-1/2 H P^-1/2 u = lambda u, with H u products by finite differences of autograd.grad.
    params = [p for p in module.parameters() if p.requires_grad]
    s = _adam_p_by_hand(trainer.optimizers[0], params).rsqrt()
    u = sharp._init["max"].double()
    u = u / u.norm()
    Au = s * _finite_difference_hvp(module, batch, s * u)
    lam = m["sharpness/preconditioned_lambda_max"]
    assert lam > 0 and (u @ Au).item() == pytest.approx(lam, rel=1e-4)
    assert (Au - lam * u).norm().item() < 0.1 * lam  # near an eigenvector after 12 Lanczos steps (6% measured)
    assert m["sharpness/threshold"] == pytest.approx(38 / trainer.optimizers[0].param_groups[0]["lr"])
    # The trace: consistent with its per-layer parts; Hutchinson with 6 probes of our own through
    # finite-difference products agrees within the two standard errors.
    layers = [v for k, v in t.items() if k.startswith("hessian/trace/")]
    assert len(layers) == len(params) and sum(layers) == pytest.approx(t["hessian/trace"], rel=1e-9)
    gen = torch.Generator().manual_seed(123)
    quad = []
    for _ in range(6):
        z = torch.randint(0, 2, (u.numel(),), generator=gen, dtype=torch.float64) * 2 - 1
        quad.append((z @ _finite_difference_hvp(module, batch, z)).item())
    ref, ref_se = torch.tensor(quad).mean().item(), torch.tensor(quad).std().item() / math.sqrt(6)
    assert abs(t["hessian/trace"] - ref) < 4 * math.hypot(t["hessian/trace_stderr"], ref_se)
