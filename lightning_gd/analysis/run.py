"""``lightning-gd analyze``: a curvature report of a checkpoint, from the engine the curvature callbacks use.

The command takes the same ``--config`` (a recipe name or a YAML path) and overrides as ``lightning-gd fit``, plus
``--ckpt_path`` and ``--analysis.*`` settings. It builds the module and the data module from the config, loads the
checkpoint's weights (and its optimizer state, for Adam's preconditioner), draws the first
``--analysis.num_batches`` batches of the training loader under ``--analysis.seed``, and measures the Hessian of
the mean of the module's own ``training_step`` losses over them (the operator of the curvature callbacks,
averaged over ranks under DDP):

* the top-k and bottom eigenvalues (Lanczos; Golub & Meurant 2010) with their products and true residual norms
  ``||H v - lambda v||``;
* the trace by Hutch++ (Meyer et al. 2021) with a standard error, and each parameter's share;
* the Adam-preconditioned sharpness ``lambda_max(P^-1 H)`` against ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et
  al. 2022) when the checkpoint holds Adam moments;
* the spectral density (stochastic Lanczos quadrature; Ghorbani et al. 2019);
* the loss along the top eigenvector and a filter-normalized random direction, and over the planes of the top two
  eigenvectors and of two random directions (Li et al. 2018; PyHessian, Yao et al. 2020).

Where it writes: ``<run>/analysis/<checkpoint stem>/`` (``report.json``, ``report.md``, the PNGs, TensorBoard events
when the config has a TensorBoard logger, ``eigenvectors.safetensors`` on request), where ``<run>`` is the
checkpoint's run directory when the checkpoint lies in Lightning's ``<run>/checkpoints/`` layout, and otherwise the
run directory the config's logger would create (``trainer.log_dir``; ``default_root_dir`` without a logger). Nothing
else is written, and the checkpoint is only read. ``--compare OTHER.ckpt`` measures both checkpoints on the same
batches and writes ``<run>/analysis/<stem>_vs_<other stem>/`` (the two full reports in ``a_<stem>/`` and
``b_<stem>/``, a side-by-side ``report.md``/``report.json`` and the two densities side by side).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_gd._lightning_cli import LightningGDCLI, StartError
from lightning_gd.analysis.report import report_files, summary_lines, write_comparison, write_report
from lightning_gd.callbacks._curvature import _check_strategy, _memory_plan, _MemoryPlan, _reduce_fn, _reduced_operator
from lightning_gd.callbacks.sharpness_tracker import _adam_update_preconditioner
from lightning_gd.cli import _DEBUG, _resolve_config_names
from lightning_gd.curvature import (
    HvpMethod,
    OperatorMode,
    PreconditionedOperator,
    ReducedOperator,
    hutchinson_trace,
    lanczos,
    spectral_density,
)
from lightning_gd.curvature._wrapper import _OperatorWrapper
from lightning_gd.curvature.landscape import loss_line, loss_plane, random_direction
from lightning_gd.curvature.operator import _unflatten
from lightning_gd.utils.checks import check_positive_int
from lightning_gd.utils.optim_state import adam_moments
from lightning_gd.utils.ranks import finite_on_every_rank
from lightning_gd.utils.rng import seeded_rngs

__all__ = ["AnalysisSettings", "analyze", "main"]

_PROBES_PER_MATMAT = 10  # as HessianTraceMonitor: probes per product call when the budget allows
_MAX_BARS = 40  # per-parameter trace bars drawn; the rest are summed into one "other" bar
# Seeds of the independent random draws, offset from --analysis.seed (ints: Python's str hash is salted per process).
_SEED_TOP, _SEED_BOTTOM, _SEED_TRACE, _SEED_PRE, _SEED_DENSITY, _SEED_DIRECTIONS = range(6)


@dataclass
class AnalysisSettings:
    """What ``lightning-gd analyze`` measures (``--analysis.<name>``).

    Args:
        num_batches: Training batches measured on: the first ``num_batches`` of the training loader's first epoch,
            drawn under ``seed``; the loss is their mean. Under DDP they are split evenly over the ranks (so the
            numbers do not depend on the world size): a multiple of the world size. ``None``: one per rank.
        seed: Seed of the batch draw (global RNGs) and of every random vector (Lanczos starts, probes, directions).
        k: Top eigenvalues (Lanczos).
        bottom_k: Bottom eigenvalues (0: none).
        tol: Relative residual tolerance of Lanczos. Ritz-value errors scale like ``tol**2``: the default 1e-2, as
            ``SharpnessTracker``'s, gives eigenvalues to about 1e-4 relative; the report gives the true residual
            norms.
        max_iter: Most Lanczos products per side.
        trace_probes: Hutch++ products for the trace (>= 3).
        density_runs: Stochastic Lanczos quadrature runs for the spectral density.
        density_steps: Lanczos steps (products) per density run.
        preconditioned: ``"auto"``: also measure the Adam-preconditioned sharpness when the checkpoint's optimizer
            state has Adam moments; ``True``: require them; ``False``: skip it.
        landscape: Evaluate and plot the 1-D and 2-D loss landscapes.
        grid_1d: Points of each 1-D line.
        grid_2d: Points per side of each 2-D grid.
        span: Half-width of the random-direction grids, in units of the filter-normalized direction (Li et al.
            2018 use 1: the whole norm of each filter).
        eigen_span: Half-width of the eigenvector grids, as a distance in parameter space (unit eigenvectors);
            ``None``: ``sqrt(2 * max(loss, 0.1) / lambda_max)``, where the quadratic model doubles the loss.
        save_eigenvectors: Also write the top-k eigenvectors in the parameters' shapes to
            ``eigenvectors.safetensors``.
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"`` (see ``HessianOperator``).
        hvp: ``"auto"``, ``"double_backward"`` or ``"forward_over_reverse"``.
        memory_budget: Bytes for the parameter-sized vectors beyond autograd's own product memory (as the curvature
            callbacks); ``None``: 25% of the device's memory, the smallest over ranks.

    Example::

        # not run: a shell command on a trained checkpoint (tests/analysis runs analyze on one)
        lightning-gd analyze --config quickstart --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt \\
            --analysis.num_batches 2 --analysis.grid_2d 11
    """

    num_batches: int | None = None
    seed: int = 0
    k: int = 5
    bottom_k: int = 1
    tol: float = 1e-2
    max_iter: int = 100
    trace_probes: int = 30
    density_runs: int = 1
    density_steps: int = 30
    preconditioned: bool | Literal["auto"] = "auto"
    landscape: bool = True
    grid_1d: int = 21
    grid_2d: int = 9
    span: float = 1.0
    eigen_span: float | None = None
    save_eigenvectors: bool = False
    mode: OperatorMode = "eval"
    hvp: HvpMethod = "auto"
    memory_budget: int | None = None

    def check(self) -> None:
        """Raise ``MisconfigurationException`` naming the first bad setting and its value."""
        err = MisconfigurationException
        for name in ("k", "max_iter", "density_runs", "density_steps"):
            check_positive_int(f"analysis.{name}", getattr(self, name), error=err)
        if self.num_batches is not None:
            check_positive_int("analysis.num_batches", self.num_batches, error=err)
        check_positive_int("analysis.bottom_k", self.bottom_k, 0, error=err)
        check_positive_int("analysis.trace_probes", self.trace_probes, 3, error=err)
        check_positive_int("analysis.grid_1d", self.grid_1d, 3, error=err)
        check_positive_int("analysis.grid_2d", self.grid_2d, 3, error=err)
        if self.memory_budget is not None:
            check_positive_int("analysis.memory_budget", self.memory_budget, error=err)
        if self.k > self.max_iter or self.bottom_k > self.max_iter:
            raise err(f"`analysis.k`={self.k} and `analysis.bottom_k`={self.bottom_k} must not exceed max_iter")
        for name in ("tol", "span"):
            if not getattr(self, name) > 0:
                raise err(f"`analysis.{name}` must be > 0, got {getattr(self, name)!r}")
        if self.eigen_span is not None and not self.eigen_span > 0:
            raise err(f"`analysis.eigen_span` must be > 0 or null, got {self.eigen_span!r}")


@dataclass
class _Target:
    """One checkpoint to analyse: its path, its contents and where its report goes."""

    path: Path
    checkpoint: dict[str, Any]
    out_dir: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.checkpoint.get("global_step", 0))


class _AnalyzeCLI(LightningGDCLI):
    """The ``fit`` parser (config, trainer, model, data), plus ``--ckpt_path``, ``--compare`` and ``--analysis``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str, required=True, help="The checkpoint to analyse.")
        parser.add_argument("--compare", type=str | None, default=None, help="A second checkpoint, side by side.")
        parser.add_class_arguments(AnalysisSettings, "analysis")


# ---------------------------------------------------------------------------------------------------- entry points
def main(argv: Sequence[str]) -> None:
    """``lightning-gd analyze ARGS``: a mistake in the input (a path, a setting, a mismatched checkpoint) is one line
    (``--debug`` or ``LIGHTNING_GD_DEBUG=1``: the traceback)."""
    args = list(argv)
    debug = "--debug" in args or os.environ.get(_DEBUG, "0").strip().lower() not in ("", "0", "false", "no", "off")
    args = [a for a in args if a != "--debug"]
    try:
        analyze(args, short_errors=not debug)
    except (FileNotFoundError, MisconfigurationException, StartError) as err:
        if debug:
            raise
        print(f"lightning-gd analyze: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def analyze(argv: Sequence[str], short_errors: bool = False) -> dict[str, Any]:
    """Run ``lightning-gd analyze`` with the command-line arguments ``argv``; return the report (on every rank).

    Under ``--trainer.devices N`` (N > 1) the script is re-run for the other ranks by Lightning's launcher, as
    ``lightning-gd fit`` is: call this from a script or the command, with the same ``argv`` in every process.

    Raises:
        FileNotFoundError: naming a checkpoint path that does not exist.
        MisconfigurationException: for a bad setting, a checkpoint that does not match the config's model (naming
            the first mismatched parameter), a sharded strategy, or a memory budget too small for the analysis.
        StartError: with ``short_errors``, a configuration mistake the parser found, in one line.
    """
    argv = list(argv)
    for path in _flag_values(argv, ("--ckpt_path", "--compare")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path} (resolved: {Path(path).resolve()})")
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it also sees the arguments in sys.argv
    try:
        cli = _AnalyzeCLI(
            args=_resolve_config_names(argv), run=False, save_config_callback=None, short_errors=short_errors
        )
    finally:
        sys.argv = saved  # the DDP launcher re-runs the command from sys.argv
    config = cli.config
    settings = AnalysisSettings(**{k: v for k, v in dict(config["analysis"]).items() if not k.startswith("__")})
    settings.check()
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if _check_strategy(trainer.strategy, "lightning-gd analyze") is not None:
        raise MisconfigurationException(
            f"lightning-gd analyze does not support {type(trainer.strategy).__name__}: it shards the parameters. The"
            " training callbacks (SharpnessTracker, HessianTraceMonitor) measure there; analyze a checkpoint under"
            " DDP or DeepSpeed ZeRO stage 1/2."
        )
    if settings.num_batches is None:
        settings.num_batches = trainer.world_size  # one batch per rank
    if settings.num_batches % trainer.world_size:
        raise MisconfigurationException(
            f"`analysis.num_batches`={settings.num_batches} must be a multiple of the world size"
            f" ({trainer.world_size}): every rank measures the same number of batches"
        )
    targets = [_load(config["ckpt_path"])]
    if config.get("compare"):
        targets.append(_load(config["compare"]))
    # As Lightning's fit does before restoring: the strategy may add state to the module (ConAdv's auxiliary
    # BatchNorm), and `configure_model` may build layers.
    trainer.strategy.connect(model)
    model.trainer = trainer
    if is_overridden("configure_model", model, LightningModule):
        model.configure_model()
    for target in targets:
        _check_matches(model, target)
    # Into parameters of the measured dtype ("*-true" precisions, as in training): no rounding through float32.
    trainer.strategy.precision_plugin.convert_module(model)
    _load_weights(model, targets[0])
    batches = _draw_batches(datamodule, model, settings)
    has_tensorboard = any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers)

    def run() -> dict[str, Any]:
        return _run(trainer, model, datamodule, batches, settings, targets, has_tensorboard)

    launcher = trainer.strategy.launcher
    return launcher.launch(run, trainer=trainer) if launcher is not None else run()


# ---------------------------------------------------------------------------------------------------- inputs
def _flag_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """The values given on the command line to ``flags`` (``--flag VALUE`` and ``--flag=VALUE``)."""
    values = []
    for i, arg in enumerate(argv):
        if arg in flags and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif "=" in arg and arg.split("=", 1)[0] in flags:
            values.append(arg.split("=", 1)[1])
    return [v for v in values if v not in ("null", "None", "")]


def _load(path: str) -> _Target:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (resolved: {p.resolve()})")
    if p.is_dir():
        raise MisconfigurationException(
            f"{path} is a directory (a DeepSpeed checkpoint?): convert it to one file first with"
            " lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict"
        )
    checkpoint = torch.load(p, map_location="cpu", weights_only=False)  # read only: the file is never written
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise MisconfigurationException(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return _Target(p, checkpoint)


def _check_matches(model: LightningModule, target: _Target) -> None:
    """Refuse a checkpoint of another model, naming the first parameter or buffer that differs."""
    model.on_load_checkpoint(target.checkpoint)  # the module's own hook may rename or convert entries
    ours, theirs = model.state_dict(), target.checkpoint["state_dict"]
    for name, tensor in ours.items():
        if name not in theirs:
            problem = "is missing from the checkpoint"
        elif tuple(theirs[name].shape) != tuple(tensor.shape):
            problem = f"has shape {tuple(theirs[name].shape)} in the checkpoint and {tuple(tensor.shape)} in the model"
        else:
            continue
        raise MisconfigurationException(
            f"the checkpoint {target.path} does not match the config's model ({type(model).__name__}): the first"
            f" mismatched parameter, {name!r}, {problem}. Pass the config (and overrides) the checkpoint was trained"
            " with."
        )
    extra = [name for name in theirs if name not in ours]
    if extra:
        raise MisconfigurationException(
            f"the checkpoint {target.path} does not match the config's model ({type(model).__name__}): the first"
            f" mismatched parameter, {extra[0]!r}, is in the checkpoint but not in the model"
            f" ({len(extra)} such entries). Pass the config (and overrides) the checkpoint was trained with."
        )


def _load_weights(model: LightningModule, target: _Target) -> None:
    with torch.no_grad():
        model.load_state_dict(target.checkpoint["state_dict"], strict=True)
    del target.checkpoint["state_dict"]  # in the model now: no second copy (0.5 GB at llama-125m)


def _draw_batches(datamodule: LightningDataModule | None, model: LightningModule, settings: AnalysisSettings) -> list:
    """The first ``num_batches`` batches of the training loader's first epoch, drawn under ``settings.seed``.

    Drawn in every process before the processes join (no trainer is attached to the data module), so every rank
    holds the same global sequence and the split over ranks does not depend on the world size.
    """
    owner: Any = datamodule if datamodule is not None else model
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
    loader = owner.train_dataloader()
    batches = []
    with seeded_rngs(settings.seed):
        iterator = iter(loader)
        for _ in range(settings.num_batches):
            try:
                batches.append(next(iterator))
            except StopIteration:
                break
        del iterator
    if len(batches) < settings.num_batches:
        raise MisconfigurationException(
            f"`analysis.num_batches`={settings.num_batches}, but the training loader has only {len(batches)} batches"
        )
    return batches


def _batch_hook(name: str, datamodule: LightningDataModule | None, model: LightningModule) -> Callable:
    # As Lightning: the data module's hook when it overrides it, else the module's.
    if datamodule is not None and is_overridden(name, datamodule, LightningDataModule):
        return getattr(datamodule, name)
    return getattr(model, name)


def _to_device(batch: Any, trainer: Trainer, datamodule: LightningDataModule | None, model: LightningModule) -> Any:
    """The batch as the training step sees it: the transfer hooks, the device, the precision's input dtype."""
    batch = _batch_hook("on_before_batch_transfer", datamodule, model)(batch, 0)
    batch = move_data_to_device(batch, trainer.strategy.root_device)
    batch = _batch_hook("on_after_batch_transfer", datamodule, model)(batch, 0)
    return trainer.strategy.precision_plugin.convert_input(batch)  # e.g. float64 inputs under 64-true


def _restore_optimizers(model: LightningModule, checkpoint: dict[str, Any]) -> tuple[list[Any], str | None]:
    """The module's optimizers with the checkpoint's states, or ``([], why not)``."""
    states = checkpoint.get("optimizer_states") or []
    if not states:
        return [], "the checkpoint holds no optimizer state"
    trainer = model.trainer
    if trainer.max_steps != -1 and trainer.max_epochs is None:
        trainer.fit_loop.max_epochs = -1  # as fit does, so estimated_stepping_batches needs no data
    try:
        optimizers = _optimizers(model.configure_optimizers())
        if len(optimizers) != len(states):
            return [], f"configure_optimizers returned {len(optimizers)} optimizers, the checkpoint holds {len(states)}"
        for optimizer, state in zip(optimizers, states, strict=True):
            optimizer.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - any failure only means "no preconditioned sharpness", said in the report
        return [], f"could not rebuild the optimizer ({type(err).__name__}: {err})"
    return optimizers, None


def _optimizers(conf: Any) -> list[torch.optim.Optimizer]:
    """The optimizers in any of ``configure_optimizers``' return forms, in order."""
    if isinstance(conf, torch.optim.Optimizer):
        return [conf]
    if isinstance(conf, dict):
        return _optimizers(conf.get("optimizer"))
    if isinstance(conf, list | tuple):
        if len(conf) == 2 and isinstance(conf[0], list | tuple) and not isinstance(conf[1], torch.optim.Optimizer):
            return _optimizers(conf[0])  # ([optimizers], [schedulers])
        return [o for item in conf for o in _optimizers(item)]
    return []


# ---------------------------------------------------------------------------------------------------- the run
def _run(
    trainer: Trainer,
    model: LightningModule,
    datamodule: LightningDataModule | None,
    batches: list,
    settings: AnalysisSettings,
    targets: list[_Target],
    has_tensorboard: bool,
) -> dict[str, Any]:
    strategy = trainer.strategy
    strategy.setup_environment()  # the process group under DDP; the device
    model.to(strategy.root_device)
    world, rank = trainer.world_size, trainer.global_rank
    per_rank = len(batches) // world
    mine = batches[rank * per_rank : (rank + 1) * per_rank]
    mine = [_to_device(b, trainer, datamodule, model) for b in mine]
    plan = _memory_plan(trainer, model, settings.memory_budget)
    if plan is None:
        raise MisconfigurationException("lightning-gd analyze: the model has no trainable parameters")
    budget = _fit_budget(plan, settings, with_preconditioner=settings.preconditioned is not False)
    run = Path(_run_dir(trainer, targets[0].path))
    if len(targets) == 1:
        targets[0].out_dir = run / "analysis" / targets[0].path.stem
    else:
        a, b = targets
        compare_dir = run / "analysis" / f"{a.path.stem}_vs_{b.path.stem}"
        a.out_dir, b.out_dir = compare_dir / f"a_{a.path.stem}", compare_dir / f"b_{b.path.stem}"
    described = _describe_batches(batches, settings, world)
    for i, target in enumerate(targets):
        if i:
            _load_weights(model, target)
        target.report = _measure(trainer, model, mine, settings, budget, target, described)
        target.report["files"] = report_files(target.report)
        if trainer.is_global_zero:
            _write_report(trainer, target, has_tensorboard)
    if len(targets) == 2 and trainer.is_global_zero:
        _write_comparison(targets, compare_dir)
    strategy.barrier()
    return targets[0].report if len(targets) == 1 else {"a": targets[0].report, "b": targets[1].report}


def _run_dir(trainer: Trainer, ckpt: Path) -> str:
    """The checkpoint's run directory in Lightning's ``<run>/checkpoints/`` layout, else the logger's (every rank)."""
    resolved = ckpt.resolve()
    fallback = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: called on every rank
    if resolved.parent.name == "checkpoints":
        return str(resolved.parent.parent)
    return str(Path(fallback).resolve())


@dataclass(frozen=True)
class _Budget:
    """Vector counts of each phase, from the memory plan (``None``: unbounded)."""

    max_basis: int | None
    pre_basis: int | None
    probes_per_matmat: int


def _fit_budget(plan: _MemoryPlan, s: AnalysisSettings, with_preconditioner: bool) -> _Budget:
    """Size each phase to the budget as ``SharpnessTracker`` and ``HessianTraceMonitor`` do; raise their error when
    one phase cannot fit."""
    owner = f"lightning-gd analyze (k={s.k}, bottom_k={s.bottom_k}, trace_probes={s.trace_probes})"
    k = max(s.k, s.bottom_k)
    sketch = 3 * (s.trace_probes // 3) + 2
    needs = [
        (4 * k + 1, f"block Lanczos (k={k}: a basis of 2k + 1, the block's k products and k Ritz vectors)"),
        (sketch + 4, "Hutch++ (its sketch and one probe)"),
        (4, "the loss landscape (the parameters' copy, two directions and one point)"),
    ]
    if with_preconditioner:
        needs.append((9, "the preconditioned Lanczos (a basis of 3, its product, a Ritz vector and 4 for Adam's P)"))
    for needed, what in needs:
        if plan.vectors < needed:
            raise plan.too_small(owner, needed, what)
    basis = plan.vectors - 2 * k  # the block's k products (one is the residual) and the k Ritz vectors
    pre_basis = plan.vectors - 2 - 4
    return _Budget(
        max_basis=None if basis >= max(s.max_iter + k - 1, s.density_steps) else basis,
        pre_basis=None if pre_basis >= s.max_iter else pre_basis,
        probes_per_matmat=min(_PROBES_PER_MATMAT, s.trace_probes, (plan.vectors - sketch) // 4),
    )


def _describe_batches(batches: list, settings: AnalysisSettings, world: int) -> dict[str, Any]:
    n, samples = len(batches), sum(_batch_size(b) or 0 for b in batches)
    which = "the first batch" if n == 1 else f"the first {n} batches"
    tag = f"{n} training batch{'es' if n > 1 else ''}, seed {settings.seed}"
    text = (
        f"the Hessian of the mean training_step loss over {which} of the training loader (epoch 0, drawn under"
        f" seed {settings.seed}; {samples} samples"
        + (f"; {n // world} per rank over {world} ranks, products averaged" if world > 1 else "")
        + f"), {settings.mode} mode"
    )
    return {"count": n, "seed": settings.seed, "samples": samples, "world_size": world, "tag": tag,
            "description": text}  # fmt: skip


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, list | tuple) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return None


class _Progress(_OperatorWrapper):
    """Count the products of the wrapped operator into a progress bar (rank zero's; a no-op elsewhere)."""

    def __init__(self, op: Any, bar: Any) -> None:
        super().__init__(op)
        self._bar = bar

    def matvec(self, v: Tensor) -> Tensor:
        out = self._op.matvec(v)
        self._num_matvecs += 1
        self._bar.update(1)
        return out

    def matmat(self, V: Tensor) -> Tensor:
        out = self._op.matmat(V)
        self._num_matvecs += V.shape[1]
        self._bar.update(V.shape[1])
        return out


class _Bar:
    """A tqdm bar over products and landscape points whose total shrinks as phases end early (rank zero only)."""

    def __init__(self, total: int, enabled: bool, tag: str) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="pass", desc=f"analyze ({tag})", dynamic_ncols=True, leave=True)

    def phase(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(name)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def unused(self, n: int) -> None:
        """A phase finished ``n`` passes before its bound: take them off the total."""
        if self._bar is not None and n > 0:
            self._bar.total -= n
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _measure(
    trainer: Trainer,
    model: LightningModule,
    batches: list,
    s: AnalysisSettings,
    budget: _Budget,
    target: _Target,
    described: dict[str, Any],
) -> dict[str, Any]:
    """Every number of one report; the same on every rank (products and losses are averaged over ranks)."""
    op = _reduced_operator(trainer, model, batches, None, s.hvp, s.mode)
    reduce = _reduce_fn(trainer)
    loss_of = lambda: reduce(op.base.loss())  # noqa: E731 - the closure the landscapes evaluate
    loss = loss_of()
    if not finite_on_every_rank(trainer, loss):
        raise MisconfigurationException(
            f"the loss of {target.path} on {described['tag']} is not finite ({loss.item()}): nothing to analyse"
        )
    adam, why_not = _preconditioner(model, target, op, s) if s.preconditioned is not False else (None, "not asked for")
    target.checkpoint.pop("optimizer_states", None)  # read (or not needed): no second copy of the moments
    if s.preconditioned is True and adam is None:
        raise MisconfigurationException(
            f"`analysis.preconditioned`=True needs Adam moments in the checkpoint's optimizer state: {why_not}"
        )
    grid_points = 2 * s.grid_1d + 2 * s.grid_2d**2 if s.landscape else 0
    total = (s.max_iter + s.k) + (s.max_iter + s.bottom_k if s.bottom_k else 0) + s.trace_probes
    total += s.density_runs * s.density_steps + (s.max_iter + 1 if adam else 0) + grid_points
    bar = _Bar(total, trainer.is_global_zero and trainer.progress_bar_callback is not None, described["tag"])
    pop = _Progress(op, bar)
    report: dict[str, Any] = {
        "checkpoint": str(target.path),
        "global_step": target.step,
        "epoch": target.checkpoint.get("epoch"),
        "batches": described,
        "model": type(model).__name__,
        "parameters": op.numel,
        "dtype": str(op.dtype).removeprefix("torch."),
        "device": str(op.device),
        "settings": asdict(s),
        "loss": loss.item(),
        "time_s": {},
        "products": {},
    }
    timer = _Timer(report["time_s"])

    def gen(offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(s.seed * 1000 + offset)

    # ----- eigenvalues
    with timer("top_eigenvalues"):
        bar.phase(f"top {s.k} eigenvalues")
        before = pop.num_matvecs
        report["top"], top_vectors = _extreme(pop, s.k, "largest", s, budget.max_basis, gen(_SEED_TOP), bar)
        report["products"]["top_eigenvalues"] = pop.num_matvecs - before
    if s.bottom_k:
        with timer("bottom_eigenvalues"):
            bar.phase(f"bottom {s.bottom_k} eigenvalue{'s' if s.bottom_k > 1 else ''}")
            before = pop.num_matvecs
            report["bottom"], _ = _extreme(pop, s.bottom_k, "smallest", s, budget.max_basis, gen(_SEED_BOTTOM), bar)
            report["products"]["bottom_eigenvalues"] = pop.num_matvecs - before
    # ----- trace
    with timer("trace"):
        bar.phase("Hutch++ trace")
        before = pop.num_matvecs
        est = hutchinson_trace(pop, s.trace_probes, method="hutch++", generator=gen(_SEED_TRACE), per_param=True,
                               probes_per_matmat=budget.probes_per_matmat)  # fmt: skip
        report["products"]["trace"] = pop.num_matvecs - before
    report["trace"] = {"method": "hutch++", "value": est.value, "stderr": est.stderr, "products": est.num_matvecs,
                       "per_parameter": est.per_param}  # fmt: skip
    # ----- preconditioned sharpness
    report["preconditioned"] = None if adam else {"skipped": why_not}
    if adam:
        with timer("preconditioned"):
            bar.phase("preconditioned sharpness")
            pre_op = PreconditionedOperator(pop, adam["diag"].to(op.device))
            before = pop.num_matvecs
            pre, _ = _extreme(pre_op, 1, "largest", s, budget.pre_basis, gen(_SEED_PRE), bar)
            report["products"]["preconditioned"] = pop.num_matvecs - before
            threshold = adam["threshold"]
            lam = pre["eigenvalues"][0]
            report["preconditioned"] = {
                "lambda_max": lam, "residual_norm": pre["residual_norms"][0], "threshold": threshold,
                "edge_of_stability": lam / threshold, "lr": adam["lr"], "beta1": adam["beta1"],
                "optimizer": adam["optimizer"], "optimizer_step": adam["step"],
                "lanczos_products": pre["lanczos_products"], "residual_products": 1, "converged": pre["converged"],
                "clip_factor": 1.0, "unmoved_fraction": adam["unmoved_fraction"],
            }  # fmt: skip
            del pre_op
        del adam
    # ----- spectral density
    with timer("density"):
        bar.phase("spectral density")
        before = pop.num_matvecs
        density = spectral_density(pop, num_runs=s.density_runs, num_steps=s.density_steps,
                                   generator=gen(_SEED_DENSITY), max_basis=budget.max_basis)  # fmt: skip
        bar.unused(s.density_runs * s.density_steps - density.num_matvecs)
        report["products"]["density"] = pop.num_matvecs - before
    report["density"] = {"grid": _floats(density.grid), "density": _floats(density.density),
                         "nodes": density.nodes.tolist(), "weights": density.weights.tolist(),
                         "products": density.num_matvecs, "runs": s.density_runs, "steps": s.density_steps}  # fmt: skip
    report["products"]["total"] = pop.num_matvecs
    # ----- loss landscapes
    if s.landscape:
        with timer("landscape"):
            report["landscape"] = _landscapes(op, loss_of, reduce, top_vectors, report, s, bar)
    bar.close()
    report["hvp_method"] = op.base.hvp_method
    report["_eigenvectors"] = top_vectors  # for eigenvectors.safetensors; not written to report.json
    report["_param_names"] = list(op.base.param_names)
    report["_param_shapes"] = [list(p.shape) for p in op.base.params]
    return report


def _preconditioner(
    model: LightningModule, target: _Target, op: ReducedOperator, s: AnalysisSettings
) -> tuple[dict[str, Any] | None, str]:
    """Adam's preconditioner from the checkpoint's optimizer state, as ``SharpnessTracker`` builds it (Cohen et al.
    2022; coordinates Adam never moved left out), or ``(None, why not)``. The gradient-clipping factor of the last
    step is not in a checkpoint: c = 1."""
    optimizers, why_not = _restore_optimizers(model, target.checkpoint)
    if not optimizers:
        return None, why_not or "no optimizer"
    moments = adam_moments(optimizers, op.base.params)
    missing = [name for name, m in zip(op.base.param_names, moments, strict=True) if m is None]
    if missing:
        names = ", ".join(type(o).__name__ for o in optimizers)
        shown = ", ".join(repr(n) for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
        return None, f"{len(missing)} of {len(moments)} parameters have no Adam moments in {names}'s state ({shown})"
    diag, threshold, unmoved = _adam_update_preconditioner(moments, clip={})  # no clipping factor in a checkpoint
    first = moments[0]
    used = sorted({type(optimizers[m.optimizer_index]).__name__ for m in moments})
    return {"diag": diag, "threshold": threshold, "lr": first.lr, "beta1": first.beta1, "step": first.step,
            "optimizer": ", ".join(used), "unmoved_fraction": unmoved}, ""  # fmt: skip


def _basis(max_basis: int | None, limit: int) -> int | None:
    return None if max_basis is None else min(max_basis, limit)


def _extreme(
    op: Any, k: int, which: str, s: AnalysisSettings, max_basis: int | None, generator: torch.Generator, bar: _Bar
) -> tuple[dict[str, Any], Tensor]:
    """The ``k`` extreme eigenpairs by (block) Lanczos with their true residual norms ``||A y - theta y||`` (one
    product each), and the eigenvectors in host memory (the device keeps room for the next phases)."""
    result = lanczos(op, k=k, which=which, tol=s.tol, max_iter=s.max_iter, generator=generator,
                     max_basis=_basis(max_basis, s.max_iter + k - 1))  # fmt: skip
    bar.unused(s.max_iter - result.num_matvecs)
    norms = []
    for j in range(k):
        y = result.eigenvectors[:, j]
        r = op.matvec(y).to(y.dtype) - result.eigenvalues[j].item() * y
        norms.append(torch.linalg.vector_norm(r.double()).item())
    summary = {
        "eigenvalues": _floats(result.eigenvalues),
        "residual_norms": norms,
        "lanczos_products": result.num_matvecs,
        "residual_products": k,
        "converged": bool(result.converged),
    }
    return summary, result.eigenvectors.detach().cpu()  # fmt: skip


def _landscapes(
    op: ReducedOperator,
    loss_of: Callable[[], Tensor],
    reduce: Callable[[Tensor], Tensor],
    top_vectors: Tensor,
    report: dict[str, Any],
    s: AnalysisSettings,
    bar: _Bar,
) -> dict[str, Any]:
    """The four loss landscapes; every rank evaluates the same points (losses averaged over ranks)."""
    params = list(op.base.params)
    loss0 = report["loss"]
    lam = report["top"]["eigenvalues"]
    eigen_span = s.eigen_span
    if eigen_span is None:
        eigen_span = math.sqrt(2.0 * max(loss0, 0.1) / lam[0]) if lam[0] > 0 else 1.0
    v1 = _unflatten(top_vectors[:, 0].to(op.device), params)
    gradient = reduce(op.base.gradient())
    slope = torch.dot(gradient.double(), top_vectors[:, 0].to(gradient.device).double()).item()
    del gradient
    gen = torch.Generator().manual_seed(s.seed * 1000 + _SEED_DIRECTIONS)
    r1, r2 = random_direction(params, gen), random_direction(params, gen)
    ts = torch.linspace(-eigen_span, eigen_span, s.grid_1d, dtype=torch.float64)
    alphas = torch.linspace(-s.span, s.span, s.grid_1d, dtype=torch.float64)
    xs2 = torch.linspace(-eigen_span, eigen_span, s.grid_2d, dtype=torch.float64)
    ys2 = torch.linspace(-s.span, s.span, s.grid_2d, dtype=torch.float64)
    counted = lambda _: bar.update(1)  # noqa: E731
    bar.phase("loss along the top eigenvector")
    eigen_1d = loss_line(loss_of, params, v1, ts, counted)
    bar.phase("loss along a random direction")
    random_1d = loss_line(loss_of, params, r1, alphas, counted)
    out: dict[str, Any] = {
        "eigen_span": eigen_span,
        "span": s.span,
        "slope_along_v1": slope,
        "eigen_1d": {"t": _floats(ts), "loss": _floats(eigen_1d)},
        "random_1d": {"alpha": _floats(alphas), "loss": _floats(random_1d)},
        "loss_evaluations": 2 * s.grid_1d,
    }
    if top_vectors.shape[1] >= 2:
        bar.phase("loss over the top two eigenvectors")
        v2 = _unflatten(top_vectors[:, 1].to(op.device), params)
        eigen_2d = loss_plane(loss_of, params, v1, v2, xs2, xs2, counted)
        out["eigen_2d"] = {"x": _floats(xs2), "y": _floats(xs2), "loss": eigen_2d.tolist()}
        out["loss_evaluations"] += s.grid_2d**2
        del v2
    else:
        bar.unused(s.grid_2d**2)
    bar.phase("loss over two random directions")
    random_2d = loss_plane(loss_of, params, r1, r2, ys2, ys2, counted)
    out["random_2d"] = {"x": _floats(ys2), "y": _floats(ys2), "loss": random_2d.tolist()}
    out["loss_evaluations"] += s.grid_2d**2
    return out


class _Timer:
    def __init__(self, into: dict[str, float]) -> None:
        self._into = into

    def __call__(self, name: str) -> _Timer:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._into[self._name] = round(time.perf_counter() - self._start, 3)


def _floats(values: Any) -> list[float]:
    return [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]


# ---------------------------------------------------------------------------------------------------- writing (rank 0)
def _write_report(trainer: Trainer, target: _Target, has_tensorboard: bool) -> None:
    """Write the report into its directory; TensorBoard events go there too when the config has a TensorBoard
    logger (the run's own event files are left alone)."""
    assert target.out_dir is not None
    loggers = trainer.loggers
    trainer.loggers = [TensorBoardLogger(str(target.out_dir), name="", version="")] if has_tensorboard else []
    try:
        write_report(trainer, target.report, target.out_dir, step=target.step)
    finally:
        for logger in trainer.loggers:
            logger.experiment.close()
        trainer.loggers = loggers
    print(f"lightning-gd analyze: {target.path} (step {target.step}), {target.report['batches']['description']}:")
    for line in summary_lines(target.report):
        print(f"  {line}")
    print(f"  wrote {target.out_dir}/ ({', '.join(target.report['files'])})")


def _write_comparison(targets: list[_Target], out_dir: Path) -> None:
    write_comparison([t.report for t in targets], out_dir)
    print(f"lightning-gd analyze: wrote the comparison to {out_dir}/ (report.md, report.json, spectral_density.png)")
