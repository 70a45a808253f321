"""DDP with compressed gradient communication and error-feedback memory, as a Lightning strategy.

Stich et al. 2018, "Sparsified SGD with Memory"; Alistarh et al. 2018, "The Convergence of Sparsified Gradient
Methods"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD"; Alistarh et al. 2017, QSGD;
Lin et al. 2018, "Deep Gradient Compression" (momentum correction); Vogels et al. 2019, PowerSGD.
The math, the accounting and the checkpoint format are :mod:`lightning_gd.compression` (any
:class:`~lightning_gd.compression.HookState`); this module registers the hook with DDP (on CPU/gloo as well as
CUDA/NCCL, where Lightning's own ``ddp_comm_hook`` only works on CUDA), logs the payload every optimizer step
and puts every rank's state into the checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_gd._compat import DDP_HOOK_METHOD, ddp_kwargs
from lightning_gd.compression import COMPRESSORS, CompressorName, HookState, PowerSGDHookState, make_hook_state
from lightning_gd.compression.hook import _DGC_START_DENSITY, WarmupDtype
from lightning_gd.compression.hook_state import _upgrade
from lightning_gd.utils.checks import check_choice
from lightning_gd.utils.logging import log_to_loggers

__all__ = ["CompressedDDPStrategy"]

_CHECKPOINT_KEY = "compressed_ddp"
_LOGGED = ("bytes_sent", "dense_bytes", "ratio", "density", "error_norm")


@contextmanager
def _silenced() -> Iterator[None]:
    """Drop the block's warnings: the refusal's own warning has said it once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _on_rank_zero() -> Iterator[None]:
    """Re-issue the block's warnings on rank zero only: the pure compression layer warns on every rank, and its
    argument and optimizer checks say the same on each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        rank_zero_warn(str(w.message), category=w.category)


class CompressedDDPStrategy(DDPStrategy):
    """DDP whose gradient allreduce is replaced by a compressed exchange with error-feedback memory.

    Registered names (usable once ``lightning_gd.strategies`` is imported): ``ddp_<name>`` for every compressor of
    :data:`~lightning_gd.compression.COMPRESSORS` (``ddp_topk``, ``ddp_randomk``, ``ddp_sign``, ``ddp_qsgd``,
    ``ddp_powersgd``; ``lightning-gd compressors`` lists them), e.g. ``Trainer(strategy="ddp_topk", devices=4)``.

    Every optimizer step it logs (rank zero's view, straight to the loggers) ``compression/bytes_sent`` (the real
    payload this rank contributed), ``compression/dense_bytes`` (what a dense allreduce would send),
    ``compression/ratio``, ``compression/density`` and ``compression/error_norm``. Every rank's memory and the
    compressor state (RNG counters, PowerSGD's Q memories) go into the checkpoint, so a run resumed at step N
    continues as the uninterrupted run would (tested for top-k, sign and PowerSGD), whatever bucket layout DDP
    chooses after the restart. On a larger world size each rank restores the memory saved under its own rank id
    and the new ranks start from zero, with a warning. A resume that would lose memory is refused, naming the
    checkpoint and the way out: a checkpoint past the dense warm-up that holds no memory (another strategy's, or
    the memory removed), or one saved on more ranks than this run has (their memories have no rank to go to);
    ``resume_mismatch="warn"`` continues anyway (zero memory where none is restored) with one warning.

    Which optimizers: with error feedback the sparse compressors match dense SGD; with momentum optimizers the
    residual fights the momentum buffer (a warning says so). For SGD with momentum use ``momentum_correction=m``
    (DGC: the velocity is accumulated locally and compressed, sent coordinates masked) together with
    ``torch.optim.SGD(momentum=0)``; the strategy refuses an optimizer that has its own momentum in that mode.
    Gradient accumulation compresses only on synchronizing steps (DDP's no_sync).

    **DeepSpeed and FSDP users:** this is a DDP strategy (it compresses DDP's gradient buckets), and a Trainer takes
    one strategy, so it cannot be combined with ``DeepSpeedStrategy`` or FSDP. DeepSpeed's own compressed
    communication is ZeRO++, at ZeRO stage 3 only: ``zero_quantized_gradients``, ``zero_quantized_weights`` and
    ``zero_hpz_partition_size`` in ``zero_optimization`` (``DeepSpeedStrategy(config=...)``); at ZeRO-1/2 DeepSpeed
    sends dense gradients, and DeepSpeed 0.19 no longer ships 1-bit Adam/LAMB. A model that fits on one device needs
    no ZeRO: use these ``ddp_*`` strategies for top-k, sign, QSGD or PowerSGD with error feedback.

    Args:
        compressor: A registered compressor name.
        density: Fraction of entries sent by top-k / random-k, in (0, 1] (``None``: the registry's 0.01).
        levels: QSGD quantization levels (``None``: 16).
        error_feedback: Keep the local residual and add it to the next gradient. ``None`` (default) turns it on
            for the contractive compressors (top-k, random-k, sign) and off for QSGD: QSGD is unbiased, and its
            variance at few levels exceeds ``||x||^2``, so a memory diverges (measured: loss 191 vs 0.195 dense
            on the 2-rank test task; 0.1948 without memory). PowerSGD keeps its own.
        momentum_correction: DGC momentum factor in [0, 1) (0: off); top-k and random-k only.
        warmup_steps: Dense steps before compression starts (PowerSGD's ``start_powerSGD_iter``).
        density_warmup_steps: DGC's density warm-up for top-k / random-k: over this many steps after the dense
            ones, the density decays exponentially from ``density_warmup_start`` to ``density`` (DGC: 0.25, 0.063,
            0.015, 0.004, 0.001).
        density_warmup_start: First density of that warm-up (0.25). Values plus int32 indices cost twice a dense
            entry, so 0.25 sends half the dense bytes: on a slow link 0.0625 skips the costliest steps.
        warmup_dtype: ``"bfloat16"`` sends the dense warm-up steps in bfloat16 (half the bytes, as torch's
            ``bf16_compress_hook``); ``"float32"`` (default) sends them as plain DDP does.
        min_numel: Buckets with fewer entries are sent dense (not PowerSGD).
        powersgd_rank: Rank of PowerSGD's approximation (``None``: 1).
        seed: Seed of the shared random-k indices, QSGD's rounding and PowerSGD's initial Q (``None``: 0).
        compressor_options: Any other option of the compressor, by its registry name (e.g. ``{"sampled": True}``:
            top-k's DGC threshold sampling); ``lightning-gd compressors`` lists them.
        resume_mismatch: A checkpoint whose memory cannot be restored: ``"error"`` refuses it, ``"warn"``
            continues with zero memory where none is restored and one warning (``lightning-gd fit
            --resume_mismatch warn`` sets it).
        **kwargs: Passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (e.g. ``find_unused_parameters``,
            ``bucket_cap_mb``, ``process_group_backend``).

    Example::

        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_topk")   # density 0.01
        trainer = Trainer(devices=8, strategy=CompressedDDPStrategy("topk", density=0.001, warmup_steps=500,
                                                                    momentum_correction=0.9))

    Raises:
        MisconfigurationException: for bad arguments (naming the argument and the value; the compression layer
            checks them), and at setup for an accelerator other than CPU/CUDA, an optimizer that does not suit
            the compressor, a checkpoint of another compressor, or a comm hook that did not get registered.
    """

    strategy_name = "ddp_compressed"

    def __init__(
        self,
        compressor: CompressorName = "topk",
        density: float | None = None,
        levels: int | None = None,
        error_feedback: bool | None = None,
        momentum_correction: float = 0.0,
        warmup_steps: int = 0,
        density_warmup_steps: int = 0,
        density_warmup_start: float = _DGC_START_DENSITY,
        warmup_dtype: WarmupDtype = "float32",
        min_numel: int = 0,
        powersgd_rank: int | None = None,
        seed: int | None = None,
        compressor_options: dict[str, Any] | None = None,
        resume_mismatch: Literal["error", "warn"] = "error",
        **kwargs: Any,
    ) -> None:
        for key in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"):
            if kwargs.get(key) is not None:
                raise MisconfigurationException(f"CompressedDDPStrategy sets its own comm hook; drop `{key}`")
        super().__init__(**kwargs)
        self.compressor = compressor
        self.options = {
            "density": density, "levels": levels, "powersgd_rank": powersgd_rank, "seed": seed,
            "error_feedback": error_feedback, "momentum_correction": momentum_correction, "warmup_steps": warmup_steps,
            "density_warmup_steps": density_warmup_steps, "min_numel": min_numel,
            "density_warmup_start": density_warmup_start, "warmup_dtype": warmup_dtype,
        }  # fmt: skip
        for key, value in (compressor_options or {}).items():
            if self.options.get(key) is not None:
                raise MisconfigurationException(f"`{key}` is given twice: as an argument and in `compressor_options`")
            self.options[key] = value
        self.hook_state: HookState = self._new_hook_state()  # checks the arguments now
        self._hook_registered = False
        self._hook_steps_at_setup: int | None = None
        self.resume_mismatch = check_choice(
            "resume_mismatch", resume_mismatch, ("error", "warn"), error=MisconfigurationException
        )

    def _new_hook_state(self) -> HookState:
        try:
            with _on_rank_zero():
                return make_hook_state(self.compressor, **self.options)
        except ValueError as err:
            raise MisconfigurationException(f"CompressedDDPStrategy({self.compressor!r}): {err}") from err

    # ---------------------------------------------------------------- setup
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.hook_state = self._new_hook_state()  # a fresh state per fit; a checkpoint is loaded into it next
        self._hook_registered = False

    @override
    def setup(self, trainer: Trainer) -> None:
        if self.root_device.type not in ("cpu", "cuda"):
            raise MisconfigurationException(
                f"CompressedDDPStrategy runs on CPU (gloo) or CUDA (NCCL), not on {self.root_device.type!r}"
            )
        if self.hook_state.single_bucket_on_gloo and self.root_device.type == "cpu":
            self._single_bucket_on_gloo(trainer)
        super().setup(trainer)
        self._hook_steps_at_setup = self.hook_state.step  # a loaded checkpoint has set it by now
        if trainer.state.fn == TrainerFn.FITTING and not self._hook_registered:
            raise MisconfigurationException(
                "CompressedDDPStrategy: the compression hook was not registered (Lightning did not call the"
                f" strategy's `{DDP_HOOK_METHOD}`; was it renamed in this Lightning version?); training would"
                " silently run as dense DDP"
            )
        for opt in trainer.optimizers:
            try:
                with _on_rank_zero():
                    self.hook_state.check_optimizer(opt.param_groups)
            except ValueError as err:
                raise MisconfigurationException(f"CompressedDDPStrategy({self.compressor!r}): {err}") from err

    def _single_bucket_on_gloo(self, trainer: Trainer) -> None:
        """The hook issues collectives from future callbacks, which gloo may run in a different order on
        different ranks once there are several buckets (a collective mismatch, then SIGABRT): one bucket."""
        model_mb = sum(p.numel() * p.element_size() for p in trainer.lightning_module.parameters()) / 2**20
        wanted = model_mb + 1.0
        kwargs = ddp_kwargs(self)
        current = kwargs.get("bucket_cap_mb")
        if current is not None and current < wanted:
            rank_zero_warn(
                f"CompressedDDPStrategy({self.compressor}) on CPU/gloo: `bucket_cap_mb`={current} would split the"
                f" model into several buckets, which this hook cannot order on gloo; using {wanted:.1f}"
            )
        if current is None or current < wanted:
            kwargs["bucket_cap_mb"] = wanted

    @override
    def _register_ddp_hooks(self) -> None:
        # Lightning registers comm hooks on CUDA only; DDP's hooks work with gloo too.
        assert isinstance(self.model, DistributedDataParallel)
        self.hook_state.register(self.model)
        self._hook_registered = True

    # ---------------------------------------------------------------- logging
    def density_at(self, step: int) -> float | None:
        """Density of a compressed bucket at hook step ``step`` (see :meth:`HookState.density_at`)."""
        return self.hook_state.density_at(step)

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        module = self.lightning_module
        # Once, at the first step with gradients (the backward ran in the closure, or before this call with manual
        # optimization): DDP must have called the hook by then.
        if self._hook_steps_at_setup is not None and any(p.grad is not None for p in module.parameters()):
            if self.hook_state.step == self._hook_steps_at_setup:
                raise RuntimeError(
                    "CompressedDDPStrategy: a backward pass synchronised the gradients without calling the"
                    " compression hook; training would silently run as dense DDP"
                )
            self._hook_steps_at_setup = None
        if stats := self.compression_stats():
            log_to_loggers(module.trainer, {f"compression/{k}": stats.get(k, float("nan")) for k in _LOGGED})
        return out

    def compression_stats(self) -> dict[str, float]:
        """This rank's accounting of the last step: bytes_sent, dense_bytes, ratio, density, error_norm."""
        return self.hook_state.stats()

    # ---------------------------------------------------------------- checkpointing
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any = None) -> None:
        # Called on every rank (the file is written by rank zero): gather every rank's state first.
        checkpoint[_CHECKPOINT_KEY] = self.hook_state.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = checkpoint.get(_CHECKPOINT_KEY)
        problem = self._lost_memory(saved, int(checkpoint.get("global_step", 0)))
        if problem is not None:
            if self.resume_mismatch == "error":
                raise MisconfigurationException(
                    f"CompressedDDPStrategy({self.compressor!r}): {checkpoint_path} {problem}, so the resumed run"
                    " would not continue as the stopped one. Resume it on the world size and strategy that saved it,"
                    " or pass resume_mismatch='warn' (`lightning-gd fit --resume_mismatch warn`) to continue with"
                    " zero memory where none is restored."
                )
            rank_zero_warn(
                f"CompressedDDPStrategy({self.compressor!r}): {checkpoint_path} {problem}: continuing with zero memory"
                " where none is restored (resume_mismatch='warn'); the run departs from the stopped one."
            )
        if saved is not None:
            try:
                with warnings.catch_warnings() if problem is None else _silenced(), _on_rank_zero():
                    self.hook_state.load_state_dict(saved)
            except ValueError as err:
                raise MisconfigurationException(f"{checkpoint_path}: {err}") from err
        return checkpoint

    def _lost_memory(self, saved: dict[str, Any] | None, global_step: int) -> str | None:
        """Why the memory of the checkpoint cannot be restored whole on this world size (``None``: it can)."""
        state = self.hook_state
        if isinstance(state, PowerSGDHookState):  # its Q and error memories; dense before torch's start iteration
            dense_steps = state.state.start_powerSGD_iter
        elif getattr(state, "error_feedback", False):  # residuals, or DGC's u/v
            dense_steps = state.warmup_steps
        else:
            return None  # no memory to lose (QSGD, error_feedback=False)
        if saved is None:
            if global_step <= dense_steps:  # nothing accumulated yet
                return None
            return (
                f"holds no compression memory at step {global_step}, past the {dense_steps} dense warm-up steps"
                " (saved by another strategy, or the memory was removed)"
            )
        try:
            upgraded = _upgrade(saved)
        except ValueError:
            return None  # refused with its own message when loaded
        ranks = {int(r): v or {} for r, v in upgraded["ranks"].items()}
        dropped = sorted(r for r, v in ranks.items() if r >= self.world_size and v.get("memory"))
        if dropped:
            return (
                f"holds the compression memories of {upgraded['world_size']} ranks and this run has"
                f" {self.world_size}: the memories of ranks {dropped} have no rank to go to"
            )
        empty = sorted(
            r
            for r, v in ranks.items()
            if r < self.world_size and v.get("memory") == {} and int(v.get("step", global_step)) > dense_steps
        )
        if empty:
            return f"holds no compression memory for ranks {empty} at step {global_step} (it was removed)"
        return None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, entry in COMPRESSORS.items():
            strategy_registry.register(
                f"ddp_{name}", cls, description=f"DDP sending {entry.description}", override=True, compressor=name
            )


CompressedDDPStrategy.register_strategies(StrategyRegistry)
