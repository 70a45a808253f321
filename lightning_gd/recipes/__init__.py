"""Models, data modules and the built-in LightningCLI YAML recipes (``recipes/configs/*.yaml``)."""

from lightning_gd.recipes.causal_lm import CausalLMModule
from lightning_gd.recipes.conadv_report import ConAdvReport
from lightning_gd.recipes.digits import DigitsDataModule
from lightning_gd.recipes.image_classifier import ImageClassifierModule
from lightning_gd.recipes.image_folder import ImageFolderDataModule
from lightning_gd.recipes.llama import Llama, LlamaConfig
from lightning_gd.recipes.registry import recipe_path, recipes
from lightning_gd.recipes.text_corpus import TextCorpusDataModule
from lightning_gd.recipes.token_stream import TokenStreamDataModule

__all__ = [
    "CausalLMModule",
    "ConAdvReport",
    "DigitsDataModule",
    "ImageClassifierModule",
    "ImageFolderDataModule",
    "Llama",
    "LlamaConfig",
    "TextCorpusDataModule",
    "TokenStreamDataModule",
    "recipe_path",
    "recipes",
]
