"""Gradient compression for data-parallel training (pure PyTorch, no Lightning import).

Compressors (:class:`TopK`, :class:`RandomK`, :class:`Sign`, :class:`QSGD`), error-feedback memory
(:class:`ErrorFeedback`), DGC momentum correction (:class:`MomentumCorrection`), the DDP
communication hook (:func:`compressed_allreduce_hook` with :class:`CompressionHookState`) and
checkpoint helpers for torch's PowerSGD hook.

Example::

    >>> from lightning_gd.compression import CompressionHookState, TopK, compressed_allreduce_hook
    >>> state = CompressionHookState(TopK(0.01), warmup_steps=10, module=ddp_model.module)
    >>> ddp_model.register_comm_hook(state, compressed_allreduce_hook)
"""

from lightning_gd.compression.base import CompressedTensor, Compressor
from lightning_gd.compression.error_feedback import ErrorFeedback
from lightning_gd.compression.hook import CompressionHookState, compressed_allreduce_hook
from lightning_gd.compression.momentum import MomentumCorrection
from lightning_gd.compression.powersgd import (
    PowerSGDLayoutState,
    load_powersgd_state_dict,
    powersgd_layout_hook,
    powersgd_state_dict,
)
from lightning_gd.compression.qsgd import QSGD
from lightning_gd.compression.randomk import RandomK
from lightning_gd.compression.sign import Sign
from lightning_gd.compression.topk import TopK

__all__ = [
    "QSGD",
    "CompressedTensor",
    "CompressionHookState",
    "Compressor",
    "ErrorFeedback",
    "MomentumCorrection",
    "RandomK",
    "Sign",
    "TopK",
    "compressed_allreduce_hook",
    "PowerSGDLayoutState",
    "load_powersgd_state_dict",
    "powersgd_layout_hook",
    "powersgd_state_dict",
]
