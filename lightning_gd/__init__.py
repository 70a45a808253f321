"""lightning-gd: gradient-descent research tools as PyTorch Lightning plugins.

Importing the package makes every callback, strategy and optimizer in it usable by its short class name
in LightningCLI YAML (``class_path: MetricPlotter``) and registers the strategies' names with Lightning.
"""

from lightning_gd import callbacks, optim, strategies
from lightning_gd.callbacks import *  # noqa: F403
from lightning_gd.optim import *  # noqa: F403
from lightning_gd.recipes import CausalLMModule, Llama, LlamaConfig, TextCorpusDataModule, TokenStreamDataModule
from lightning_gd.strategies import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [
    "CausalLMModule",
    "Llama",
    "LlamaConfig",
    "TextCorpusDataModule",
    "TokenStreamDataModule",
    "__version__",
    *callbacks.__all__,
    *optim.__all__,
    *strategies.__all__,
]
