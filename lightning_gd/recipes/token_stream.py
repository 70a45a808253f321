"""Stream next-token windows from a litdata optimized dataset (``lightning-gd prepare-text``).

litdata's ``StreamingDataset`` / ``StreamingDataLoader`` (Lightning's streaming-data engine) shard the chunks
across ranks and nodes, shuffle deterministically by seed, read local directories or any URL litdata accepts
(``s3://...``, ``gs://...`` with the usual credentials), and keep a loader ``state_dict`` that Lightning
stores in the checkpoint, so a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_gd.recipes.prepare_text import TokenizerInfo, read_tokenizer_info
from lightning_gd.utils.checks import check_positive_int
from lightning_gd.utils.rng import gather_rng_states, set_rng_states

__all__ = ["TokenStreamDataModule"]

_PREPARE = "lightning-gd prepare-text INPUT... --output DIR"
_POSITION_KEYS = ("train_dir", "seq_len", "batch_size", "seed", "shuffle")  # what the loader position refers to


def _is_url(path: str) -> bool:
    return "://" in path


def _check_optimized(path: str, argument: str) -> None:
    """A local directory must hold litdata's ``index.json``; URLs are checked by litdata when read."""
    if _is_url(path):
        return
    if not os.path.isfile(os.path.join(path, "index.json")):
        raise MisconfigurationException(
            f"`{argument}`={path!r} is not a litdata optimized dataset (no index.json). Make one with `{_PREPARE}`"
            f" (its `DIR/train` and `DIR/val`)."
        )


def _collate(windows: list[Tensor]) -> tuple[Tensor, Tensor]:
    x = torch.stack([w[:-1] for w in windows]).long()  # (B, T)
    y = torch.stack([w[1:] for w in windows]).long()  # (B, T)
    return x, y


class TokenStreamDataModule(LightningDataModule):
    """Windows of ``seq_len`` tokens (plus the next token as target) streamed from prepared token data.

    The data comes from ``lightning-gd prepare-text`` (``litdata.optimize`` with ``TokensLoader``); each
    sample is ``seq_len + 1`` consecutive tokens, batches are ``(inputs, targets)`` of shape (B, T). Training
    windows are shuffled by ``seed`` (the same order on every run), and litdata gives every rank its own
    share of the chunks. The loaders are litdata's ``StreamingDataLoader``, whose position Lightning saves in
    the checkpoint: a run resumed mid-epoch continues with the very next batch. The data module's own checkpoint
    entry holds every rank's global RNG states (dropout draws from them), put back before the first resumed
    step, and the settings the position refers to: a checkpoint with another window, batch size, seed or
    dataset gets one warning naming the difference.

    Args:
        train_dir: The prepared ``train`` split: a local directory or a URL litdata reads (``s3://bucket/train``).
        val_dir: The ``val`` split; ``None``: ``<train_dir>/../val`` when it exists, else no validation.
        seq_len: Window length T.
        batch_size: Windows per batch (per device).
        seed: Seed of the shuffle.
        num_workers: Loader worker processes.
        shuffle: Shuffle training windows (validation is never shuffled).

    Raises:
        MisconfigurationException: bad arguments, or a local directory that is not a litdata optimized dataset
            (the message names the command that makes one).

    Example::

        # lightning-gd prepare-text ~/corpus --output data/corpus
        data = TokenStreamDataModule("data/corpus/train", seq_len=512, batch_size=8)
        trainer.fit(CausalLMModule(preset="125m", block_size=512), datamodule=data)
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        seed: int = 1234,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("seq_len", seq_len, error=MisconfigurationException)
        check_positive_int("batch_size", batch_size, error=MisconfigurationException)
        check_positive_int("num_workers", num_workers, minimum=0, error=MisconfigurationException)
        train_dir = str(train_dir)
        _check_optimized(train_dir, "train_dir")
        if val_dir is None and not _is_url(train_dir):
            sibling = os.path.join(os.path.dirname(os.path.abspath(train_dir)), "val")
            val_dir = sibling if os.path.isfile(os.path.join(sibling, "index.json")) else None
        if val_dir is not None:
            _check_optimized(str(val_dir), "val_dir")
        self.train_dir, self.val_dir = train_dir, None if val_dir is None else str(val_dir)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.num_workers, self.shuffle = num_workers, shuffle
        self.tokenizer: TokenizerInfo | None = None if _is_url(train_dir) else read_tokenizer_info(train_dir)
        self._pending_rng: dict[str, Any] | None = None

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size of the prepared data (``None`` when unknown, e.g. for URLs)."""
        return None if self.tokenizer is None else self.tokenizer.vocab_size

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        config = getattr(module, "config", None)
        model_vocab = getattr(config, "vocab_size", None)
        if self.vocab_size is not None and model_vocab is not None and self.vocab_size > model_vocab:
            raise MisconfigurationException(
                f"The data's vocabulary ({self.vocab_size} tokens, {self.tokenizer.kind}) is larger than the model's"
                f" vocab_size={model_vocab}: set the model's vocab_size (e.g. --model.overrides.vocab_size"
                f" {self.vocab_size})."
            )
        block = getattr(config, "block_size", None)
        if block is not None and self.seq_len > block:
            raise MisconfigurationException(
                f"`seq_len`={self.seq_len} exceeds the model's block_size={block}:"
                f" set --model.block_size {self.seq_len}"
            )

    def _settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _POSITION_KEYS}

    @override
    def state_dict(self) -> dict[str, Any]:
        """The data settings and every rank's global RNG states (a collective under DDP)."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return {"settings": self._settings(), "rng": gather_rng_states(world_size)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("settings", {})
        changed = [f"{k}={saved[k]!r} -> {v!r}" for k, v in self._settings().items() if k in saved and saved[k] != v]
        if changed:
            rank_zero_warn(
                f"TokenStreamDataModule: the checkpoint was saved with other data settings ({', '.join(changed)};"
                " checkpoint -> this run): the restored loader position refers to other data."
            )
        rng = state_dict.get("rng") or []
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self._pending_rng = rng[rank] if rank < len(rng) else None

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._pending_rng is not None and self.trainer is not None and self.trainer.training:
            set_rng_states(self._pending_rng)  # the RNG as the uninterrupted run had it before this step
            self._pending_rng = None
        return batch

    def _loader(self, path: str, shuffle: bool) -> Any:
        from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

        dataset = StreamingDataset(
            path, item_loader=TokensLoader(block_size=self.seq_len + 1), shuffle=shuffle, seed=self.seed,
            drop_last=True,
        )  # fmt: skip
        if len(dataset) == 0:
            raise MisconfigurationException(f"{path!r} holds fewer than seq_len + 1 = {self.seq_len + 1} tokens")
        return StreamingDataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=_collate, drop_last=True
        )

    def train_dataloader(self) -> Any:
        return self._loader(self.train_dir, self.shuffle)

    def val_dataloader(self) -> Any:
        if self.val_dir is None:
            rank_zero_info("TokenStreamDataModule: no val split; validation is skipped.")
            return []
        return self._loader(self.val_dir, shuffle=False)
