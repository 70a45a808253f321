"""The curvature callbacks' overhead budget says when it skips a check, Literal choices are parsed by the CLI,
and SharpnessTracker picks the stability threshold that matches the optimizer."""

import csv
import textwrap
import warnings

import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from lightning_gd.cli import main
from tests.helpers.models import TinyClassifier, classification_loader
from tests.helpers.trainer import quiet_trainer


def _fit(tmp_path, callbacks, model=None, max_steps=10, **kw):
    seed_everything(0)
    model = model or TinyClassifier(dropout=0.0, batchnorm=False)
    trainer = quiet_trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, **kw)  # every call names its logger
    trainer.fit(model, classification_loader(n=256))
    return trainer, model


@pytest.mark.parametrize("cls", [HessianTraceMonitor, SharpnessTracker])
def test_budget_skips_are_warned_once_and_counted(tmp_path, cls):
    # A budget no check fits: the first check runs (it always does), every later due check is skipped.
    cb = cls(every_n_steps=2, max_overhead=1e-9)
    logger = CSVLogger(str(tmp_path), name="run")
    with pytest.warns(UserWarning, match="skipped the check due at step 4") as record:
        _fit(tmp_path, [cb], max_steps=10, logger=logger)
    skips = [w for w in record if "skipped the check" in str(w.message)]
    assert len(skips) == 1  # once, not at every skip
    message = str(skips[0].message)
    assert "max_overhead=1e-09" in message and "max_overhead=None" in message
    assert "training steps of" in message and "`every_n_steps` >=" in message
    name = cb._name
    assert len(cb.history[f"{name}/skipped_checks"]) == 1  # measured once, at step 2
    assert cb.skipped_checks == 4  # due at 4, 6, 8, 10
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"{name}/skipped_checks")]
    counts = [(int(r["step"]), float(r[f"{name}/skipped_checks"])) for r in rows]
    assert counts == [(2, 0.0), (4, 1.0), (6, 2.0), (8, 3.0), (10, 4.0)]


def test_no_budget_never_skips_nor_warns(tmp_path):
    cb = SharpnessTracker(every_n_steps=2, max_overhead=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, [cb], max_steps=6, logger=False)
    assert not [w for w in record if "skipped the check" in str(w.message)]
    assert cb.skipped_checks == 0
    assert [s for s, _ in cb.history["sharpness/lambda_max"]] == [2, 4, 6]


def test_skipped_count_is_checkpointed():
    cb = HessianTraceMonitor()
    cb.skipped_checks = 7
    restored = HessianTraceMonitor()
    restored.load_state_dict(cb.state_dict())
    assert restored.skipped_checks == 7
    legacy = {k: v for k, v in cb.state_dict().items() if k != "skipped_checks"}  # written before the counter
    restored.load_state_dict(legacy)
    assert restored.skipped_checks == 0


def test_auto_preconditioning_follows_the_optimizer(tmp_path):
    # Adam: "auto" measures exactly what preconditioned=True measures; SGD: exactly the raw sharpness.
    runs = {}
    for optimizer, choice in [("adam", "auto"), ("adam", True), ("sgd", "auto"), ("sgd", False)]:
        cb = SharpnessTracker(every_n_steps=3, max_overhead=None, preconditioned=choice, tol=1e-6)
        seed_everything(0)
        model = TinyClassifier(dropout=0.0, batchnorm=False, optimizer=optimizer, lr=0.01)
        _fit(tmp_path / f"{optimizer}{choice}", [cb], model=model, max_steps=6, logger=False)
        runs[optimizer, choice] = cb.history
    assert "sharpness/preconditioned_lambda_max" in runs["adam", "auto"]
    assert "sharpness/lambda_max" not in runs["adam", "auto"]
    assert runs["adam", "auto"] == runs["adam", True]
    assert "sharpness/lambda_max" in runs["sgd", "auto"]
    assert runs["sgd", "auto"] == runs["sgd", False]
    # The Adam threshold is (2 + 2 beta1) / ((1 - beta1) lr) = 38/lr at beta1 = 0.9, lr = 0.01.
    assert runs["adam", "auto"]["sharpness/threshold"][0][1] == pytest.approx(3800.0)
    assert runs["sgd", "auto"]["sharpness/threshold"][0][1] == pytest.approx(200.0)


def test_auto_choice_survives_a_resume():
    cb = SharpnessTracker()
    cb._preconditioned = True
    restored = SharpnessTracker()
    restored.load_state_dict(cb.state_dict())
    assert restored._preconditioned is True and restored._key == "sharpness/preconditioned_lambda_max"


def test_bad_preconditioned_value():
    with pytest.raises(MisconfigurationException, match="`preconditioned` must be True, False or 'auto', got 'yes'"):
        SharpnessTracker(preconditioned="yes")


@pytest.mark.parametrize(
    ("callback", "key", "value", "choices"),
    [
        ("SharpnessTracker", "hvp", "bogus", ["auto", "double_backward", "forward_over_reverse"]),
        ("HessianTraceMonitor", "batch", "latest", ["current", "fixed"]),
        ("HessianTraceMonitor", "method", "hutch+", ["hutchinson", "hutch++"]),
        ("SharpnessTracker", "mode", "training", ["eval", "train"]),
    ],
)
def test_cli_rejects_a_bad_choice_while_parsing(tmp_path, capsys, callback, key, value, choices):
    config = tmp_path / "bad.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: {callback}
              init_args:
                {key}: {value}
        """)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "quickstart", "--config", str(config), "--print_config"])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert value in err
    for choice in choices:
        assert choice in err, err[-2000:]


def test_literal_choices_still_checked_in_python():
    with pytest.raises(MisconfigurationException, match="`hvp` must be one of .*'bogus'"):
        SharpnessTracker(hvp="bogus")


def test_auto_trace_method_is_xtrace_when_its_sketch_fits_the_memory_budget(tmp_path):
    roomy = HessianTraceMonitor(every_n_steps=2, max_overhead=None)
    numel = sum(p.numel() for p in TinyClassifier(dropout=0.0, batchnorm=False).parameters())
    tight = HessianTraceMonitor(every_n_steps=1, max_overhead=None, memory_budget=20 * numel * 4)  # 20 vectors
    _fit(tmp_path, [roomy, tight], max_steps=2, logger=False)
    assert roomy._method == "xtrace" and roomy.last_metrics["hessian/num_hvps"] == 30
    assert tight._method == "hutchinson" and tight.last_metrics["hessian/num_hvps"] == 30
