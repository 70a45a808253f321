"""Generate a short text sample from a byte-level language model when fitting ends."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_gd.utils.checks import check_number, check_positive_int
from lightning_gd.utils.deepspeed_state import deepspeed_stage
from lightning_gd.utils.plotting import run_dir

__all__ = ["TextSampler"]


class TextSampler(Callback):
    """At the end of ``fit``, sample a continuation of ``prompt`` and show it.

    The module must have ``generate(idx, max_new_tokens, temperature=..., top_k=..., generator=...)`` over
    byte tokens (vocabulary 256), as :class:`~lightning_gd.recipes.CausalLMModule` has. Sampling uses its
    own seeded generator, so the global RNG is untouched; the module's train/eval mode is restored. The
    sample is printed, written to ``<log_dir>/<filename>`` and added to TensorBoard's text tab. Rank zero samples;
    with sharded parameters (DeepSpeed ZeRO-3, FSDP), where every forward is a collective, every rank generates
    the same sample and rank zero writes it.

    Args:
        prompt: Text to continue.
        max_new_tokens: Number of bytes to generate.
        temperature: Softmax temperature (0 decodes greedily).
        top_k: Sample among the ``top_k`` most likely bytes; ``None`` for all.
        seed: Seed of the sampling generator.
        filename: Name of the text file in the run directory.

    Example::

        trainer = Trainer(callbacks=[TextSampler(prompt="def main(", max_new_tokens=300)])
    """

    def __init__(
        self,
        prompt: str = "def ",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
        filename: str = "sample.txt",
    ) -> None:
        if not prompt:
            raise MisconfigurationException(f"`prompt` must not be empty, got {prompt!r}")
        check_positive_int("max_new_tokens", max_new_tokens, error=MisconfigurationException)
        check_number("temperature", temperature, 0, error=MisconfigurationException)
        if top_k is not None:
            check_positive_int("top_k", top_k, error=MisconfigurationException)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.filename = filename
        self.last_sample: str | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "generate", None)):
            raise MisconfigurationException(
                f"TextSampler needs a module with a `generate` method; {type(pl_module).__name__} has none"
            )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = run_dir(trainer)  # on every rank: a collective under DDP
        # With sharded parameters (DeepSpeed ZeRO-3, FSDP) every forward all-gathers them: every rank must generate,
        # or rank zero waits forever. Elsewhere rank zero generates alone.
        sharded = deepspeed_stage(trainer.strategy) == 3 or isinstance(
            trainer.strategy, FSDPStrategy | ModelParallelStrategy
        )
        if not trainer.is_global_zero and not sharded:
            return
        idx = torch.tensor([list(self.prompt.encode())], dtype=torch.long, device=pl_module.device)  # (1, T)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            out = pl_module.generate(
                idx, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, generator=generator
            )
        finally:
            for m, training in modes.items():
                m.training = training
        if not trainer.is_global_zero:
            return
        self.last_sample = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, self.filename), "w", encoding="utf-8") as f:
            f.write(self.last_sample)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("sample", f"```\n{self.last_sample}\n```", trainer.global_step)
        rank_zero_info(f"Sample after {trainer.global_step} steps:\n{'-' * 60}\n{self.last_sample}\n{'-' * 60}")
