"""Models, data modules and the built-in LightningCLI YAML recipes (``recipes/configs/*.yaml``)."""

from lightning_gd.recipes.causal_lm import CausalLMModule
from lightning_gd.recipes.llama import Llama, LlamaConfig
from lightning_gd.recipes.registry import recipe_path, recipes
from lightning_gd.recipes.text_corpus import TextCorpusDataModule
from lightning_gd.recipes.token_stream import TokenStreamDataModule

__all__ = [
    "CausalLMModule",
    "Llama",
    "LlamaConfig",
    "TextCorpusDataModule",
    "TokenStreamDataModule",
    "recipe_path",
    "recipes",
]
