"""LightningModule for image classification with any timm model (ResNet-50 for the ImageNet recipes)."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_gd.optim.recipe import OptimizerRecipe
from lightning_gd.recipes._optim import module_recipe
from lightning_gd.utils.checks import check_number

__all__ = ["ImageClassifierModule"]


class ImageClassifierModule(LightningModule):
    """Train a ``timm`` image classifier with label-smoothed cross entropy; top-1 / top-k accuracy via torchmetrics.

    The optimizer comes from an :class:`~lightning_gd.optim.OptimizerRecipe` (``lars-imagenet``,
    ``lamb-imagenet``: parameter groups without weight decay on BatchNorm and biases, peak LR and warm-up from the
    batch-size table, polynomial or cosine decay stepped every optimizer step), or from ``optimizer`` /
    ``lr_scheduler`` callables over the default recipe ``MODULE_DEFAULTS["ImageClassifierModule"]``
    (:mod:`lightning_gd.optim.specs`: SGD lr 0.1, momentum 0.9, no decay on norms and biases,
    :class:`~lightning_gd.optim.WarmupDecayLR` with 5% warm-up and cosine to 10%). Batches are ``(images, labels)``.

    Logged: ``train/loss``, ``train/acc`` (top-1 on the training batch), ``val/loss``, ``val/acc1`` and
    ``val/acc{top_k}``. Works with :class:`~lightning_gd.strategies.ConAdvStrategy` (which calls ``self(x)`` for
    the adversarial pass).

    Args:
        model_name: Any ``timm.list_models()`` name (``resnet50``, ``resnet18``, ``resnet10t``, ...).
        num_classes: Classes of the head.
        in_chans: Input channels (1 for grayscale digits).
        pretrained: Load timm's pretrained weights (needs a download).
        model_kwargs: Further ``timm.create_model`` arguments (``drop_rate``, ``zero_init_last``, ...).
        label_smoothing: Of the training cross entropy (0.1 in the ImageNet recipes).
        top_k: The second accuracy logged on validation (``val/acc5``); capped at ``num_classes``.
        optimizer_recipe: An :class:`OptimizerRecipe` or a recipe's name (in YAML: ``class_path: OptimizerRecipe``
            with ``name`` and ``batch_size``, the global batch size). It replaces ``optimizer`` and
            ``lr_scheduler`` (one warning when they are given too).
        optimizer: ``params -> Optimizer`` when no recipe is given.
        lr_scheduler: ``optimizer -> LRScheduler`` when no recipe is given.
        channels_last: Keep the model in channels-last memory format (faster convolutions on GPUs with bf16).

    Example::

        # not run: needs ImageNet and 8 GPUs
        model = ImageClassifierModule("resnet50", optimizer_recipe=OptimizerRecipe("lars-imagenet", batch_size=4096))
        trainer = Trainer(devices=8, precision="bf16-mixed", accumulate_grad_batches=2, max_epochs=90)
        trainer.fit(model, datamodule=ImageFolderDataModule("/data/imagenet", batch_size=256))
    """

    def __init__(
        self,
        model_name: str = "resnet50",
        num_classes: int = 1000,
        in_chans: int = 3,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.1,
        top_k: int = 5,
        optimizer_recipe: OptimizerRecipe | str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_number("label_smoothing", label_smoothing, 0, 1, high_open=True, error=MisconfigurationException)
        if num_classes < 2:
            raise MisconfigurationException(f"`num_classes` must be >= 2, got {num_classes!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "optimizer_recipe"])
        self.model = timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {})
        )
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        self.optimizer_recipe, self.optimizer_factory, self.lr_scheduler_factory = module_recipe(
            "ImageClassifierModule", optimizer_recipe, optimizer, lr_scheduler
        )
        self.top_k = min(top_k, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, top_k=1)
        self.val_acc1 = MulticlassAccuracy(num_classes=num_classes, top_k=1)
        self.val_acck = MulticlassAccuracy(num_classes=num_classes, top_k=self.top_k)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.val_acc1(logits, y)
        self.val_acck(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc1", self.val_acc1, prog_bar=True)
        self.log(f"val/acc{self.top_k}", self.val_acck)

    test_step = validation_step

    def configure_optimizers(self) -> Any:
        return self.optimizer_recipe.build(
            self, optimizer=self.optimizer_factory, lr_scheduler=self.lr_scheduler_factory
        )

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        self.optimizer_recipe.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
