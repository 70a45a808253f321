"""Gradient compression for data-parallel training (pure PyTorch, no Lightning import).

Compressors (:class:`TopK`, :class:`RandomK`, :class:`Sign`, :class:`QSGD`), error-feedback memory
(:class:`ErrorFeedback`, or the null :class:`NoMemory`), DGC momentum correction (:class:`MomentumCorrection`),
and the DDP hook states behind one protocol (:class:`HookState`): :class:`CompressionHookState` runs any
compressor with error feedback, :class:`PowerSGDHookState` runs torch's PowerSGD. :data:`COMPRESSORS` names them.

Example::

    >>> from lightning_gd.compression import make_hook_state
    >>> state = make_hook_state("topk", density=0.01, warmup_steps=10)
    >>> # state.register(ddp_model): on a DistributedDataParallel model, before its first backward
"""

from lightning_gd._lazy import lazy_attributes

# Lazy (PEP 562): ``lightning_gd.compression.registry`` (names, options, descriptions) is readable without torch.
_EXPORTS = {
    "COMPRESSORS": ".registry",
    "QSGD": ".qsgd",
    "BucketLayouts": ".layout",
    "CompressedTensor": ".base",
    "CompressionHookState": ".hook",
    "Compressor": ".base",
    "CompressorEntry": ".registry",
    "CompressorName": ".registry",
    "ErrorFeedback": ".error_feedback",
    "HookState": ".hook_state",
    "MomentumCorrection": ".momentum",
    "NoMemory": ".no_memory",
    "PowerSGDHookState": ".powersgd",
    "RandomK": ".randomk",
    "Sign": ".sign",
    "TopK": ".topk",
    "compressed_allreduce_hook": ".hook",
    "load_powersgd_state_dict": ".powersgd",
    "make_hook_state": ".registry",
    "powersgd_state_dict": ".powersgd",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
