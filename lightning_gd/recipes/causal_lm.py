"""LightningModule for next-token pretraining of a :class:`~lightning_gd.recipes.llama.Llama` model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lightning_gd.optim.recipe import OptimizerRecipe
from lightning_gd.recipes._optim import module_recipe
from lightning_gd.recipes.llama import Llama, LlamaConfig

__all__ = ["CausalLMModule", "batch_size", "tokens_in_batch"]


def batch_size(batch: tuple[Tensor, Tensor]) -> int:
    """Sequences in an ``(inputs, targets)`` batch: ``ThroughputMonitor(batch_size_fn=...)``."""
    return batch[0].shape[0]


def tokens_in_batch(batch: tuple[Tensor, Tensor]) -> int:
    """Tokens in an ``(inputs, targets)`` batch: ``ThroughputMonitor(length_fn=...)`` logs them per second."""
    return batch[0].numel()


class CausalLMModule(LightningModule):
    """Pretrain a LLaMA-style decoder with cross-entropy on next tokens.

    The optimizer and learning-rate schedule are init arguments, so LightningCLI (``class_path`` /
    ``init_args`` in YAML) or Python callers choose them. The optimizer receives two parameter groups:
    weight matrices, and norms/biases/embeddings with ``weight_decay=0``
    (:func:`~lightning_gd.optim.recipe.decay_groups`). Defaults: the recipe
    ``MODULE_DEFAULTS["CausalLMModule"]`` (:mod:`lightning_gd.optim.specs`): AdamW (lr 1e-3, betas (0.9, 0.95),
    weight decay 0.1) and :class:`~lightning_gd.optim.WarmupDecayLR` (5% warm-up, cosine to 10%) over the
    Trainer's total steps, stepped every optimizer step.

    Args:
        preset: Name of a :class:`LlamaConfig` preset (``tiny``, ``125m``, ``350m``, ``1b``).
        overrides: Fields of the preset to change, e.g. ``{"block_size": 128, "dropout": 0.1}``.
        block_size: Longest sequence (overrides the preset's and ``overrides``); the ``lightning-gd`` command links
            it to ``data.seq_len``, so a longer data window just works.
        compile: Train through ``torch.compile(model)``. Compiled modules have no double backward: the
            curvature callbacks need ``compile=False``.
        activation_checkpointing: Recompute each block's activations in backward (less memory, ~1/3 more compute).
        optimizer: ``params -> Optimizer``; ``None`` uses the default AdamW.
        lr_scheduler: ``optimizer -> LRScheduler``; ``None`` uses the default warm-up + cosine. A
            :class:`~lightning_gd.optim.WarmupDecayLR` built without ``total_steps`` gets the Trainer's estimate.
        optimizer_recipe: An :class:`~lightning_gd.optim.OptimizerRecipe` or the name of one (``conda-llama``,
            ``muon-llama``, ...; ``lightning-gd optimizers`` lists them). It replaces ``optimizer`` and
            ``lr_scheduler`` (its own parameter groups and schedule over the Trainer's total steps; one warning
            when they are given too, as a recipe's YAML does) and clips gradients by its ``gradient_clip_val``
            unless the Trainer sets one.

    Example::

        # not run: trains for minutes (the quickstart; tests/recipes train it shrunk)
        model = CausalLMModule(
            preset="tiny",
            optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.1),
        )
        trainer = Trainer(max_steps=500)
        trainer.fit(model, datamodule=TextCorpusDataModule(seq_len=128))

        # or a named optimizer recipe (CLI: lightning-gd fit --config quickstart --model.optimizer_recipe conda-llama)
        model = CausalLMModule(preset="tiny", optimizer_recipe="conda-llama")
    """

    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        block_size: int | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        optimizer_recipe: OptimizerRecipe | str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "optimizer_recipe"])
        self.optimizer_recipe, self.optimizer_factory, self.lr_scheduler_factory = module_recipe(
            "CausalLMModule", optimizer_recipe, optimizer, lr_scheduler
        )
        fields = {**(overrides or {}), **({} if block_size is None else {"block_size": block_size})}
        self.config = LlamaConfig.from_name(preset, **fields)
        self.model = Llama(self.config, activation_checkpointing=activation_checkpointing)
        # Not a submodule (object.__setattr__): the checkpoint keeps only ``model.*`` keys, compiled or not.
        object.__setattr__(self, "_train_model", torch.compile(self.model) if compile else self.model)
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()
        # (B, T) of the latest batch, and whether it was trained on (forward + backward) or only evaluated.
        self._last_shape: tuple[int, int] | None = None
        self._last_trained = True

    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the latest batch for Lightning's ``ThroughputMonitor`` (it reports MFU against the device's peak
        from this): (6N + 12 L C T) per token for a training batch (forward + backward), a third of it for a
        validation, test or predict batch (forward only; PaLM, appendix B)."""
        if self._last_shape is None:
            return None
        B, T = self._last_shape
        flops = self.config.flops_per_token(T) * B * T
        return flops if self._last_trained else flops // 3  # 6N + 12LCT = 3 x (2N + 4LCT): exact

    def _record_batch(self, batch: Any, trained: bool) -> None:
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        if isinstance(inputs, Tensor) and inputs.ndim == 2:
            self._last_shape, self._last_trained = (int(inputs.shape[0]), int(inputs.shape[1])), trained

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._record_batch(batch, trained=True)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record_batch(batch, trained=False)

    on_test_batch_start = on_predict_batch_start = on_validation_batch_start

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch  # (B, T) each
        logits = self._train_model(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_loss.update(loss, weight=batch[1].numel())
        self.val_ppl.update(logits.float(), batch[1])
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)

    test_step = validation_step

    def on_fit_start(self) -> None:
        # A `trainer.validate` before `fit` leaves metric states as inference tensors, which fit's
        # validation (run under no_grad) cannot update: start fit from fresh states.
        self.val_loss.reset()
        self.val_ppl.reset()

    def generate(self, idx: Tensor, max_new_tokens: int, **kwargs: Any) -> Tensor:
        """Sample continuations of ``idx`` (B, T); see :meth:`Llama.generate`."""
        return self.model.generate(idx, max_new_tokens, **kwargs)

    def configure_optimizers(self) -> Any:
        return self.optimizer_recipe.build(
            self, params=self.model, optimizer=self.optimizer_factory, lr_scheduler=self.lr_scheduler_factory
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        self.optimizer_recipe.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
