"""The one rule by which a module's ``optimizer_recipe`` and its ``optimizer`` / ``lr_scheduler`` callables combine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_gd.optim.recipe import OptimizerRecipe
from lightning_gd.optim.specs import MODULE_DEFAULTS

__all__ = ["module_recipe"]


def module_recipe(
    owner: str,
    recipe: OptimizerRecipe | str | None,
    optimizer: Callable[..., Any] | None,
    lr_scheduler: Callable[..., Any] | None,
) -> tuple[OptimizerRecipe, Callable[..., Any] | None, Callable[..., Any] | None]:
    """The recipe a module trains with and the callables that still apply over it.

    Without a recipe: the module's default (``MODULE_DEFAULTS[owner]``), whose optimizer and schedule the given
    callables replace. With a recipe (or a recipe's name): the recipe, and the callables are dropped with one
    warning naming them. Warn, not raise: a recipe's YAML sets ``optimizer`` and ``lr_scheduler``, and
    ``--model.optimizer_recipe NAME`` on top of it must work (the documented variants of the shipped recipes);
    the warning says which arguments do not apply.
    """
    if recipe is None:
        return OptimizerRecipe.from_spec(MODULE_DEFAULTS[owner]), optimizer, lr_scheduler
    if isinstance(recipe, str):
        recipe = OptimizerRecipe.from_name(recipe)
    if ignored := [name for name, value in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)) if value]:
        rank_zero_warn(
            f"{owner}: `optimizer_recipe`={recipe!r} replaces the {' and '.join(f'`{n}`' for n in ignored)}"
            " argument(s) given too; they are not used."
        )
    return recipe, None, None
