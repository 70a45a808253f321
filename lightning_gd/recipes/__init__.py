"""Models, data modules and the built-in LightningCLI YAML recipes (``recipes/configs/*.yaml``).

Lazy (PEP 562): ``lightning_gd.recipes.registry`` (the recipe names, for ``lightning-gd recipes``) imports no torch;
each model or data module is imported on first use.
"""

from lightning_gd._lazy import lazy_attributes

_EXPORTS = {
    "CausalLMModule": ".causal_lm",
    "ConAdvReport": ".conadv_report",
    "DigitsDataModule": ".digits",
    "ImageClassifierModule": ".image_classifier",
    "ImageFolderDataModule": ".image_folder",
    "Llama": ".llama",
    "LlamaConfig": ".llama",
    "TextCorpusDataModule": ".text_corpus",
    "TokenStreamDataModule": ".token_stream",
    "recipe_path": ".registry",
    "recipes": ".registry",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
