"""Stream next-token windows from a litdata optimized dataset (``lightning-gd prepare-text``).

litdata's ``StreamingDataset`` / ``StreamingDataLoader`` (Lightning's streaming-data engine) shard the chunks
across ranks and nodes, shuffle deterministically by seed, read local directories or any URL litdata accepts
(``s3://...``, ``gs://...`` with the usual credentials), and keep a loader ``state_dict`` that Lightning
stores in the checkpoint, so a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_gd._compat import litdata_loader_epoch
from lightning_gd.recipes.prepare_text import TokenizerInfo, read_tokenizer_info
from lightning_gd.recipes.stateful_data import ResumeMismatch, ResumePlan, StatefulDataModule
from lightning_gd.utils.checks import check_positive_int

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


@functools.cache
def _planned_stream_loader() -> type:
    """litdata's ``StreamingDataLoader`` following a :class:`~lightning_gd.recipes.stateful_data.ResumePlan`.

    Built on first use: litdata is imported only when a stream is read.
    """
    from litdata import StreamingDataLoader

    class _PlannedStreamingDataLoader(StreamingDataLoader):
        resume_plan: ResumePlan | None = None
        position_loaded: bool = False

        @override
        def load_state_dict(self, obj: dict[str, Any]) -> None:
            self.position_loaded = True
            if self.resume_plan is not None and self.resume_plan.restart_epoch:
                # Other data settings: litdata's position refers to other data. Keep only its epoch, so that the
                # next iterator (which counts one epoch on) starts that epoch's shuffle from its beginning.
                self.current_epoch = litdata_loader_epoch(obj) - 1
                return
            super().load_state_dict(obj)

    return _PlannedStreamingDataLoader


class TokenStreamDataModule(StatefulDataModule):
    """Windows of ``seq_len`` tokens (plus the next token as target) streamed from prepared token data.

    The data comes from ``lightning-gd prepare-text`` (``litdata.optimize`` with ``TokensLoader``); each
    sample is ``seq_len + 1`` consecutive tokens, batches are ``(inputs, targets)`` of shape (B, T). Training
    windows are shuffled by ``seed`` (the same order on every run), and litdata gives every rank its own
    share of the chunks. The loaders are litdata's ``StreamingDataLoader``, whose position Lightning saves in
    the checkpoint: a run resumed mid-epoch continues with the very next batch. The data module's own checkpoint
    entry holds every rank's global RNG states (dropout draws from them), put back before the first resumed
    step, and the settings the position refers to, checked on resume as every resumable data module does
    (:class:`~lightning_gd.recipes.stateful_data.StatefulDataModule`): a checkpoint with another window, batch
    size, seed, shuffle or dataset is refused naming the difference, or with ``resume_mismatch="warn"`` continues
    with one warning from the beginning of the epoch's data.

    Args:
        train_dir: The prepared ``train`` split: a local directory or a URL litdata reads (``s3://bucket/train``).
        val_dir: The ``val`` split; ``None``: ``<train_dir>/../val`` when it exists, else no validation.
        seq_len: Window length T.
        batch_size: Windows per batch (per device).
        seed: Seed of the shuffle.
        num_workers: Loader worker processes.
        shuffle: Shuffle training windows (validation is never shuffled).
        resume_mismatch: What a checkpoint saved with other data settings does: ``"error"`` raises,
            ``"warn"`` warns and starts the epoch's data from its beginning.

    Raises:
        MisconfigurationException: bad arguments, or a local directory that is not a litdata optimized dataset
            (the message names the command that makes one); at resume, a checkpoint saved with other data
            settings (with ``resume_mismatch="error"``).

    Example::

        # not run: needs a prepared dataset (lightning-gd prepare-text)
        # lightning-gd prepare-text ~/corpus --output data/corpus
        data = TokenStreamDataModule("data/corpus/train", seq_len=512, batch_size=8)
        trainer.fit(CausalLMModule(preset="125m", block_size=512), datamodule=data)
    """

    workers_change_note = "litdata spreads the rest of the epoch over the new workers (no window twice, another order)"

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        seed: int = 1234,
        num_workers: int = 0,
        shuffle: bool = True,
        resume_mismatch: ResumeMismatch = "error",
    ) -> None:
        super().__init__(resume_mismatch)
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

    def position_settings(self) -> dict[str, Any]:
        """Split, window, batch size, seed and shuffle: what litdata's saved position refers to."""
        return {key: getattr(self, key) for key in _POSITION_KEYS}

    def _loader(self, path: str, shuffle: bool) -> Any:
        from litdata import StreamingDataset, TokensLoader

        dataset = StreamingDataset(
            path, item_loader=TokensLoader(block_size=self.seq_len + 1), shuffle=shuffle, seed=self.seed,
            drop_last=True,
        )  # fmt: skip
        if len(dataset) == 0:
            raise MisconfigurationException(f"{path!r} holds fewer than seq_len + 1 = {self.seq_len + 1} tokens")
        return _planned_stream_loader()(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=_collate, drop_last=True
        )

    def train_dataloader(self) -> Any:
        return self.track_train_loader(self._loader(self.train_dir, self.shuffle))

    def val_dataloader(self) -> Any:
        if self.val_dir is None:
            rank_zero_info("TokenStreamDataModule: no val split; validation is skipped.")
            return []
        return self._loader(self.val_dir, shuffle=False)
