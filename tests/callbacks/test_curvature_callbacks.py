import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from lightning_gd.curvature import HessianOperator, hutchinson_trace
from lightning_gd.curvature.preconditioned import adam_unmoved
from tests.helpers.hessian import exact_hessian
from tests.helpers.models import TinyClassifier, classification_loader
from tests.helpers.trainer import quiet_trainer


def _first_batch(n=64):
    x, y = next(iter(classification_loader(n=n)))
    return x.double(), y


def test_values_match_the_exact_hessian_in_a_real_trainer(tmp_path):
    seed_everything(0)
    model = TinyClassifier(dropout=0.2)
    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=8, num_probes=200, batch="fixed", per_layer=True)
    sharp = SharpnessTracker(
        max_overhead=None, every_n_steps=8, k=2, smallest=True, batch="fixed", tol=1e-8, max_iter=200
    )
    quiet_trainer(tmp_path, callbacks=[trace, sharp], max_steps=8, precision="64-true").fit(
        model, classification_loader()
    )
    H = exact_hessian(model, _first_batch())
    eig = torch.linalg.eigvalsh(H)
    m = sharp.last_metrics
    assert m["sharpness/lambda_max"] == pytest.approx(eig[-1].item(), rel=1e-6)
    assert m["sharpness/eig_2"] == pytest.approx(eig[-2].item(), rel=1e-6)
    assert m["sharpness/lambda_min"] == pytest.approx(eig[0].item(), rel=1e-6)
    assert m["sharpness/edge_of_stability"] == pytest.approx(0.1 * eig[-1].item() / 2, rel=1e-6)
    t = trace.last_metrics
    exact_trace = torch.trace(H).item()
    assert abs(t["hessian/trace"] - exact_trace) < 3 * t["hessian/trace_stderr"]
    assert t["hessian/sgd_stability"] == pytest.approx(0.1 * t["hessian/trace"] / 2)
    layers = {k: v for k, v in t.items() if k.startswith("hessian/trace/")}
    assert set(layers) == {f"hessian/trace/{n}" for n, _ in model.named_parameters()}
    assert sum(layers.values()) == pytest.approx(t["hessian/trace"], rel=1e-9)
    assert [s for s, _ in trace.history["hessian/trace"]] == [8]


def test_measuring_never_changes_the_training_trajectory(tmp_path):
    def run(callbacks):
        seed_everything(7)
        model = TinyClassifier(dropout=0.3, momentum=0.9)
        quiet_trainer(tmp_path, callbacks=callbacks, max_steps=8).fit(model, classification_loader(shuffle=True))
        return model.state_dict(), torch.get_rng_state()

    plain, rng_plain = run([])
    measured, rng_measured = run(
        [
            HessianTraceMonitor(max_overhead=None, every_n_steps=1, num_probes=6, mode="train", per_layer=True),
            SharpnessTracker(max_overhead=None, every_n_steps=2, smallest=True, density_every_n_steps=4, max_iter=10),
            HessianTraceMonitor(max_overhead=None, every_n_steps=3, num_probes=6, method="hutch++", batch="fixed"),
        ]
    )
    assert plain.keys() == measured.keys()
    for key in plain:  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(plain[key], measured[key]), key
    assert torch.equal(rng_plain, rng_measured)


def test_warm_start_and_checkpoint_resume_continue_as_if_never_stopped(tmp_path):
    def tracker():
        return SharpnessTracker(max_overhead=None, every_n_steps=2, batch="fixed", tol=1e-4, max_iter=60)

    def fit(steps, callbacks, ckpt_path=None, extra=()):
        seed_everything(3)
        model = TinyClassifier(dropout=0.0)
        trainer = quiet_trainer(
            tmp_path, callbacks=[*callbacks, *extra], max_steps=steps, enable_checkpointing=bool(extra)
        )
        trainer.fit(model, classification_loader(), ckpt_path=ckpt_path)
        return trainer

    full = tracker()
    fit(8, [full])
    first = tracker()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    fit(4, [first], extra=[ckpt])
    resumed = tracker()
    fit(8, [resumed], ckpt_path=tmp_path / "ck" / "epoch=0-step=4.ckpt")
    assert resumed._fixed and torch.equal(resumed._fixed[0][0], full._fixed[0][0])
    for key in ("sharpness/lambda_max", "sharpness/num_hvps"):
        got, want = resumed.history[key], full.history[key]
        assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6, 8]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-9)
    hvps = [v for _, v in full.history["sharpness/num_hvps"]]
    cold = SharpnessTracker(max_overhead=None, every_n_steps=2, batch="fixed", tol=1e-4, max_iter=60, warm_start=False)
    fit(8, [cold])
    assert sum(hvps[1:]) < sum(v for _, v in cold.history["sharpness/num_hvps"][1:])


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path):
    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=1, num_probes=4)
    quiet_trainer(tmp_path, callbacks=[trace], max_steps=3, accumulate_grad_batches=2).fit(
        TinyClassifier(), classification_loader()
    )
    assert [s for s, _ in trace.history["hessian/trace"]] == [1, 2, 3]


def _adam_p_by_hand(optimizer, params):
    """Cohen et al. 2022, Section 2: P_t = (1 - beta1^t) (diag(sqrt(v_t / (1 - beta2^t))) + eps I), from the state."""
    (beta1, beta2), eps = optimizer.param_groups[0]["betas"], optimizer.param_groups[0]["eps"]
    diags = []
    for p in params:
        state = optimizer.state[p]
        t = int(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2**t)
        diags.append(((1 - beta1**t) * (v_hat.sqrt() + eps)).flatten())
    return torch.cat(diags)


def test_preconditioned_sharpness_matches_the_exact_adam_preconditioned_hessian(tmp_path):
    seed_everything(0)
    model = TinyClassifier(dropout=0.0, optimizer="adam", lr=0.01)
    sharp = SharpnessTracker(
        max_overhead=None, every_n_steps=4, preconditioned=True, batch="fixed", tol=1e-9, max_iter=200
    )
    trainer = quiet_trainer(tmp_path, callbacks=[sharp], max_steps=4, precision="64-true")
    trainer.fit(model, classification_loader())
    opt = trainer.optimizers[0]
    assert int(opt.state[next(model.parameters())]["step"]) == 4  # early: 1 - beta1^t = 0.34, far from 1
    diag = _adam_p_by_hand(opt, tuple(model.parameters()))
    H = exact_hessian(model, _first_batch())
    # The first layer's bias feeds a BatchNorm: its training gradient is zero up to rounding, so Adam's
    # sqrt(v_hat) < eps and Adam never moves it; P = (1 - beta1^t) eps there put 1/eps on the diagonal (4.5e7
    # here, before issue 21). Those coordinates are left out.
    (_, beta2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    moved = torch.cat([~adam_unmoved(opt.state[p]["exp_avg_sq"], 4, beta2, eps).flatten() for p in model.parameters()])
    assert not moved.all() and m_bias_is_first_linear(model, moved)
    s = diag[moved].rsqrt()
    exact = torch.linalg.eigvalsh(s[:, None] * H[moved][:, moved] * s[None, :])[-1].item()
    m = sharp.last_metrics
    assert m["sharpness/preconditioned_lambda_max"] == pytest.approx(exact, rel=1e-6)
    assert m["sharpness/unmoved_fraction"] == pytest.approx((~moved).double().mean().item())
    assert m["sharpness/threshold"] == pytest.approx(38 / 0.01)
    assert m["sharpness/edge_of_stability"] == pytest.approx(exact / 3800, rel=1e-6)


def m_bias_is_first_linear(model, moved):
    """The unmoved coordinates are exactly the first Linear's bias (before the BatchNorm)."""
    offset = model.net[0].weight.numel()
    return bool((~moved).nonzero().flatten().tolist() == list(range(offset, offset + model.net[0].bias.numel())))


def test_plots_and_logs(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    sharp = SharpnessTracker(max_overhead=None, every_n_steps=2, density_every_n_steps=4, max_iter=10)
    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=2, num_probes=4)
    quiet_trainer(tmp_path, callbacks=[sharp, trace], max_steps=8, logger=[tb, csv]).fit(
        TinyClassifier(), classification_loader()
    )
    run = tmp_path / "tb" / "version_0"
    assert sharp.plot_path == str(run / "sharpness.png")
    assert [p.rsplit("/", 1)[1] for p in sharp.density_paths] == [
        "spectral_density_step4.png",
        "spectral_density_step8.png",
    ]
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {"sharpness/spectral_density", "sharpness/vs_threshold"} <= set(events.Tags()["images"])
    steps = [e.step for e in events.Scalars("hessian/trace")]
    assert steps == [2, 4, 6, 8]  # every measurement reaches the logger, whatever log_every_n_steps is
    assert "sharpness/lambda_max" in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()


def test_nonfinite_loss_skips_with_one_warning_and_leaves_training_alone(tmp_path):
    def nan_loss(module, batch):
        return module(batch[0]).sum() * math.nan

    def run(callbacks):
        seed_everything(1)
        model = TinyClassifier()
        quiet_trainer(tmp_path, callbacks=callbacks, max_steps=6).fit(model, classification_loader())
        return model.state_dict()

    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=1, num_probes=4, loss_fn=nan_loss)
    sharp = SharpnessTracker(max_overhead=None, every_n_steps=1, loss_fn=nan_loss, max_iter=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measured = run([trace, sharp])
    ours = [w for w in caught if "non-finite" in str(w.message)]
    assert len(ours) == 2  # one per callback, not one per step
    assert trace.history == {} and sharp.history == {}
    plain = run([])
    assert all(torch.equal(plain[k], measured[k]) for k in plain)


def test_custom_loss_fn_is_used(tmp_path):
    def quadratic(module, batch):
        return sum((p**2).sum() for p in module.parameters())  # Hessian = 2 I

    sharp = SharpnessTracker(max_overhead=None, every_n_steps=2, loss_fn=quadratic, smallest=True)
    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=2, num_probes=3, loss_fn=quadratic)
    model = TinyClassifier(dropout=0.0)
    quiet_trainer(tmp_path, callbacks=[sharp, trace], max_steps=2).fit(model, classification_loader())
    n = sum(p.numel() for p in model.parameters())
    assert sharp.last_metrics["sharpness/lambda_max"] == pytest.approx(2.0)
    assert sharp.last_metrics["sharpness/lambda_min"] == pytest.approx(2.0)
    assert trace.last_metrics["hessian/trace"] == pytest.approx(2.0 * n)
    assert trace.last_metrics["hessian/trace_stderr"] == pytest.approx(0.0, abs=1e-9)


def test_no_trainable_parameters_and_an_optimizer_without_adam_moments_are_refused(tmp_path):
    model = TinyClassifier()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match="no trainable parameters"):
        quiet_trainer(tmp_path, callbacks=[HessianTraceMonitor()], max_steps=8).fit(model, classification_loader())
    with pytest.raises(MisconfigurationException, match="Adam-family"):
        quiet_trainer(tmp_path, callbacks=[SharpnessTracker(preconditioned=True)], max_steps=8).fit(
            TinyClassifier(), classification_loader()
        )


class _CPUFSDPStrategy(FSDPStrategy):
    """A real FSDPStrategy. The Trainer refuses ``type(strategy) is FSDPStrategy`` on CPU before anything runs, a
    subclass passes that guard, so fit goes through FSDP's environment set-up to the callbacks' ``setup``."""


@pytest.fixture
def _leaves_no_process_group():
    """FSDP's set-up starts a 1-process gloo group and sets MASTER_* variables; later tests must not see them."""
    env = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@pytest.mark.usefixtures("_leaves_no_process_group")
@pytest.mark.parametrize("cls", [HessianTraceMonitor, SharpnessTracker])
def test_fsdp1_is_accepted_at_setup_and_exact_products_are_refused_naming_it(tmp_path, cls):
    # FSDP1 on CPU stops in torch ("FSDP needs a non-CPU accelerator device") after the callbacks' setup: call the
    # hook with a real Trainer on the strategy. Its run on a GPU: test_fsdp1_measures_on_gpu.
    trainer = quiet_trainer(tmp_path, callbacks=[], max_steps=8, strategy=_CPUFSDPStrategy(), devices=1)
    cb = cls()
    cb.setup(trainer, TinyClassifier(), stage="fit")
    assert cb._sharding == "fsdp1"
    with pytest.raises(MisconfigurationException, match=r"hvp='double_backward'\) cannot run under _CPUFSDPStrategy"):
        cls(hvp="double_backward").setup(trainer, TinyClassifier(), stage="fit")
    with pytest.raises(MisconfigurationException, match=r"curvature='ggn'\) cannot run under _CPUFSDPStrategy"):
        cls(curvature="ggn", loss="cross_entropy").setup(trainer, TinyClassifier(), stage="fit")


@pytest.mark.parametrize("cls", [HessianTraceMonitor, SharpnessTracker])
def test_deepspeed_zero3_is_accepted_and_strategies_without_gradients_are_refused_naming_them(tmp_path, cls):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    # DeepSpeed's environment set-up needs CUDA, so on CPU the Trainer never reaches `setup` in `fit`: call the
    # callback's own `setup` hook with a real Trainer built on the strategy, as `fit` does after that set-up. The
    # ZeRO-3 run itself (CPU harness, 2 ranks): tests/strategies/test_deepspeed.py.
    zero3 = quiet_trainer(tmp_path, callbacks=[], max_steps=8, strategy=DeepSpeedStrategy(stage=3), devices=1)
    cb = cls()
    cb.setup(zero3, TinyClassifier(), stage="fit")
    assert cb._sharding == "zero3"
    with pytest.raises(MisconfigurationException, match=r"cannot run under DeepSpeedStrategy: DeepSpeed ZeRO stage 3"):
        cls(hvp="forward_over_reverse").setup(zero3, TinyClassifier(), stage="fit")
    zero2 = quiet_trainer(tmp_path, callbacks=[], max_steps=8, strategy=DeepSpeedStrategy(stage=2), devices=1)
    cls(hvp="double_backward").setup(zero2, TinyClassifier(), stage="fit")  # ZeRO-1/2 keep whole parameters

    class HomeMadeFSDPStrategy(DDPStrategy):
        pass

    tp = quiet_trainer(
        tmp_path, callbacks=[], max_steps=8, strategy=ModelParallelStrategy(tensor_parallel_size=2), devices=1
    )
    with pytest.raises(MisconfigurationException, match="under ModelParallelStrategy with tensor_parallel_size=2"):
        cls().setup(tp, TinyClassifier(), stage="fit")
    other = quiet_trainer(tmp_path, callbacks=[], max_steps=8, strategy=HomeMadeFSDPStrategy(), devices=1)
    with pytest.raises(MisconfigurationException, match="cannot obtain the gradients under HomeMadeFSDPStrategy"):
        cls().setup(other, TinyClassifier(), stage="fit")


@pytest.mark.parametrize("fd_tolerance", [None, 0.01])
def test_half_precision_finite_differences_warn_once_with_the_expected_error(tmp_path, fd_tolerance):
    trace = HessianTraceMonitor(
        every_n_steps=2, num_probes=2, max_overhead=None, hvp="finite_difference", fd_tolerance=fd_tolerance
    )
    with pytest.warns(UserWarning, match=r"held in torch.bfloat16 .*relative error of about 3.9%") as record:
        quiet_trainer(tmp_path, callbacks=[trace], precision="bf16-true", max_steps=4).fit(
            TinyClassifier(), classification_loader()
        )
    assert sum("relative error of about" in str(w.message) for w in record) == 1
    assert trace._hvp_in_use == "finite_difference"
    if fd_tolerance is None:  # no step check: the (coarse) estimate is reported
        assert math.isfinite(trace.last_metrics["hessian/trace"])
        assert "hessian/fd_step_change" not in trace.history
        return
    # bfloat16 gradients: the product's roundoff depends on the step, beyond the tolerance: skipped, said once.
    changes = [v for _, v in trace.history["hessian/fd_step_change"]]
    assert len(changes) == 2 and min(changes) > 0.01, changes  # 5.6% measured
    assert "hessian/trace" not in trace.history
    assert sum("depend on their step" in str(w.message) for w in record) == 1


def test_forced_finite_differences_match_double_backward_and_never_perturb_training(tmp_path):
    def run(hvp):
        seed_everything(0)
        sharp = SharpnessTracker(every_n_steps=2, max_overhead=None, smallest=True, hvp=hvp, tol=1e-6, plot=False)
        model = TinyClassifier(dropout=0.0)
        quiet_trainer(tmp_path, callbacks=[sharp], max_steps=4).fit(model, classification_loader())
        return sharp.last_metrics, [p.detach().clone() for p in model.parameters()]

    (fd, w_fd), (exact, w_exact) = run("finite_difference"), run("double_backward")
    assert all(torch.equal(a, b) for a, b in zip(w_fd, w_exact, strict=True))
    for key in ("sharpness/lambda_max", "sharpness/lambda_min"):
        assert fd[key] == pytest.approx(exact[key], rel=1e-3)


def test_auto_hvp_says_once_which_method_it_chose(tmp_path, caplog):
    sharp = SharpnessTracker(every_n_steps=1, max_overhead=None, plot=False)
    with caplog.at_level("INFO"):
        quiet_trainer(tmp_path, callbacks=[sharp], max_steps=3).fit(TinyClassifier(), classification_loader())
    said = [r.getMessage() for r in caplog.records if "hvp='auto'" in r.getMessage()]
    assert said == ["SharpnessTracker(hvp='auto'): using 'double_backward': exact products."]


@pytest.mark.gpu
def test_fsdp1_measures_on_gpu(tmp_path):
    # FSDP1 (Lightning's FSDPStrategy) needs a GPU. Central differences of its flat parameters' gradients against
    # the unsharded run's exact products. Not in CI (CPU): `pytest -m gpu tests/callbacks/test_curvature_callbacks.py`
    def run(strategy):
        seed_everything(0)
        sharp = SharpnessTracker(every_n_steps=2, max_overhead=None, tol=1e-6, plot=False)
        model = TinyClassifier(dropout=0.0, batchnorm=False)
        quiet_trainer(tmp_path, callbacks=[sharp], max_steps=8, accelerator="cuda", strategy=strategy, devices=1).fit(
            model, classification_loader()
        )
        return sharp.last_metrics["sharpness/lambda_max"]

    assert run("fsdp") == pytest.approx(run("auto"), rel=1e-3)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (HessianTraceMonitor, {"every_n_steps": 0}, "`every_n_steps` must be a positive integer, got 0"),
        (HessianTraceMonitor, {"num_probes": -3}, "`num_probes` must be a positive integer, got -3"),
        (HessianTraceMonitor, {"method": "hutch"}, "`method` must be one of .*, got 'hutch'"),
        (HessianTraceMonitor, {"method": "hutch++", "num_probes": 2}, "`num_probes` must be >= 3"),
        (HessianTraceMonitor, {"batch": "random"}, "`batch` must be one of .*, got 'random'"),
        (HessianTraceMonitor, {"mode": "test"}, "`mode` must be one of .*, got 'test'"),
        (HessianTraceMonitor, {"hvp": "fd"}, "`hvp` must be one of .*, got 'fd'"),
        (SharpnessTracker, {"k": 0}, "`k` must be a positive integer, got 0"),
        (SharpnessTracker, {"every_n_steps": -1}, "`every_n_steps` must be a positive integer, got -1"),
        (SharpnessTracker, {"tol": 0.0}, "`tol` must be a finite number > 0, got 0.0"),
        (HessianTraceMonitor, {"max_overhead": 0}, "`max_overhead` must be a finite number > 0, got 0"),
        (SharpnessTracker, {"max_overhead": -0.1}, "`max_overhead` must be a finite number > 0, got -0.1"),
        (
            SharpnessTracker,
            {"density_every_n_steps": 0},
            "`density_every_n_steps` must be a positive integer",
        ),
        (SharpnessTracker, {"mode": "both"}, "`mode` must be one of .*, got 'both'"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        cls(**kwargs)


def test_bf16_autocast_training_is_measured_in_float32(tmp_path):
    seed_everything(0)
    model = TinyClassifier(dropout=0.0)
    sharp = SharpnessTracker(max_overhead=None, every_n_steps=4, batch="fixed", tol=1e-6, max_iter=200)
    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=4, num_probes=8, batch="fixed", method="hutchinson")
    quiet_trainer(tmp_path, callbacks=[sharp, trace], max_steps=4, precision="bf16-mixed").fit(
        model, classification_loader()
    )
    # The same weights measured in float64 without autocast: bf16 would be off by ~1e-2 relative.
    H = exact_hessian(model.double(), _first_batch())
    assert sharp.last_metrics["sharpness/lambda_max"] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-4)
    # The trace: the same 8 probes (seeded by seed 0, step 4, rank 0) through a float32 operator built here on the
    # same weights, outside autocast. Under bf16 the products would be off by ~1e-2 relative.
    model.float()
    x, y = next(iter(classification_loader()))
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), hvp="double_backward")
    gen = torch.Generator().manual_seed(hash((0, 4, 0)) & 0x7FFF_FFFF)
    fp32 = hutchinson_trace(op, 8, generator=gen)
    assert trace.last_metrics["hessian/trace"] == pytest.approx(fp32.value, rel=1e-5)
    assert trace.last_metrics["hessian/trace_stderr"] == pytest.approx(fp32.stderr, rel=1e-4)
    assert abs(fp32.value - torch.trace(H).item()) < 4 * fp32.stderr  # and it estimates the float64 trace


def test_max_overhead_skips_checks_and_keeps_its_accounting_in_the_checkpoint(tmp_path):
    # A budget no check fits (the other callbacks' measuring counts as training time for this one, so a looser
    # budget would let a load-dependent number of checks through): the first check runs, every later one is skipped.
    budget = HessianTraceMonitor(every_n_steps=1, num_probes=60, max_overhead=1e-6)
    exact = HessianTraceMonitor(every_n_steps=1, num_probes=60, max_overhead=None, method="hutch++")
    # Checks every 2 steps, densities every 3: a density is drawn at the first check past each multiple of 3.
    sharp = SharpnessTracker(every_n_steps=2, density_every_n_steps=3, max_overhead=None, max_iter=20)
    trainer = quiet_trainer(tmp_path, callbacks=[budget, exact, sharp], max_steps=12)
    trainer.fit(TinyClassifier(), classification_loader())
    assert [s for s, _ in budget.history["hessian/trace"]] == [1]
    assert budget.skipped_checks == 11
    assert [s for s, _ in exact.history["hessian/trace"]] == list(range(1, 13))
    densities = sorted(int(p.stem.rsplit("step", 1)[1]) for p in tmp_path.glob("spectral_density_step*.png"))
    assert densities == [4, 6, 10, 12]
    state = budget.state_dict()
    assert 0 < state["spent_s"] < state["elapsed_s"]
    restored = HessianTraceMonitor(every_n_steps=1, num_probes=60, max_overhead=1e-6)
    restored.load_state_dict(state)
    assert restored._budget.spent_s == state["spent_s"] and restored._budget.elapsed_s() >= state["elapsed_s"]
    assert restored._budget.over(trainer)  # still over budget right after the resume, as before the stop


def test_sharpness_plot_uses_a_log_axis_when_lambda_max_is_far_below_the_threshold():
    from lightning_gd.callbacks.sharpness_tracker import _wide_range_scale
    from lightning_gd.utils.plotting import new_figure

    cases = [([19.9, 18.6, 800.0, 6700.0], "log"), ([-0.5, 19.9, 800.0], "symlog"), ([30.0, 38.0, 40.0], "linear")]
    for values, scale in cases:
        _, ax = new_figure()
        _wide_range_scale(ax, values)
        assert ax.get_yscale() == scale, values


def test_top_k_of_lightnings_boring_model_finds_both_copies_of_each_eigenvalue(tmp_path):
    # Lightning's own BoringModel: Linear(32, 2) with an MSE against ones, whose Hessian is two identical blocks
    # (every eigenvalue twice). Single-vector Lanczos reported eig_2 33% off; the block of k = 3 finds the pair.
    from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
    from torch.utils.data import DataLoader

    seed_everything(0)
    model = BoringModel()
    sharp = SharpnessTracker(max_overhead=None, every_n_steps=4, k=3, batch="fixed", plot=False)
    loader = DataLoader(RandomDataset(32, 64), batch_size=16)
    quiet_trainer(tmp_path, callbacks=[sharp], max_steps=8).fit(model, loader)
    x = sharp._fixed[0].double()
    layer = model.layer.double()

    def loss(flat):
        w, b = flat[:64].view(2, 32), flat[64:]
        out = x @ w.T + b
        return F.mse_loss(out, torch.ones_like(out))

    flat = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])
    eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).flip(0)
    assert eig[0].item() == pytest.approx(eig[1].item(), rel=1e-12)
    m = sharp.last_metrics
    got = [m["sharpness/lambda_max"], m["sharpness/eig_2"], m["sharpness/eig_3"]]
    assert got == pytest.approx(eig[:3].tolist(), rel=1e-3)  # tol=1e-2 (default): Ritz errors ~ tol^2
    assert sharp._init["max"].shape == (66, 3)  # the next check starts from all three eigenvectors


def test_the_threshold_is_visible_with_a_single_check(tmp_path):
    # One check gave one point and an invisible one-point threshold "line": now a full-width line, a marker and the
    # value in the legend, and the point's ratio printed beside it.
    sharp = SharpnessTracker(every_n_steps=4, max_overhead=None)
    quiet_trainer(tmp_path, callbacks=[sharp], max_steps=4).fit(TinyClassifier(), classification_loader())
    assert sharp.plot_path == str(tmp_path / "sharpness.png") and os.path.isfile(sharp.plot_path)
    ax = sharp._sharpness_figure().axes[0]
    threshold = sharp.last_metrics["sharpness/threshold"]
    full_width = [ln for ln in ax.lines if list(ln.get_ydata()) == [threshold, threshold]]
    assert full_width and list(full_width[0].get_xdata()) == [0, 1]  # axhline: axes coordinates, edge to edge
    marked = [ln for ln in ax.lines if ln.get_marker() == "_" and list(ln.get_ydata()) == [threshold]]
    assert marked and f"last: {threshold:.4g}" in marked[0].get_label()
    assert any("of the threshold" in t.get_text() for t in ax.texts)
