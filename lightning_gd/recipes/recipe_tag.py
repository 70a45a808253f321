"""The tag that records a run's recipe in its checkpoints."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

__all__ = ["RecipeTag"]


class RecipeTag(Callback):
    """Record the recipe a run was started from in its checkpoints, and warn when resuming another recipe's.

    The ``lightning-gd`` command adds it to every ``fit``. A checkpoint of another recipe may still resume
    (the data module refuses one whose data settings differ); the warning names both recipes.

    Args:
        recipe: The recipe's name (a built-in recipe's name, or the stem of the user's YAML file).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[RecipeTag("quickstart")])
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
