"""The ``lightning-gd`` command: a LightningCLI that knows the package's built-in recipes.

``lightning-gd fit --config quickstart`` runs a built-in recipe by name (a path works too);
``lightning-gd recipes`` lists them. Every LightningModule and LightningDataModule is accepted
(``class_path``), and every class of ``lightning_gd`` is known by its short name.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI

import lightning_gd  # noqa: F401  (makes the package's classes resolvable by short name)
from lightning_gd.recipes.registry import RecipeTag, recipe_path, recipes

__all__ = ["LightningGDCLI", "main"]

_CONFIG_FLAGS = ("--config", "-c")


class LightningGDCLI(LightningCLI):
    """LightningCLI with any module and data module, an overwriting config saver, and loggers that share
    a ``save_dir`` and ``name`` writing into the same ``version_N`` directory (the run directory).

    Example::

        # my_train.py: the same command line, with your own defaults
        from lightning_gd.cli import LightningGDCLI
        LightningGDCLI()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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


def _resolve_config_names(argv: Sequence[str]) -> list[str]:
    """Replace ``--config NAME`` by the path of the built-in recipe NAME when NAME is not a file."""

    def resolve(value: str) -> str:
        if os.path.exists(value) or any(ch in value for ch in "{}:\n"):
            return value  # a path, or inline YAML
        try:
            return str(recipe_path(value))
        except ValueError as err:
            print(f"lightning-gd: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in _CONFIG_FLAGS:
            out.append(arg)
            value = next(it, None)
            if value is not None:
                out.append(resolve(value))
        elif arg.startswith("--config="):
            out.append("--config=" + resolve(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def _print_recipes(names: Sequence[str] = ()) -> None:
    """List the recipes; with names, print each one's header (how to run it and its variants)."""
    if names:
        for name in names:
            try:
                path = recipe_path(name)
            except ValueError as err:
                print(f"lightning-gd: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
            lines = path.read_text(encoding="utf-8").splitlines()
            end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
            print(f"{path.stem} ({path}):")
            for line in lines[:end]:
                print(line.removeprefix("#").removeprefix(" "))
        return
    entries = recipes()
    width = max((len(n) for n in entries), default=0)
    print("Built-in recipes (run one with `lightning-gd fit --config NAME`; `lightning-gd recipes NAME` shows its")
    print("header: the commands, the variants and what they need):")
    for name, description in entries.items():
        print(f"  {name:<{width}}  {description}")


def _prepare_text(argv: Sequence[str]) -> None:
    import argparse

    from lightning_gd.recipes.prepare_text import prepare_text

    parser = argparse.ArgumentParser(
        prog="lightning-gd prepare-text",
        description="Tokenize text files into a litdata optimized dataset (DIR/train, DIR/val) for"
        " TokenStreamDataModule. With no INPUT: the Python standard library's sources.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="files or directories (default: the stdlib)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", metavar="tokenizer.json", help="a Hugging Face tokenizer (default: bytes)")
    parser.add_argument("--glob", default="**/*.txt", help="files to take inside directory inputs")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of files held out (by path hash)")
    parser.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ns = parser.parse_args(list(argv))
    try:
        info = prepare_text(ns.inputs, ns.output, ns.tokenizer, ns.glob, ns.val_fraction, ns.num_workers)
    except ValueError as err:
        parser.error(str(err))
    print(
        f"lightning-gd: wrote {ns.output}/train and {ns.output}/val ({info.kind} tokens, vocabulary {info.vocab_size})"
    )


def _print_optimizers() -> None:
    from lightning_gd.optim import OptimizerRecipe

    entries = OptimizerRecipe.catalog()
    width = max(len(n) for n in entries)
    print("Optimizer recipes (`OptimizerRecipe.from_name(NAME)`, or `--model.optimizer_recipe NAME`):")
    for name, description in entries.items():
        print(f"  {name:<{width}}  {description}")


def _print_compressors() -> None:
    from lightning_gd.compression import COMPRESSORS

    print("Compressed-DDP strategies (use one with `--trainer.strategy ddp_NAME`):")
    for name, entry in COMPRESSORS.items():
        options = ", ".join(f"{k}={v}" for k, v in entry.options.items()) or "-"
        print(f"  ddp_{name:<10} {options:<26} {entry.description}")
    print(
        "Every compressor also takes warmup_steps, warmup_dtype (float32 | bfloat16: the dense warm-up steps in bf16)"
        " and error_feedback; top-k and random-k add momentum_correction, density_warmup_steps and"
        " density_warmup_start. Below a few Gbit/s: --trainer.strategy lightning_gd.strategies.CompressedDDPStrategy"
        " --trainer.strategy.compressor powersgd --trainer.strategy.warmup_dtype bfloat16 (benchmarks/RESULTS.md)."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-gd`` and ``python -m lightning_gd``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["prepare-text"]:
        _prepare_text(args[1:])
        return
    if args[:1] == ["recipes"]:
        _print_recipes(args[1:])
        return
    if args[:1] == ["compressors"]:
        _print_compressors()
        return
    if args[:1] == ["optimizers"]:
        _print_optimizers()
        return
    if args[:1] == ["analyze"]:
        from lightning_gd.analysis import main as analyze_main

        analyze_main(args[1:])
        return
    # The arguments are passed explicitly (recipe names resolved); LightningCLI warns when it also sees them in
    # sys.argv, so hide them from it while it parses.
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        LightningGDCLI(args=_resolve_config_names(args))
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
