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

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_gd.cli import LightningGDCLI, _resolve_config_names
from lightning_gd.recipes.registry import recipe_path

__all__ = ["ResumeResult", "check_exact_resume", "compare_runs", "run_fit", "tiny_overrides"]

# Callback states that legitimately differ between two runs: file paths, wall-clock budgets.
_SKIPPED_CALLBACKS = ("ModelCheckpoint", "Timer")
_SKIPPED_KEYS = ("time", "elapsed", "seconds", "clock", "overhead", "dirpath", "path")


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
    if after_validation:
        argv += ["--trainer.callbacks.save_on_train_epoch_end", "false", "--trainer.callbacks.every_n_epochs", "1"]
    else:
        argv += ["--trainer.callbacks.every_n_train_steps", str(every_n)]
    if ckpt_path is not None:
        argv += ["--ckpt_path", ckpt_path]
    cli = LightningGDCLI(args=_resolve_config_names(argv))
    return cli.trainer


def _metrics(trainer: Trainer) -> list[dict[str, str]]:
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
            if key not in ("step", "epoch") and value not in ("", None):
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


def check_exact_resume(
    recipe: str,
    tmp_path: Path,
    steps: int = 3,
    extra: Sequence[str] = (),
    resume_extra: Sequence[str] = (),
    after_validation: bool = True,
) -> ResumeResult:
    """Run ``recipe`` for 2N steps, then again resumed from the step-N checkpoint, and compare (see module doc).

    ``extra`` goes to both runs, ``resume_extra`` to the resumed one only (e.g. another ``num_workers``).
    ``after_validation=False`` resumes from an ``every_n_train_steps`` checkpoint instead (see :func:`run_fit`);
    metrics are then compared from step N + 1. Runs in ``tmp_path`` (recipes write ``runs/`` relative to it).
    """
    args = [*tiny_overrides(recipe, steps, train_windows=6 * steps), *extra]  # the epoch ends between N and 2N
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        trainer_a = run_fit(recipe, args, tmp_path / "a", every_n=steps, after_validation=after_validation)
        metrics_a = _metrics(trainer_a)
        start = tmp_path / "a" / f"step={steps}.ckpt"
        trainer_b = run_fit(
            recipe,
            [*args, *resume_extra],
            tmp_path / "b",
            steps,
            ckpt_path=str(start),
            after_validation=after_validation,
        )
        metrics_b = _metrics(trainer_b)
    finally:
        os.chdir(cwd)
    last = f"step={2 * steps}.ckpt"
    # From an every_n_train_steps checkpoint Lightning skips the validation due at step N, so the callbacks'
    # histories (MetricPlotter's val/loss at step N) differ there; weights, optimizer and later metrics do not.
    return compare_runs(
        tmp_path / "a" / last, tmp_path / "b" / last, metrics_a, metrics_b, after=steps, callbacks=after_validation
    )
