"""The ``lightning-gd`` command: a LightningCLI that knows the package's built-in recipes.

``lightning-gd fit --config quickstart`` runs a built-in recipe by name (a path works too);
``lightning-gd recipes`` lists them. Every LightningModule and LightningDataModule is accepted
(``class_path``), and every class of ``lightning_gd`` is known by its short name.

This module imports no torch: the listing commands answer at once, and :func:`main` sets the OpenMP defaults
(:func:`~lightning_gd.utils.threads.set_thread_defaults`) before torch starts. :class:`LightningGDCLI` lives in
:mod:`lightning_gd._lightning_cli` and is imported from here on first use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_gd.recipes.registry import recipe_path, recipes
from lightning_gd.utils.threads import set_thread_defaults

if TYPE_CHECKING:
    from lightning_gd._lightning_cli import LightningGDCLI

__all__ = ["LightningGDCLI", "main"]

_CONFIG_FLAGS = ("--config", "-c")
_DEBUG = "LIGHTNING_GD_DEBUG"  # set to 1: a configuration mistake shows its traceback (as --debug does)

_HELP = """\
usage: lightning-gd {fit,validate,test,predict} [--config RECIPE_OR_YAML] [--help] [--debug] [OPTIONS]
       lightning-gd analyze --config RECIPE_OR_YAML --ckpt_path CKPT [--compare CKPT] [--analysis.OPTION VALUE]
       lightning-gd {recipes [NAME ...],optimizers,compressors,prepare-text}

Gradient-descent research tools as PyTorch Lightning plugins: a LightningCLI that runs the built-in recipes by
name, e.g. `lightning-gd fit --config quickstart`.

subcommands:
  fit, validate, test, predict
                 the LightningCLI subcommands (`lightning-gd fit --help` lists every option)
  analyze        a curvature report of a checkpoint: eigenvalues, trace, density, loss landscapes (`--help`)
  recipes        the built-in recipes; `lightning-gd recipes NAME` shows one recipe's commands and variants
  optimizers     the named optimizer recipes (--model.optimizer_recipe NAME)
  compressors    the compressed-DDP strategies (--trainer.strategy ddp_NAME)
  prepare-text   tokenize text files into a litdata dataset for TokenStreamDataModule

environment:
  OMP_WAIT_POLICY, OMP_NUM_THREADS
                 set PASSIVE and the usable cores when unset (torch's OpenMP threads otherwise spin while they
                 wait, which slows a run down several times when another process uses a core)
  LIGHTNING_GD_THREAD_DEFAULTS=0
                 keep torch's own OpenMP defaults
  LIGHTNING_GD_DEBUG=1
                 a configuration mistake shows its traceback (as --debug does), not one line
"""


def __getattr__(name: str) -> Any:
    if name == "LightningGDCLI":  # Lightning (and torch) load on first use only
        from lightning_gd._lightning_cli import LightningGDCLI

        return LightningGDCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from lightning_gd.optim.specs import RECIPES  # the table alone: no torch, no timm

    entries = {name: spec.description for name, spec in RECIPES.items()}
    width = max(len(n) for n in entries)
    print("Optimizer recipes (`OptimizerRecipe.from_name(NAME)`, or `--model.optimizer_recipe NAME`):")
    for name, description in entries.items():
        print(f"  {name:<{width}}  {description}")


def _print_compressors() -> None:
    from lightning_gd.compression.registry import COMPRESSORS

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
    set_thread_defaults(os.environ)  # before torch is imported (a no-op when it already is, as in tests)
    if args in ([], ["-h"], ["--help"]):
        print(_HELP, end="", file=sys.stdout if args else sys.stderr)
        if not args:
            raise SystemExit(2)
        return
    if args[:1] == ["prepare-text"]:
        _prepare_text(args[1:])
        return
    listing = {"recipes": lambda: _print_recipes(args[1:]), "compressors": _print_compressors,
               "optimizers": _print_optimizers}  # fmt: skip
    if args[:1] and args[0] in listing:
        try:
            listing[args[0]]()
            sys.stdout.flush()
        except BrokenPipeError:  # `lightning-gd recipes | head`: the reader left; stop quietly, as `ls` does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if args[:1] == ["analyze"]:
        from lightning_gd.analysis import main as analyze_main

        try:
            analyze_main(args[1:])
        finally:
            _destroy_process_group()
        return
    # The arguments are passed explicitly (recipe names resolved); LightningCLI warns when it also sees them in
    # sys.argv, so hide them from it while it parses.
    from lightning_gd._lightning_cli import LightningGDCLI, StartError

    debug = "--debug" in args or os.environ.get(_DEBUG, "0").strip().lower() not in ("", "0", "false", "no", "off")
    args = [a for a in args if a != "--debug"]
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        LightningGDCLI(args=_resolve_config_names(args), short_errors=not debug)
    except StartError as err:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:  # every rank of a torchrun / DDP job fails the same way: say it once
            print(f"lightning-gd: error: {err}\n(the traceback: add --debug, or set {_DEBUG}=1)", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = saved
        _destroy_process_group()


def _destroy_process_group() -> None:
    """Destroy the job's process group, if any, before the interpreter exits.

    Neither Lightning nor torch does. Gloo's worker threads, still holding finished work when the interpreter
    finalises, then now and then abort the process after a run that succeeded ("terminate called without an active
    exception", exit code -6; pytorch/pytorch#179291), and torchrun counts that as a failure and restarts the job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
