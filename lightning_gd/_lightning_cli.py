"""The LightningCLI behind ``lightning-gd`` (imported by :mod:`lightning_gd.cli` when a subcommand runs)."""

from __future__ import annotations

import os
import re
from typing import Any

from lightning.pytorch.cli import LightningCLI

import lightning_gd
from lightning_gd.recipes.recipe_tag import RecipeTag

__all__ = ["LightningGDCLI"]


class LightningGDCLI(LightningCLI):
    """LightningCLI with any module and data module, an overwriting config saver, and loggers that share
    a ``save_dir`` and ``name`` writing into the same ``version_N`` directory (the run directory).

    Example::

        # my_train.py: the same command line, with your own defaults
        from lightning_gd.cli import LightningGDCLI
        LightningGDCLI()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        lightning_gd.register()  # every class of the package by its short name, the ddp_<compressor> strategies
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # One sequence length: the data's window sets the model's block_size (skipped by jsonargparse when either
        # class lacks the argument, so any LightningModule / LightningDataModule still works).
        parser.link_arguments("data.init_args.seq_len", "model.init_args.block_size", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _pin_logger_versions(config.get("trainer", {}).get("logger"))

    def before_fit(self) -> None:
        # Tag checkpoints with the recipe (the first --config's file stem): resuming another recipe's warns.
        configs = self.config["fit"].get("config") or []
        if configs:
            name = os.path.basename(str(getattr(configs[0], "relative", configs[0])))
            self.trainer.callbacks.append(RecipeTag(os.path.splitext(name)[0]))


def _next_version(root: str) -> int:
    if not os.path.isdir(root):
        return 0
    found = [int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", d))]
    return max(found, default=-1) + 1


def _pin_logger_versions(loggers: Any) -> None:
    """Give loggers with the same ``save_dir``/``name`` and no version one common next version.

    Without this, the first logger creates ``version_0`` and the second, looking later, picks ``version_1``.
    """
    if not isinstance(loggers, list):
        return
    groups: dict[tuple[str, str], list[Any]] = {}
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        if init_args is None or "save_dir" not in init_args or init_args.get("version") is not None:
            continue
        name = init_args.get("name") or "lightning_logs"
        groups.setdefault((str(init_args["save_dir"]), str(name)), []).append(init_args)
    for (save_dir, name), members in groups.items():
        if len(members) > 1:
            version = _next_version(os.path.join(save_dir, name))
            for init_args in members:
                init_args["version"] = version
