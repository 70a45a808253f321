"""lightning-gd: gradient-descent research tools as PyTorch Lightning plugins.

The package is lazy: ``import lightning_gd`` imports nothing heavy, ``from lightning_gd import SharpnessTracker``
imports the callbacks, and ``import lightning_gd.curvature`` loads torch but not Lightning, timm or litdata.

:func:`register` imports the Lightning glue, which makes every callback, strategy, optimizer, model and data module
of the package usable by its short class name in LightningCLI YAML (``class_path: MetricPlotter``) and registers
the strategies' names (``ddp_topk``, ...) with Lightning. The ``lightning-gd`` command does this itself.

Example::

    # not run: a script: LightningCLI() parses this process's command line
    import lightning_gd
    from lightning.pytorch.cli import LightningCLI

    lightning_gd.register()  # a plain LightningCLI now knows `class_path: SharpnessTracker`, `strategy: ddp_topk`
    LightningCLI()
"""

from __future__ import annotations

import importlib

from lightning_gd._lazy import lazy_attributes

__version__ = "0.1.0"

# Public name -> its subpackage (tests/test_lazy_import.py checks these against the subpackages' ``__all__``).
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "GracefulStop",
            "GradientFlossing",
            "HessianTraceMonitor",
            "MetricPlotter",
            "NoiseAnnealing",
            "ResumeProgressBar",
            "ScheduleLengthCheck",
            "SharpnessTracker",
            "TextSampler",
        ],
        ".callbacks",
    ),
    **dict.fromkeys(["MFAC", "Conda", "DiffGrad", "OptimizerRecipe", "WarmupCosineLR", "WarmupDecayLR"], ".optim"),
    **dict.fromkeys(["CompressedDDPStrategy", "ConAdvStrategy"], ".strategies"),
    "AtomicCheckpointIO": ".plugins",
    **dict.fromkeys(
        ["CausalLMModule", "Llama", "LlamaConfig", "TextCorpusDataModule", "TokenStreamDataModule"], ".recipes"
    ),
}

# The Lightning glue: importing these (every name of their ``__all__``) makes the classes known by short name.
_GLUE = ("callbacks", "optim", "plugins", "recipes", "strategies")

_SUBMODULES = (
    "adversarial",
    "callbacks",
    "cli",
    "compression",
    "curvature",
    "dynamics",
    "optim",
    "plugins",
    "recipes",
    "strategies",
    "utils",
)

__all__ = ["__version__", "register", *_EXPORTS]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, _SUBMODULES)


def register() -> None:
    """Import every callback, strategy, optimizer, model and data module of the package.

    LightningCLI (jsonargparse) resolves a short ``class_path`` among the subclasses already imported, and Lightning
    knows a strategy name (``ddp_topk``) once its module has registered it. Calling this more than once is free.

    Example::

        >>> import lightning_gd
        >>> from lightning.pytorch.strategies import StrategyRegistry
        >>> lightning_gd.register()  # then LightningCLI() knows class_path: CausalLMModule, strategy: ddp_sign, ...
        >>> "ddp_sign" in StrategyRegistry
        True
    """
    for name in _GLUE:
        module = importlib.import_module(f"{__name__}.{name}")
        for attribute in module.__all__:
            getattr(module, attribute)  # a lazy subpackage (recipes) imports its modules here
