"""The built-in YAML recipes, shipped as package data in ``lightning_gd/recipes/configs``, and the tag that
records a run's recipe in its checkpoints."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

__all__ = ["RecipeTag", "recipe_path", "recipes"]


def _configs_dir() -> Path:
    return Path(str(resources.files("lightning_gd.recipes") / "configs"))


def _description(path: Path) -> str:
    # The first comment line of a recipe is its one-line description.
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def recipes() -> dict[str, str]:
    """Names of the built-in recipes mapped to their one-line descriptions, sorted by name."""
    return {p.stem: _description(p) for p in sorted(_configs_dir().glob("*.yaml"))}


def recipe_path(name: str) -> Path:
    """Path of the built-in recipe ``name`` (with or without ``.yaml``).

    Raises:
        ValueError: for an unknown name; the message lists the available recipes.
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = _configs_dir() / f"{stem}.yaml"
    if not path.is_file():
        raise ValueError(f"Unknown recipe {name!r}. Built-in recipes: {', '.join(recipes()) or '(none)'}")
    return path


class RecipeTag(Callback):
    """Record the recipe a run was started from in its checkpoints, and warn when resuming another recipe's.

    The ``lightning-gd`` command adds it to every ``fit``. A checkpoint of another recipe may still resume
    (the data module refuses one whose data settings differ); the warning names both recipes.

    Args:
        recipe: The recipe's name (a built-in recipe's name, or the stem of the user's YAML file).

    Example::

        trainer = Trainer(callbacks=[RecipeTag("quickstart")])
    """

    def __init__(self, recipe: str) -> None:
        self.recipe = recipe

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("recipe")
        if saved is not None and saved != self.recipe:
            rank_zero_warn(
                f"Resuming a checkpoint of recipe {saved!r} in a run of recipe {self.recipe!r}: settings that differ"
                " between the two recipes (callbacks, schedule, model options) now follow this run's recipe."
            )
