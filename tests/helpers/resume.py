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
import math
import os
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
_SKIPPED_METRICS = ("per_sec", "mfu", "/time", "/batches", "/samples", "/lengths", "flops")


@dataclass
class ResumeResult:
    """What :func:`compare_runs` compared (so a test can assert the comparison was not empty)."""

    tensors_compared: int
    metric_values_compared: int
    callbacks_compared: list[str]


def tiny_overrides(recipe: str, steps: int, train_windows: int | None = None) -> list[str]:
    """Command-line overrides that shrink ``recipe`` to a few seconds on CPU, derived from its YAML.

    Trainer settings apply to every recipe; data and model settings only where the recipe has the key, so a
    recipe added later gets what fits it. ``steps`` is N: validation and the extra checkpoint every N steps.
    """
    config = yaml.safe_load(recipe_path(recipe).read_text(encoding="utf-8")) or {}
    args = [
        "--trainer.max_steps", str(2 * steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.check_val_every_n_epoch", "null",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    data = (config.get("data") or {}).get("init_args") or {}
    small = {"seq_len": 16, "batch_size": 4, "val_windows": 8, "train_windows": train_windows}
    for key, value in small.items():  # a windowed text data module takes all four
        if value is not None and (key in data or "seq_len" in data):
            args += [f"--data.init_args.{key}", str(value)]
    model = (config.get("model") or {}).get("init_args") or {}
    if "overrides" in model:  # CausalLMModule: two layers, and dropout so that the RNG state matters
        args += ["--model.init_args.overrides", '{"n_layer": 2, "dropout": 0.1}']
    return args


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
    recipe: str, tmp_path: Path, steps: int = 3, extra: Sequence[str] = (), after_validation: bool = True
) -> FirstRun:
    """The uninterrupted 2N-step run of ``recipe`` (tiny overrides plus ``extra``), checkpointing at step N.

    ``after_validation=False`` checkpoints with ``every_n_train_steps`` instead (see :func:`run_fit`). Runs
    in ``tmp_path`` (the recipes write ``runs/`` relative to the working directory).
    """
    args = [*tiny_overrides(recipe, steps, train_windows=6 * steps), *extra]  # the epoch ends between N and 2N
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
    recipe: str, tmp_path: Path, steps: int = 3, extra: Sequence[str] = (), after_validation: bool = True
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
