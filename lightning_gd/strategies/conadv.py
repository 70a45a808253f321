"""Concurrent adversarial learning (ConAdv) for large-batch training, as a Lightning strategy.

Liu, Chen, Hsieh, You et al. 2022, "Concurrent Adversarial Learning for Large-Batch Training" (ICLR): large
batches generalize worse; adding adversarial examples helps, but computing them doubles the step time. ConAdv
computes the adversarial examples of a batch with stale weights, so that at step ``t`` both gradient
computations use ``theta_t`` and can run at the same time:

* at step ``t`` the loss is ``L(theta_t; clean B_t) + L(theta_t; adv_t)``, the adversarial part through an
  auxiliary BatchNorm (:func:`~lightning_gd.adversarial.auxiliary_bn`);
* ``adv_t`` was generated from ``B_t``'s inputs at ``theta_{t - tau}``; during step ``t`` the attack for
  ``B_{t + tau}`` runs at ``theta_t`` (on a CUDA side stream, overlapping the main forward/backward; in sequence
  on CPU).

The attack is :func:`~lightning_gd.adversarial.sign_attack`; the math lives in :mod:`lightning_gd.adversarial`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_gd._compat import layer_sync
from lightning_gd.adversarial import Normalization, add_auxiliary_bn, auxiliary_bn, sign_attack
from lightning_gd.strategies.lookahead import LookaheadLoader
from lightning_gd.utils.checks import check_number, check_positive_int
from lightning_gd.utils.logging import log_to_loggers
from lightning_gd.utils.ranks import gather_from_ranks

__all__ = ["ConAdvStrategy"]

_CHECKPOINT_KEY = "conadv"


@dataclass
class _Pending:
    """An adversarial batch waiting for its step."""

    index: int  # batch index within the epoch
    epoch: int
    inputs: Tensor  # adversarial inputs (normalized), on the device
    fingerprint: Tensor  # float64 (sum, sum of squares) of the clean inputs it was made from
    made_at_step: int  # trainer.global_step whose weights made it
    source: Any = None  # the device batch it was made from (identity match); None after a restore
    start: Any = None  # CUDA event / perf_counter at launch
    end: Any = None  # CUDA event at the end
    attack_ms: float | None = None


def _fingerprint(inputs: Tensor) -> Tensor:
    flat = inputs.detach().reshape(-1).double()
    return torch.stack([flat.sum(), (flat * flat).sum()])


class ConAdvStrategy(DDPStrategy):
    """DDP with concurrent adversarial learning: adversarial examples from stale weights, at almost no extra time.

    At step ``t`` the loss is the module's own ``training_step`` loss on the clean batch ``B_t`` plus
    ``adv_weight`` times the loss on ``adv_t`` through the auxiliary BatchNorm, where ``adv_t`` was made from
    ``B_t``'s inputs with the weights of step ``t - tau``. During step ``t`` the attack for ``B_{t + tau}`` runs at
    the current weights: on CUDA on a side stream, overlapping the main forward and backward (it only reads the
    parameters; the optimizer step waits for it); on CPU before the clean pass. The attack runs on the unwrapped
    module (no DDP reducer involved), computes only the input gradient (parameter ``.grad`` is never written) and
    uses copies of the BatchNorm statistics (the running statistics are not touched by it).

    The dataloader is read ``tau`` batches ahead through a wrapper that keeps the original order (Lightning's
    ``process_dataloader`` hook; no Trainer internals). Looked-ahead batches are moved to the device once, and the
    loop gets the same device batch later, so ``on_after_batch_transfer`` augmentations are the ones attacked. The
    first ``tau`` batches of each epoch (and any batch whose pending attack does not match it) are attacked at
    the current weights, in sequence: ``conadv/staleness`` logs 0 there.

    Batches are ``(inputs, targets, ...)`` tuples/lists or dicts with ``input_key`` / ``target_key``; ``targets``
    are class labels. Both passes call the module (``module(inputs) -> logits``); the adversarial loss is the
    module's ``conadv_loss(logits, targets)`` when it defines one, else cross entropy with ``label_smoothing``
    (the attack uses ``conadv_loss`` or plain cross entropy). Every BatchNorm layer gets auxiliary statistics
    (:func:`~lightning_gd.adversarial.add_auxiliary_bn`, saved in the ``state_dict``) when the module is connected.

    Logged (rank zero's view, every ``log_every_n_steps`` optimizer steps): ``conadv/clean_loss``,
    ``conadv/adv_loss``, ``conadv/adv_accuracy``, ``conadv/staleness`` (optimizer steps between the weights
    that made the adversarial batch and the current ones) and ``conadv/attack_ms``. The checkpoint holds each
    rank's pending adversarial batches and attack RNG state, and the loader wrapper makes the training dataloader
    resumable mid-epoch, so a resumed run continues as the uninterrupted one.

    **DeepSpeed and FSDP users:** this is a DDP strategy, and a Trainer takes one strategy, so it cannot be combined
    with ``DeepSpeedStrategy`` or FSDP. ConAdv's models (ResNet-50: 25.6M parameters) fit on one device, where ZeRO
    buys nothing: train them with this strategy. With a model that needs ZeRO, the attack itself is plain torch
    (:func:`~lightning_gd.adversarial.sign_attack` and :func:`~lightning_gd.adversarial.auxiliary_bn`): call it in
    your own ``training_step`` for (non-concurrent) adversarial training; that path is not tested under DeepSpeed.

    Args:
        epsilon: L-infinity budget in pixel units (9/255 in the reference, images in [0, 1]).
        step_size: The attack's signed step in pixel units; ``None`` takes ``epsilon`` (the reference).
        tau: Staleness in batches (>= 1): ``adv_t`` comes from the weights of step ``t - tau``.
        targeted: Step towards a random wrong label (the reference) instead of away from the true one.
        random_start: Probability of a uniform random start in the ball, per batch (0.8 in the reference).
        mean: Per-channel mean of the input normalization, in pixel units; ``None``: inputs are pixels.
        std: Per-channel standard deviation of the normalization, in pixel units; ``None``: 1.
        pixel_range: Valid pixel range ``(low, high)``, or ``None`` for unbounded inputs (feature vectors).
        adv_weight: Weight of the adversarial loss (1: equal weights, the reference).
        label_smoothing: Of the default adversarial cross entropy (0.1 in the reference).
        separate_affine: Also give the adversarial BatchNorm its own ``weight`` / ``bias``.
        input_key: Key of the inputs in dict batches.
        target_key: Key of the labels in dict batches.
        concurrent: On CUDA, run the attack on a side stream (``False``: in sequence, for comparisons).
        checkpoint_pending: Save the pending adversarial batches (one per rank per ``tau``) in checkpoints;
            ``False`` keeps checkpoints small and attacks the first ``tau`` batches after a resume afresh.
        seed: Seed of the attack's generator (offset by the global rank).
        **kwargs: Passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``, ...).

    Example::

        trainer = Trainer(accelerator="gpu", devices=8, strategy=ConAdvStrategy(epsilon=9 / 255, tau=1,
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
        trainer = Trainer(accelerator="cpu", devices=1, strategy="conadv")   # registered name, defaults

    Raises:
        MisconfigurationException: for bad arguments (naming the argument and the value), a batch the strategy
            cannot read (naming the expected format), manual optimization, or ``sync_batchnorm=True`` (its
            layer conversion drops the auxiliary statistics).
    """

    strategy_name = "conadv"

    def __init__(
        self,
        epsilon: float = 9 / 255,
        step_size: float | None = None,
        tau: int = 1,
        targeted: bool = True,
        random_start: float = 0.8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pixel_range: tuple[float, float] | None = (0.0, 1.0),
        adv_weight: float = 1.0,
        label_smoothing: float = 0.1,
        separate_affine: bool = False,
        input_key: str = "input",
        target_key: str = "target",
        concurrent: bool = True,
        checkpoint_pending: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        for name, value in (("epsilon", epsilon), ("step_size", step_size), ("adv_weight", adv_weight)):
            if value is not None:
                check_number(name, value, 0, error=MisconfigurationException)
        check_positive_int("tau", tau, error=MisconfigurationException)
        check_number("random_start", random_start, 0, 1, error=MisconfigurationException)
        check_number("label_smoothing", label_smoothing, 0, 1, high_open=True, error=MisconfigurationException)
        try:
            self.normalization = Normalization(mean=mean, std=std, pixel_range=pixel_range)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)
        self.step_size = None if step_size is None else float(step_size)
        self.tau = tau
        self.targeted = targeted
        self.random_start = float(random_start)
        self.adv_weight = float(adv_weight)
        self.label_smoothing = float(label_smoothing)
        self.separate_affine = separate_affine
        self.input_key = input_key
        self.target_key = target_key
        self.concurrent = concurrent
        self.checkpoint_pending = checkpoint_pending
        self.seed = seed
        self._loader: LookaheadLoader | None = None
        self._pending: dict[int, _Pending] = {}
        self._transferred: dict[int, tuple[Any, Any]] = {}  # id(host batch) -> (host batch, device batch)
        self._generator: torch.Generator | None = None
        self._stream: torch.cuda.Stream | None = None
        self._restored: dict[str, Any] | None = None
        self._warned_mismatch = False
        self.last_metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- set-up
    @override
    def connect(self, model: LightningModule) -> None:
        super().connect(model)
        # Before any checkpoint is restored into the module, so the auxiliary statistics load with it.
        add_auxiliary_bn(model, separate_affine=self.separate_affine)

    @override
    def setup(self, trainer: Trainer) -> None:
        if layer_sync(self) is not None:
            raise MisconfigurationException(
                "ConAdvStrategy does not support `sync_batchnorm=True`: the SyncBatchNorm conversion drops the"
                " auxiliary BatchNorm statistics. Use per-device BatchNorm (large per-device batches need no sync)."
            )
        module = self.lightning_module
        assert module is not None
        if not module.automatic_optimization:
            raise MisconfigurationException(
                "ConAdvStrategy adds the adversarial loss to the `training_step` loss and needs automatic"
                " optimization; set `automatic_optimization = True`"
            )
        add_auxiliary_bn(module, separate_affine=self.separate_affine)  # layers built in `configure_model`
        super().setup(trainer)
        device = self.root_device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed + self.global_rank)
        if device.type == "cuda" and self.concurrent:
            self._stream = torch.cuda.Stream(device=device)
        if self._restored is not None:
            self._apply_restored(self._restored)
            self._restored = None

    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        self._loader = LookaheadLoader(dataloader, lambda: trainer.current_epoch)
        return self._loader

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        cached = self._transferred.pop(id(batch), None)
        if cached is not None and cached[0] is batch:
            return cached[1]
        return super().batch_to_device(batch, device=device, dataloader_idx=dataloader_idx)

    # ---------------------------------------------------------------- batches
    def _split(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs = targets = None
        if isinstance(batch, Mapping):
            inputs, targets = batch.get(self.input_key), batch.get(self.target_key)
            got = f"a dict with keys {sorted(map(str, batch))}"
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            inputs, targets = batch[0], batch[1]
            got = f"a {type(batch).__name__} of {len(batch)} items"
        else:
            got = f"{type(batch).__name__}"
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            got += (
                f" ({type(inputs).__name__}, {type(targets).__name__})"
                if inputs is not None or targets is not None
                else ""
            )
            raise MisconfigurationException(
                "ConAdvStrategy expects each training batch as an `(inputs, targets, ...)` tuple/list of tensors or a"
                f" dict with tensors under `input_key`={self.input_key!r} and `target_key`={self.target_key!r}"
                f" (targets: integer class labels); got {got}"
            )
        return inputs, targets

    # ---------------------------------------------------------------- the attack
    def _attack_loss(self, module: LightningModule) -> Callable[[Tensor, Tensor], Tensor]:
        hook = getattr(module, "conadv_loss", None)
        return hook if callable(hook) else F.cross_entropy

    def _adv_loss(self, module: LightningModule, logits: Tensor, targets: Tensor) -> Tensor:
        hook = getattr(module, "conadv_loss", None)
        if callable(hook):
            return hook(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def _attack_buffers(self) -> dict[str, Tensor]:
        """Copies of every buffer as the adversarial branch sees them (auxiliary BatchNorm statistics swapped in)."""
        module = self.lightning_module
        assert module is not None
        with auxiliary_bn(module):
            return {name: b.clone() for name, b in module.named_buffers()}

    def _run_attack(self, inputs: Tensor, targets: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        """The attack on the unwrapped module at the current weights, on copies of the BatchNorm statistics."""
        module = self.lightning_module
        assert module is not None

        def forward(x: Tensor) -> Tensor:
            return torch.func.functional_call(module, buffers, (x,), strict=False)

        with auxiliary_bn(module), self.precision_plugin.train_step_context():  # auxiliary affine parameters
            result = sign_attack(
                forward,
                inputs,
                targets,
                epsilon=self.epsilon,
                step_size=self.step_size,
                normalization=self.normalization,
                targeted=self.targeted,
                random_start=self.random_start,
                loss_fn=self._attack_loss(module),
                generator=self._generator,
            )
        return result.inputs

    def _launch(self, index: int, batch: Any, epoch: int, step: int) -> _Pending:
        inputs, targets = self._split(batch)
        # Copies of the statistics are taken on the main stream, before the clean pass updates them in place.
        buffers = self._attack_buffers()
        if self._stream is None:
            start = time.perf_counter()
            adv = self._run_attack(inputs, targets, buffers)
            pending = _Pending(index, epoch, adv, _fingerprint(inputs), step, source=batch)
            pending.attack_ms = (time.perf_counter() - start) * 1e3
            return pending
        main = torch.cuda.current_stream(inputs.device)
        self._stream.wait_stream(main)
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            start_event.record()
            for t in (inputs, targets, *buffers.values()):
                t.record_stream(self._stream)
            adv = self._run_attack(inputs, targets, buffers)
            fingerprint = _fingerprint(inputs)
            end_event.record()
        return _Pending(index, epoch, adv, fingerprint, step, source=batch, start=start_event, end=end_event)

    def _wait(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self.root_device).wait_stream(self._stream)

    def _take(self, batch_idx: int, batch: Any, inputs: Tensor, epoch: int) -> _Pending | None:
        for stale in [i for i in self._pending if i < batch_idx]:
            del self._pending[stale]
        pending = self._pending.pop(batch_idx, None)
        if pending is None:
            return None
        if pending.source is not None:
            match = pending.source is batch
        else:  # restored from a checkpoint: compare the clean inputs' fingerprint
            fingerprint = _fingerprint(inputs)
            match = pending.fingerprint.shape == fingerprint.shape and bool(
                torch.allclose(pending.fingerprint.to(fingerprint), fingerprint, rtol=1e-9, atol=1e-6)
            )
        if not match or pending.epoch != epoch or pending.inputs.shape != inputs.shape:
            if not self._warned_mismatch:
                rank_zero_warn(
                    f"ConAdvStrategy: the pending adversarial batch for batch {batch_idx} was made from other inputs"
                    " (a dataloader that is not deterministic on resume, or a changed batch); attacking afresh"
                )
                self._warned_mismatch = True
            return None
        if self._stream is not None:
            main = torch.cuda.current_stream(self.root_device)
            if pending.end is not None:  # made on the side stream (within an accumulation window no step waited)
                main.wait_event(pending.end)
            pending.inputs.record_stream(main)
        return pending

    # ---------------------------------------------------------------- the step
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        module, trainer = self.lightning_module, self.lightning_module.trainer if self.lightning_module else None
        assert module is not None and trainer is not None and self.model is not None
        batch = args[0] if args else kwargs["batch"]
        batch_idx = int(args[1] if len(args) > 1 else kwargs.get("batch_idx", 0))
        inputs, targets = self._split(batch)
        epoch, step = trainer.current_epoch, trainer.global_step

        current = self._take(batch_idx, batch, inputs, epoch)
        if current is None:  # first tau batches of an epoch, or a mismatch: attack now, at the current weights
            self._wait()
            current = self._launch(batch_idx, batch, epoch, step)
            self._wait()

        loader = self._loader
        ahead = batch_idx + self.tau
        if loader is not None and ahead < trainer.num_training_batches:
            host = loader.peek(ahead)
            if host is not None:
                device_batch = super().batch_to_device(host)
                self._transferred[id(host)] = (host, device_batch)
                self._pending[ahead] = self._launch(ahead, device_batch, epoch, step)
        if loader is not None:
            loader.consumed = batch_idx + 1

        stats: dict[str, Tensor] = {}

        clean_step = module.training_step

        def step_fn(*a: Any, **kw: Any) -> Any:
            out = clean_step(*a, **kw)
            if out is None:
                return None
            clean = out["loss"] if isinstance(out, Mapping) else out
            with auxiliary_bn(module):
                logits = module(current.inputs)
            adv_loss = self._adv_loss(module, logits, targets)
            stats["clean_loss"], stats["adv_loss"] = clean.detach(), adv_loss.detach()
            if logits.ndim == 2:
                stats["adv_accuracy"] = (logits.detach().argmax(-1) == targets).float().mean()
            total = clean + self.adv_weight * adv_loss
            if isinstance(out, Mapping):
                return {**out, "loss": total}
            return total

        # Lightning's own step (its precision context and its forward redirection through the DDP wrapper, so DDP
        # sees both passes) runs the module's `training_step`: for this call, that is `step_fn`.
        with _instance_method(module, "training_step", step_fn):
            out = super().training_step(*args, **kwargs)
        if stats:
            self._log(trainer, stats, staleness=step - current.made_at_step, pending=current)
        return out

    def _log(self, trainer: Trainer, stats: dict[str, Tensor], staleness: int, pending: _Pending) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        attack_ms = pending.attack_ms
        if attack_ms is None and pending.end is not None:
            pending.end.synchronize()
            attack_ms = pending.start.elapsed_time(pending.end)
        metrics = {f"conadv/{k}": float(v) for k, v in stats.items()}
        metrics["conadv/staleness"] = float(staleness)
        metrics["conadv/attack_ms"] = float(attack_ms if attack_ms is not None else float("nan"))
        self.last_metrics = metrics
        log_to_loggers(trainer, metrics)

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_wait() -> Any:
            out = closure()
            self._wait()  # the attack read theta_t: the update waits for it
            return out

        return super().optimizer_step(optimizer, closure_then_wait, model, **kwargs)

    @override
    def teardown(self) -> None:
        self._wait()
        self._pending.clear()
        self._transferred.clear()
        self._loader = None
        super().teardown()

    # ---------------------------------------------------------------- checkpointing
    def _local_state(self) -> dict[str, Any]:
        self._wait()
        pending = []
        if self.checkpoint_pending:
            for p in self._pending.values():
                pending.append(
                    {
                        "index": p.index,
                        "epoch": p.epoch,
                        "inputs": p.inputs.detach().cpu(),
                        "fingerprint": p.fingerprint.detach().cpu(),
                        "made_at_step": p.made_at_step,
                    }
                )
        generator = self._generator.get_state() if self._generator is not None else None
        return {"pending": pending, "generator": generator}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any = None) -> None:
        # Called on every rank (rank zero writes): every rank's pending batches and generator go into the file.
        gathered = gather_from_ranks(self._local_state())
        checkpoint[_CHECKPOINT_KEY] = {"ranks": dict(enumerate(gathered)), "world_size": self.world_size}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if saved is not None:
            if saved.get("world_size") != self.world_size:
                rank_zero_warn(
                    f"ConAdvStrategy: the checkpoint was saved at world size {saved.get('world_size')}, this run has"
                    f" {self.world_size}; ranks restore their own pending adversarial batches where saved"
                )
            mine = saved["ranks"].get(self.global_rank)
            if mine is not None:
                if self._generator is None:
                    self._restored = mine  # the generator is made in setup
                else:
                    self._apply_restored(mine)
        return checkpoint

    def _apply_restored(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None and self._generator is not None:
            self._generator.set_state(state["generator"])
        self._pending = {
            int(p["index"]): _Pending(
                index=int(p["index"]),
                epoch=int(p["epoch"]),
                inputs=p["inputs"].to(self.root_device),
                fingerprint=p["fingerprint"],
                made_at_step=int(p["made_at_step"]),
            )
            for p in state.get("pending", [])
        }

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "conadv",
            cls,
            description="DDP with concurrent adversarial learning (ConAdv: stale-weight attacks, auxiliary BatchNorm)",
            override=True,
        )


@contextlib.contextmanager
def _instance_method(obj: Any, name: str, fn: Callable[..., Any]) -> Iterator[None]:
    """``obj.<name>`` is ``fn`` inside the block (an instance attribute over the class's method), restored after."""
    had, previous = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, fn)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


ConAdvStrategy.register_strategies(StrategyRegistry)
