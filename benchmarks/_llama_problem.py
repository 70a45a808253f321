"""The two LLaMA-style curvature problems of the finite-difference benchmarks (``curvature_finite_difference.py``,
``curvature_step_check.py``): the model, a seeded batch of byte windows, and its loss.

* ``quickstart``: the quickstart recipe's model (preset ``tiny``, 128-byte windows, batch 16) after 30 AdamW steps of
  the recipe's optimizer on the standard library's bytes (measured off initialisation);
* ``llama-tiny``: preset ``tiny`` at its own 256-token block, batch 4, at initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gd.recipes.llama import Llama, LlamaConfig

__all__ = ["llama_problem", "lm_loss"]


def llama_problem(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The model (in ``dtype``, trained in it for ``quickstart``) and its batch (inputs, targets), seeded."""
    torch.manual_seed(0)
    block, batch = (128, 16) if name == "quickstart" else (256, 4)
    model = Llama(LlamaConfig.from_name("tiny", block_size=block)).to(dtype)
    data = torch.tensor(list(Path(os.__file__).read_bytes()), dtype=torch.long)
    gen = torch.Generator().manual_seed(1)

    def windows(n: int) -> tuple[Tensor, Tensor]:
        start = torch.randint(0, len(data) - block - 1, (n,), generator=gen)
        w = torch.stack([data[s : s + block + 1] for s in start.tolist()])
        return w[:, :-1], w[:, 1:]

    if name == "quickstart":  # the recipe's optimizer, for 30 steps
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        for _ in range(30):
            lm_loss(model, windows(batch)).backward()
            opt.step()
            opt.zero_grad()
    return model, windows(batch)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token cross-entropy, the logits in at least float32 (bfloat16 autocast outputs are raised to it)."""
    x, y = batch
    logits = model(x).flatten(0, 1)  # (B T, V)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y.flatten())
