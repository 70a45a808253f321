"""Hessian-vector products through activation checkpointing, and the precision of products under bf16.

The LLaMA-style decoder of the recipes, wrapped per block in ``torch.utils.checkpoint``, inside a real Trainer with
``SharpnessTracker``; references are scipy ``eigsh`` on float64 copies.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import lightning_gd.curvature.operator as operator_module
from lightning_gd.callbacks import SharpnessTracker
from lightning_gd.curvature import HessianOperator, lanczos
from lightning_gd.recipes.llama import Llama, LlamaConfig
from tests.helpers.models import TinyClassifier, classification_loader

_CONFIG = dict(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=8, intermediate_size=8)


class _Checkpointed(nn.Module):
    """One decoder block whose activations are recomputed in the backward pass."""

    def __init__(self, block: nn.Module, use_reentrant: bool) -> None:
        super().__init__()
        self.block = block
        self.use_reentrant = use_reentrant

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return checkpoint(self.block, x, cos, sin, use_reentrant=self.use_reentrant)


def _checkpointed(model: Llama, use_reentrant: bool = False) -> Llama:
    model = copy.deepcopy(model)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = _Checkpointed(block, use_reentrant)
    return model


def _lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def _tokens() -> Tensor:
    return torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(0))


def _eigsh_lambda_max(model: nn.Module, loss_fn, batch) -> float:
    """lambda_max of the Hessian of ``loss_fn(model, batch)`` on a float64 copy of the model, by scipy's ``eigsh``
    (ARPACK, tol 1e-12) over exact double-backward products: a reference independent of our Lanczos."""
    model = copy.deepcopy(model).double()
    op = HessianOperator(model, loss_fn, batch, hvp="double_backward")

    def matvec(v: np.ndarray) -> np.ndarray:
        return op.matvec(torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).numpy()

    linear = LinearOperator((op.numel, op.numel), matvec=matvec, dtype=np.float64)
    return float(eigsh(linear, k=1, which="LA", tol=1e-12, v0=np.ones(op.numel))[0][0])


class _Decoder(LightningModule):
    def __init__(self, use_reentrant: bool | None = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        model = Llama(LlamaConfig(**_CONFIG))
        self.model = model if use_reentrant is None else _checkpointed(model, use_reentrant)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return _lm_loss(self.model, batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(tmp_path, module: LightningModule, callbacks: list, steps: int = 3) -> Trainer:
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks, precision="64-true",
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(_tokens()), batch_size=4))
    return trainer


def test_double_backward_through_non_reentrant_checkpointing_is_exact():
    torch.manual_seed(0)
    plain = Llama(LlamaConfig(**_CONFIG)).double()
    wrapped = _checkpointed(plain)
    V = torch.randn(sum(p.numel() for p in plain.parameters()), 3, dtype=torch.float64)
    reference = HessianOperator(plain, _lm_loss, _tokens(), hvp="double_backward").matmat(V)
    torch.testing.assert_close(HessianOperator(wrapped, _lm_loss, _tokens()).matmat(V), reference, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="saved tensor hooks"):
        HessianOperator(wrapped, _lm_loss, _tokens(), hvp="forward_over_reverse").matmat(V)


def test_sharpness_tracker_on_a_checkpointed_decoder_falls_back_once(tmp_path, monkeypatch, caplog):
    # The order hvp="auto" uses on GPUs, forward-over-reverse first: it fails under checkpointing's hooks.
    monkeypatch.setattr(operator_module, "_auto_order", lambda device: ("forward_over_reverse", "double_backward"))
    seed_everything(0)
    module = _Decoder()
    tracker = SharpnessTracker(every_n_steps=1, max_overhead=None, tol=1e-3, plot=False, preconditioned=False)
    with caplog.at_level(logging.INFO, logger=operator_module.__name__):
        _fit(tmp_path, module, [tracker], steps=2)
    # One failed try in two checks: the choice is remembered by the callback, not retried at every check.
    assert sum("forward_over_reverse HVP failed" in r.getMessage() for r in caplog.records) == 1
    assert tracker._hvp_in_use == "double_backward"
    assert [s for s, _ in tracker.history["sharpness/lambda_max"]] == [1, 2]
    # The last check measured the final weights on the only batch: compare with the dense Hessian.
    measured = tracker.history["sharpness/lambda_max"][-1][1]
    plain = Llama(LlamaConfig(**_CONFIG))  # the same weights without checkpointing: another autograd path
    plain.load_state_dict({k.replace(".block.", "."): v for k, v in module.model.state_dict().items()})
    assert measured == pytest.approx(_eigsh_lambda_max(plain, _lm_loss, _tokens()), rel=1e-5)
    # Measuring never perturbs training, through checkpointing too.
    seed_everything(0)
    alone = _Decoder()
    _fit(tmp_path, alone, [], steps=2)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), alone.parameters(), strict=True))


def test_checkpointing_that_blocks_both_methods_gets_one_error_naming_both(tmp_path):
    tracker = SharpnessTracker(every_n_steps=1, max_overhead=None, plot=False)
    with pytest.raises(RuntimeError, match="double_backward failed.*reentrant.*forward_over_reverse failed") as err:
        _fit(tmp_path, _Decoder(use_reentrant=True), [tracker], steps=1)
    assert "use_reentrant=False" in str(err.value)


def test_lambda_max_under_bf16_mixed_matches_the_fp32_copy(tmp_path):
    # bf16-mixed keeps float32 weights and autocasts the forward; the operator turns autocast off, so the tracker
    # measures the float32 model exactly as a float32 (here float64) copy of it.
    seed_everything(0)
    model = TinyClassifier(batchnorm=False, dropout=0.0)
    tracker = SharpnessTracker(every_n_steps=2, max_overhead=None, tol=1e-3, plot=False, preconditioned=False)
    x, y = next(iter(classification_loader(n=16, batch_size=16)))
    trainer = Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[tracker], precision="bf16-mixed",
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert all(p.dtype == torch.float32 for p in model.parameters())

    def ce(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    exact = _eigsh_lambda_max(model, ce, (x.double(), y))
    measured = tracker.history["sharpness/lambda_max"][0][1]
    assert measured == pytest.approx(exact, rel=1e-5)
    # A bfloat16 copy of the same weights: bfloat16 products, float32 Lanczos basis; bf16 rounding (8 bits of
    # mantissa) moves lambda_max by about a percent, not more.
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    op = HessianOperator(bf16, lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]), (x.to(torch.bfloat16), y))
    result = lanczos(op, tol=1e-2)
    assert op.dtype == torch.bfloat16 and result.eigenvectors.dtype == torch.bfloat16
    assert result.eigenvalues[0].item() == pytest.approx(exact, rel=5e-2)
