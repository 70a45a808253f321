"""Resume harness: run a built-in recipe for 2N steps, run it again resumed from step N, compare after step N.

Both runs go through the real command line (:class:`~lightning_gd.cli.LightningGDCLI` with the same
``--config NAME`` resolution as ``lightning-gd``), shrunk by overrides so that a recipe trains in seconds on
CPU. An extra ``ModelCheckpoint`` saves every N steps; the comparison asserts bit-identical weights,
optimizer and LR-scheduler state, callback state, and logged metrics after step N.

Example::

    result = check_exact_resume("quickstart", tmp_path, steps=4)
    assert result.tensors_compared > 0
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_gd.cli import LightningGDCLI, _resolve_config_names
from lightning_gd.recipes.registry import recipe_path

__all__ = [
    "FirstRun",
    "ResumeResult",
    "check_exact_resume",
    "compare_runs",
    "first_run",
    "resume_and_compare",
    "run_fit",
    "tiny_overrides",
]

# Callback states that legitimately differ between two runs: file paths, wall-clock budgets.
_SKIPPED_CALLBACKS = ("ModelCheckpoint", "Timer")
_SKIPPED_KEYS = ("time", "elapsed", "seconds", "clock", "overhead", "dirpath", "path")
# Logged metrics that measure the machine, not the training: ThroughputMonitor's rates and its running counters
# (Lightning's ThroughputMonitor keeps no checkpoint state, so its counters restart with the resumed process).
_SKIPPED_METRICS = ("per_sec", "mfu", "/time", "/batches", "/samples", "/lengths", "flops", "_ms")


@dataclass
class ResumeResult:
    """What :func:`compare_runs` compared (so a test can assert the comparison was not empty)."""

    tensors_compared: int
    metric_values_compared: int
    callbacks_compared: list[str]


# Tiny settings by class (the last part of a recipe's class_path), so that a recipe added later with a known
# model or data class is shrunk automatically. "{work}" is the run's working directory.
_TINY_DATA: dict[str, dict[str, Any]] = {
    # 16 windows of batch 4: an epoch is 4 steps on one rank and 2 on two ranks.
    "TextCorpusDataModule": {"seq_len": 16, "batch_size": 4, "train_windows": 16, "val_windows": 8, "num_workers": 0},
    "TokenStreamDataModule": {"seq_len": 16, "batch_size": 4, "num_workers": 0, "train_dir": "{work}/tokens/train",
                              "val_dir": "{work}/tokens/val"},
    "DigitsDataModule": {"image_size": 8, "batch_size": 16, "num_workers": 0},
    # The generated tiny ImageFolder has 12 training images: 6 batches, 3 optimizer steps of 2 micro-batches.
    "ImageFolderDataModule": {"data_dir": "{work}/images", "generate_tiny": True, "image_size": 16, "batch_size": 2,
                              "num_workers": 0, "pin_memory": False, "persistent_workers": False},
}  # fmt: skip
_TINY_MODEL: dict[str, dict[str, Any]] = {
    # Two layers, and dropout so that the RNG state matters.
    "CausalLMModule": {"preset": "tiny", "overrides": {"n_layer": 2, "dropout": 0.1}, "compile": False,
                       "activation_checkpointing": False},
    "ImageClassifierModule": {"model_name": "resnet10t", "channels_last": False},
}  # fmt: skip


def _class_name(section: Any) -> str:
    return str((section or {}).get("class_path", "")).rsplit(".", 1)[-1] if isinstance(section, dict) else ""


def tiny_overrides(recipe: str, steps: int, work: Path | None = None) -> list[str]:
    """Command-line overrides that shrink ``recipe`` to a few seconds on one CPU process.

    Trainer settings apply to every recipe; model and data settings by class (``_TINY_MODEL``,
    ``_TINY_DATA``). ``steps`` is N: validation every N steps, 2N steps in all. A TokenStreamDataModule gets
    a small token dataset prepared under ``work`` (``lightning-gd prepare-text`` on a few stdlib modules).
    """
    config = yaml.safe_load(recipe_path(recipe).read_text(encoding="utf-8")) or {}
    args = [
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.precision", "32-true",
        "--trainer.max_steps", str(2 * steps),
        "--trainer.max_epochs", "-1",
        "--trainer.check_val_every_n_epoch", "null",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    accumulate = 2 if int((config.get("trainer") or {}).get("accumulate_grad_batches") or 1) > 1 else 1
    # The GPU recipes accumulate 16-128 micro-batches per step: 2 keep accumulation across the resume in play.
    args += ["--trainer.accumulate_grad_batches", str(accumulate)]
    # Lightning counts val_check_interval in micro-batches: validate (and so checkpoint) every N optimizer steps.
    args += ["--trainer.val_check_interval", str(steps * accumulate)]
    strategy = (config.get("trainer") or {}).get("strategy")
    if isinstance(strategy, str) and strategy not in ("auto", "ddp_topk"):  # plain multi-device names: one process
        args += ["--trainer.strategy", "auto"]
    work = Path(os.getcwd()) if work is None else work
    data_class = _class_name(config.get("data"))
    for key, value in _TINY_DATA.get(data_class, {}).items():
        value = value.replace("{work}", str(work)) if isinstance(value, str) else value
        args += [f"--data.init_args.{key}", json.dumps(value) if not isinstance(value, str) else value]
    if data_class == "TokenStreamDataModule":
        _prepare_tokens(work / "tokens")
    for key, value in _TINY_MODEL.get(_class_name(config.get("model")), {}).items():
        args += [f"--model.init_args.{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


def _prepare_tokens(out: Path) -> None:
    if (out / "train").is_dir():
        return
    from lightning_gd.recipes.prepare_text import prepare_text

    src = Path(sysconfig.get_paths()["stdlib"])
    files = [str(src / name) for name in ("textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py")]
    prepare_text(files, out, None, "**/*.py", 0.4, 1)


def run_fit(
    recipe: str,
    args: Sequence[str],
    ckpt_dir: Path,
    every_n: int,
    ckpt_path: str | None = None,
    after_validation: bool = True,
) -> Trainer:
    """``lightning-gd fit --config recipe ARGS`` plus a ModelCheckpoint writing ``step=<S>.ckpt`` files.

    ``after_validation``: one checkpoint after every validation run (like the recipes' ``last.ckpt``);
    otherwise every ``every_n`` training steps, as the issue's command does (``every_n_train_steps``: saved
    before that step's validation, which Lightning then does not run again on resume).
    """
    argv = ["fit", "--config", recipe, *args]
    argv += [
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(ckpt_dir),
        "--trainer.callbacks.filename", "{step}",
        "--trainer.callbacks.save_top_k", "-1",
    ]  # fmt: skip
    if after_validation:  # monitor="step": a state key of its own beside a recipe's ModelCheckpoint
        argv += ["--trainer.callbacks.save_on_train_epoch_end", "false", "--trainer.callbacks.every_n_epochs", "1"]
        argv += ["--trainer.callbacks.monitor", "step", "--trainer.callbacks.mode", "max"]
    else:
        argv += ["--trainer.callbacks.every_n_train_steps", str(every_n)]
    if ckpt_path is not None:
        argv += ["--ckpt_path", ckpt_path]
    cli = _TinyCLI(args=_resolve_config_names(argv))
    return cli.trainer


class _TinyCLI(LightningGDCLI):
    """The ``lightning-gd`` CLI, with end-of-fit text generation (``TextSampler``) cut to a few tokens."""

    def before_fit(self) -> None:
        super().before_fit()
        for callback in self.trainer.callbacks:
            if hasattr(callback, "max_new_tokens"):
                callback.max_new_tokens = min(callback.max_new_tokens, 8)


def _metrics(trainer: Trainer) -> list[dict[str, str]]:
    if not trainer.is_global_zero:  # only rank zero writes metrics.csv
        return []
    loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    assert loggers, "the recipe has no CSVLogger: logged metrics cannot be compared"
    with open(os.path.join(loggers[0].log_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _values_after(rows: list[dict[str, str]], step: int) -> dict[tuple[int, str], float]:
    out: dict[tuple[int, str], float] = {}
    for row in rows:
        s = int(row["step"])
        if s < step:
            continue
        for key, value in row.items():
            skipped = key in ("step", "epoch") or any(word in key for word in _SKIPPED_METRICS)
            if not skipped and value not in ("", None):
                out[(s, key)] = float(value)
    return out


def _assert_same(a: Any, b: Any, where: str) -> int:
    """Recursive bit-identity; returns the number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        diff = (a.double() - b.double()).abs().max().item() if a.numel() and a.is_floating_point() else None
        assert torch.equal(a, b), f"{where} differs (max abs diff {diff})"
        return 1
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        return sum(_assert_same(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        return sum(_assert_same(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
        return 0
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


def _callback_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not any(word in str(k).lower() for word in _SKIPPED_KEYS)}


def compare_runs(
    ckpt_a: Path,
    ckpt_b: Path,
    metrics_a: list[dict[str, str]],
    metrics_b: list[dict[str, str]],
    after: int,
    callbacks: bool = True,
) -> ResumeResult:
    """Assert two final checkpoints (and their callbacks' states) and the metrics logged after step ``after``
    are bit-identical."""
    a = torch.load(ckpt_a, map_location="cpu", weights_only=False)
    b = torch.load(ckpt_b, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"], (a["global_step"], b["global_step"])
    n = _assert_same(a["state_dict"], b["state_dict"], "weights")
    n += _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer state")
    n += _assert_same(a.get("lr_schedulers"), b.get("lr_schedulers"), "lr scheduler state")
    names = []
    for key, state in a.get("callbacks", {}).items() if callbacks else ():
        if any(key.startswith(skip) for skip in _SKIPPED_CALLBACKS):
            continue
        assert key in b["callbacks"], f"callback {key} has no state in the resumed run's checkpoint"
        _assert_same(_callback_state(state), _callback_state(b["callbacks"][key]), f"callback {key}")
        names.append(key)
    loop_a = a["loops"]["fit_loop"]["state_dict"].get("combined_loader")
    loop_b = b["loops"]["fit_loop"]["state_dict"].get("combined_loader")
    assert (loop_a is None) == (loop_b is None), "only one run saved a data-loader position"
    values_a, values_b = _values_after(metrics_a, after + 1), _values_after(metrics_b, after + 1)
    assert values_a, f"no metric logged after step {after}: the comparison would be empty"
    assert values_a.keys() == values_b.keys(), sorted(set(values_a) ^ set(values_b))
    diffs = {k: (values_a[k], values_b[k]) for k in values_a if values_a[k] != values_b[k]}
    assert not diffs, f"logged metrics differ after step {after}: {diffs}"
    return ResumeResult(n, len(values_a), names)


@dataclass
class FirstRun:
    """The uninterrupted run of :func:`first_run`: its arguments, checkpoint directory and logged metrics."""

    recipe: str
    args: list[str]
    steps: int
    ckpt_dir: Path
    metrics: list[dict[str, str]]
    after_validation: bool

    def checkpoint(self, step: int) -> Path:
        return self.ckpt_dir / f"step={step}.ckpt"


def first_run(
    recipe: str, tmp_path: Path, steps: int = 5, extra: Sequence[str] = (), after_validation: bool = True
) -> FirstRun:
    """The uninterrupted 2N-step run of ``recipe`` (tiny overrides plus ``extra``), checkpointing at step N.

    ``after_validation=False`` checkpoints with ``every_n_train_steps`` instead (see :func:`run_fit`). Runs
    in ``tmp_path`` (the recipes write ``runs/`` relative to the working directory).
    """
    # 16 windows of batch 4: an epoch is 4 steps on one rank, 2 steps on two ranks; with N = 5 the step-N
    # checkpoint is mid-epoch after the first epoch in both cases, and the runs cross epoch boundaries.
    args = [*tiny_overrides(recipe, steps, work=tmp_path), *extra]
    with _working_dir(tmp_path):
        trainer = run_fit(recipe, args, tmp_path / "a", steps, after_validation=after_validation)
        return FirstRun(recipe, args, steps, tmp_path / "a", _metrics(trainer), after_validation)


def resume_and_compare(
    first: FirstRun, tmp_path: Path, resume_extra: Sequence[str] = (), name: str = "b"
) -> ResumeResult:
    """Resume ``first`` from its step-N checkpoint (with ``resume_extra``), run to 2N and compare the two."""
    n = first.steps
    with _working_dir(tmp_path):
        trainer = run_fit(
            first.recipe,
            [*first.args, *resume_extra],
            tmp_path / name,
            n,
            ckpt_path=str(first.checkpoint(n)),
            after_validation=first.after_validation,
        )
        metrics = _metrics(trainer)
    if not trainer.is_global_zero:
        return None
    # From an every_n_train_steps checkpoint Lightning skips the validation due at step N, so the callbacks'
    # histories (MetricPlotter's val/loss at step N) differ there; weights, optimizer and later metrics do not.
    return compare_runs(
        first.checkpoint(2 * n),
        tmp_path / name / f"step={2 * n}.ckpt",
        first.metrics,
        metrics,
        after=n,
        callbacks=first.after_validation,
    )


def check_exact_resume(
    recipe: str, tmp_path: Path, steps: int = 5, extra: Sequence[str] = (), after_validation: bool = True
) -> ResumeResult | None:
    """Run ``recipe`` for 2N steps, then again resumed from the step-N checkpoint, and compare (see module doc)."""
    first = first_run(recipe, tmp_path, steps, extra, after_validation)
    return resume_and_compare(first, tmp_path)


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)
