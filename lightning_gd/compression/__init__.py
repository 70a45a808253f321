"""Gradient compression for data-parallel training (pure PyTorch, no Lightning import).

Compressors (:class:`TopK`, :class:`RandomK`, :class:`Sign`, :class:`QSGD`), error-feedback memory
(:class:`ErrorFeedback`, or the null :class:`NoMemory`), DGC momentum correction (:class:`MomentumCorrection`),
and the DDP hook states behind one protocol (:class:`HookState`): :class:`CompressionHookState` runs any
compressor with error feedback, :class:`PowerSGDHookState` runs torch's PowerSGD. :data:`COMPRESSORS` names them.

Example::

    >>> from lightning_gd.compression import make_hook_state
    >>> state = make_hook_state("topk", density=0.01, warmup_steps=10)
    >>> state.register(ddp_model)
"""

from lightning_gd.compression.base import CompressedTensor, Compressor
from lightning_gd.compression.error_feedback import ErrorFeedback
from lightning_gd.compression.hook import CompressionHookState, compressed_allreduce_hook
from lightning_gd.compression.hook_state import HookState
from lightning_gd.compression.layout import BucketLayouts
from lightning_gd.compression.momentum import MomentumCorrection
from lightning_gd.compression.no_memory import NoMemory
from lightning_gd.compression.powersgd import PowerSGDHookState, load_powersgd_state_dict, powersgd_state_dict
from lightning_gd.compression.qsgd import QSGD
from lightning_gd.compression.randomk import RandomK
from lightning_gd.compression.registry import COMPRESSORS, CompressorEntry, CompressorName, make_hook_state
from lightning_gd.compression.sign import Sign
from lightning_gd.compression.topk import TopK

__all__ = [
    "COMPRESSORS",
    "QSGD",
    "BucketLayouts",
    "CompressedTensor",
    "CompressionHookState",
    "Compressor",
    "CompressorEntry",
    "CompressorName",
    "ErrorFeedback",
    "HookState",
    "MomentumCorrection",
    "NoMemory",
    "PowerSGDHookState",
    "RandomK",
    "Sign",
    "TopK",
    "compressed_allreduce_hook",
    "load_powersgd_state_dict",
    "make_hook_state",
    "powersgd_state_dict",
]
