"""The built-in YAML recipes, shipped as package data in ``lightning_gd/recipes/configs``.

Torch-free, so that ``lightning-gd recipes`` answers at once. The tag that records a run's recipe in its checkpoints
is :class:`~lightning_gd.recipes.recipe_tag.RecipeTag`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["recipe_path", "recipes"]


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
