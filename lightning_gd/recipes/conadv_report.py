"""``ConAdvReport``: clean vs adversarial loss / accuracy curves and a grid of clean and attacked images."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_gd.adversarial import Normalization, auxiliary_bn, has_auxiliary_bn, sign_attack
from lightning_gd.utils.logging import history_from_state, history_to_state
from lightning_gd.utils.plotting import new_figure, run_dir, save_figure

__all__ = ["ConAdvReport"]

_CURVES = {
    "loss": ("train/loss", "conadv/adv_loss"),
    "accuracy": ("train/acc", "conadv/adv_accuracy"),
}


class ConAdvReport(Callback):
    """At the end of fitting, draw what concurrent adversarial training did (rank zero, into the run directory).

    * ``conadv_curves.png``: training loss and top-1 accuracy on the clean batches (``train/loss``,
      ``train/acc``, logged by the module) against the same on the adversarial batches (``conadv/adv_loss``,
      ``conadv/adv_accuracy``, logged by :class:`~lightning_gd.strategies.ConAdvStrategy`).
    * ``adversarial_examples.png``: ``num_images`` validation images, clean (true label, prediction), attacked
      with the strategy's attack at the final weights (prediction), and the perturbation (amplified).

    The attack for the grid uses the strategy's epsilon, step, normalization and target rule (eval mode, the
    auxiliary BatchNorm for the attack as in training; predictions with the main BatchNorm, as deployed).
    The curves' history is checkpointed.

    Args:
        every_n_steps: How often the four metrics are recorded.
        num_images: Images in the grid (from the first validation batch).
        seed: Seed of the grid's attack (random start, target labels).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gd.strategies import ConAdvStrategy
        >>> trainer = Trainer(strategy=ConAdvStrategy(epsilon=0.1, mean=(0.31,), std=(0.38,)),
        ...                   callbacks=[ConAdvReport(every_n_steps=5)])
    """

    def __init__(self, every_n_steps: int = 5, num_images: int = 8, seed: int = 0) -> None:
        if every_n_steps < 1:
            raise MisconfigurationException(f"`every_n_steps` must be >= 1, got {every_n_steps!r}")
        if num_images < 1:
            raise MisconfigurationException(f"`num_images` must be >= 1, got {num_images!r}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self.history: dict[str, list[tuple[int, float]]] = {n: [] for pair in _CURVES.values() for n in pair}
        self.paths: list[str] = []

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps != 0:
            return
        for name, points in self.history.items():
            value = trainer.callback_metrics.get(name)
            if value is not None and value.numel() == 1 and math.isfinite(float(value)):
                if not points or points[-1][0] != trainer.global_step:
                    points.append((trainer.global_step, float(value)))

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = run_dir(trainer)  # every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        self.paths = [self._curves(trainer, log_dir)]
        grid = self._grid(trainer, pl_module, log_dir)
        if grid is not None:
            self.paths.append(grid)
        rank_zero_info(f"ConAdvReport: wrote {', '.join(self.paths)}")

    def _curves(self, trainer: Trainer, log_dir: str) -> str:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), dpi=100)
        for i, (title, (clean, adv)) in enumerate(_CURVES.items()):
            ax = fig.add_subplot(1, 2, i + 1)
            for name, label in ((clean, "clean batch"), (adv, "adversarial batch (auxiliary BN)")):
                if self.history[name]:
                    steps, values = zip(*self.history[name], strict=True)
                    ax.plot(steps, values, label=label)
            ax.set_xlabel("step")
            ax.set_title(f"training {title}")
            ax.grid(alpha=0.3)
            ax.legend()
        return save_figure(trainer, fig, log_dir, "conadv_curves.png", tag="conadv/curves")

    def _grid(self, trainer: Trainer, module: LightningModule, log_dir: str) -> str | None:
        strategy = trainer.strategy
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None or not hasattr(strategy, "epsilon"):
            return None
        x, y = next(iter(loader))[:2]
        x, y = x[: self.num_images].to(module.device), y[: self.num_images].to(module.device)
        norm: Normalization = strategy.normalization
        was_training = module.training
        module.eval()
        try:
            gen = torch.Generator(device=module.device).manual_seed(self.seed)
            attack_ctx = auxiliary_bn(module) if has_auxiliary_bn(module) else nullcontext()
            with attack_ctx:
                adv = sign_attack(
                    module, x, y, epsilon=strategy.epsilon, step_size=strategy.step_size, normalization=norm,
                    targeted=strategy.targeted, random_start=strategy.random_start, generator=gen,
                ).inputs  # fmt: skip
            with torch.no_grad():
                clean_pred, adv_pred = module(x).argmax(-1), module(adv).argmax(-1)
        finally:
            module.train(was_training)
        clean_px, adv_px = norm.to_pixels(x).cpu(), norm.to_pixels(adv).cpu()
        n = x.shape[0]
        fig, _ = new_figure(width=1.4 * n, height=4.6)
        fig.clear()
        for i in range(n):
            rows = (
                (clean_px[i], f"y={int(y[i])} pred {int(clean_pred[i])}", "gray"),
                (adv_px[i], f"adv: pred {int(adv_pred[i])}", "gray"),
                (adv_px[i] - clean_px[i], "perturbation", "coolwarm"),
            )
            for r, (img, title, cmap) in enumerate(rows):
                ax = fig.add_subplot(3, n, r * n + i + 1)
                img = img.permute(1, 2, 0) if img.shape[0] == 3 else img[0]
                if cmap == "coolwarm":
                    eps = max(strategy.epsilon, 1e-12)
                    ax.imshow(img.numpy(), cmap=cmap, vmin=-eps, vmax=eps)
                else:
                    ax.imshow(img.clamp(0, 1).numpy(), cmap=cmap, vmin=0, vmax=1)
                ax.set_title(title, fontsize=8, color="red" if r == 1 and adv_pred[i] != y[i] else "black")
                ax.axis("off")
        fig.suptitle(f"clean / adversarial (epsilon {strategy.epsilon:g} in pixel units) / perturbation")
        return save_figure(trainer, fig, log_dir, "adversarial_examples.png", tag="conadv/examples")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": history_to_state(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.update(history_from_state(state_dict.get("history", {})))
