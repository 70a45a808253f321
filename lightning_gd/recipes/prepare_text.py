"""Tokenize text files once into a litdata optimized dataset, for :class:`TokenStreamDataModule` to stream.

``lightning-gd prepare-text INPUT... --output DIR`` writes ``DIR/train`` and ``DIR/val`` (files split by a
hash of their path, as :class:`~lightning_gd.recipes.TextCorpusDataModule` does) with ``litdata.optimize``
and its ``TokensLoader`` format, plus ``DIR/tokens.json`` (a description: kind, vocabulary size, dtype).
Tokens are bytes (vocabulary 256) by default, or the ids of a local Hugging Face ``tokenizer.json`` through
the ``tokenizers`` package. With no INPUT the running interpreter's standard library is prepared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_gd.recipes.text_corpus import _in_validation, _stdlib_files
from lightning_gd.utils.checks import check_number, check_positive_int

__all__ = ["TokenizerInfo", "prepare_text", "read_tokenizer_info"]

_META = "tokens.json"  # written next to train/ and val/
_CHUNK_BYTES = "64MB"


@dataclass(frozen=True)
class TokenizerInfo:
    """How a prepared dataset was tokenized: ``kind`` ("bytes" or "hf"), its ``vocab_size`` and token dtype."""

    kind: str
    vocab_size: int
    dtype: str
    tokenizer_path: str | None = None


def _load_hf_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as err:  # an optional dependency: only this feature needs it
        raise ValueError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from err
    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # the library raises plain Exceptions for bad JSON / unknown models
        raise ValueError(f"--tokenizer {path!r} is not a Hugging Face tokenizer.json: {err}") from err


class _Tokenize:
    """``fn`` of ``litdata.optimize``: one file -> one 1-D tensor of token ids (picklable for its workers)."""

    def __init__(self, info: TokenizerInfo) -> None:
        self.info = info
        self._tokenizer: Any = None

    def __call__(self, path: str) -> Any:
        data = Path(path).read_bytes()
        if not data:  # an empty file has no tokens (and torch.frombuffer refuses an empty buffer)
            return
        if self.info.kind == "bytes":
            yield torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
            return
        if self._tokenizer is None:
            self._tokenizer = _load_hf_tokenizer(str(self.info.tokenizer_path))
        ids = self._tokenizer.encode(data.decode("utf-8", errors="replace")).ids
        yield torch.tensor(ids, dtype=torch.int32)


def _collect_files(inputs: Sequence[str | os.PathLike], glob: str) -> tuple[list[Path], dict[Path, Path]]:
    """Every file of ``inputs`` (files, or directories searched with ``glob``) and the root each is under."""
    if not inputs:
        root, files = _stdlib_files()
        return files, dict.fromkeys(files, root)
    files: list[Path] = []
    roots: dict[Path, Path] = {}
    for item in map(Path, inputs):
        if item.is_file():
            files.append(item)
            roots[item] = item.parent
        elif item.is_dir():
            found = sorted(f for f in item.glob(glob) if f.is_file())
            files += found
            roots.update(dict.fromkeys(found, item))
        else:
            raise ValueError(f"input {str(item)!r} does not exist")
    if not files:
        raise ValueError(f"no files match {glob!r} under {[str(i) for i in inputs]}")
    return files, roots


def prepare_text(
    inputs: Sequence[str | os.PathLike] = (),
    output_dir: str | os.PathLike = "data/prepared",
    tokenizer: str | None = None,
    glob: str = "**/*.txt",
    val_fraction: float = 0.05,
    num_workers: int = 1,
) -> TokenizerInfo:
    """Tokenize ``inputs`` into ``output_dir/train`` and ``output_dir/val`` (litdata ``TokensLoader`` format).

    Args:
        inputs: Files or directories; empty: the Python standard library's ``.py`` files.
        output_dir: Where ``train/``, ``val/`` and ``tokens.json`` go (overwritten).
        tokenizer: Path of a Hugging Face ``tokenizer.json``; ``None``: bytes (vocabulary 256).
        glob: Pattern of files inside directory inputs.
        val_fraction: Share of files held out, chosen by a hash of the path relative to its input.
        num_workers: Processes tokenizing in parallel (litdata's workers); a progress bar shows their work.

    Returns:
        The :class:`TokenizerInfo` also written to ``output_dir/tokens.json``.

    Raises:
        ValueError: a tokenizer file that does not parse, a missing input, no files, or a bad argument; all
            before any work starts.

    Example::

        # not run: reads ~/corpus and writes data/corpus (tests/recipes prepare a small corpus)
        prepare_text(["~/corpus"], "data/corpus", glob="**/*.md")  # then TokenStreamDataModule("data/corpus/train")
    """
    from litdata import TokensLoader, optimize

    check_number("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
    check_positive_int("num_workers", num_workers)
    if tokenizer is None:
        info = TokenizerInfo(kind="bytes", vocab_size=256, dtype="uint8")
    else:
        hf = _load_hf_tokenizer(tokenizer)  # refuse a bad file before any work
        info = TokenizerInfo("hf", hf.get_vocab_size(with_added_tokens=True), "int32", str(Path(tokenizer).resolve()))
    files, roots = _collect_files(inputs, glob)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for f in files:
        relative = f.relative_to(roots[f]).as_posix() if f != roots[f] else f.name
        splits["val" if _in_validation(relative, val_fraction) else "train"].append(str(f))
    if not splits["val"]:  # a tiny corpus: keep one file out, so validation has data
        splits["val"].append(splits["train"].pop())
    if not splits["train"]:
        raise ValueError(f"need at least 2 input files to split into train and val, got {len(files)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, paths in splits.items():
        optimize(
            fn=_Tokenize(info), inputs=paths, output_dir=str(out / split), chunk_bytes=_CHUNK_BYTES,
            item_loader=TokensLoader(), num_workers=min(num_workers, len(paths)), mode="overwrite",
            start_method="fork" if os.name == "posix" else None,
        )  # fmt: skip
    (out / _META).write_text(json.dumps(asdict(info), indent=2))
    return info


def read_tokenizer_info(data_dir: str | os.PathLike) -> TokenizerInfo | None:
    """The :class:`TokenizerInfo` beside a prepared split (``DIR/train`` -> ``DIR/tokens.json``), if any."""
    for candidate in (Path(data_dir) / _META, Path(data_dir).parent / _META):
        if candidate.is_file():
            return TokenizerInfo(**json.loads(candidate.read_text()))
    return None
