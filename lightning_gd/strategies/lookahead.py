"""A dataloader wrapper that yields the batches in order and lets its owner look ahead (``ConAdvStrategy``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["LookaheadLoader"]


class LookaheadLoader:
    """Wraps a training dataloader: yields its batches in order and lets a strategy peek ahead.

    Batches pulled early are kept and yielded when their turn comes, so the loop sees exactly the original
    sequence. It is resumable (Lightning's ``state_dict`` / ``load_state_dict`` dataloader protocol): the state is
    the number of batches trained on in the current epoch (``consumed``, which the owner sets as batches are
    trained on), and a mid-epoch resume skips that many batches, so a resumed run sees the batches of the
    uninterrupted one. A loader with a ``seek(batches)`` method (the recipes' ``ResumableDataModule`` loaders)
    skips them without reading them. Any other attribute (``sampler``, ``dataset``, ...) is the wrapped loader's.

    Args:
        loader: The dataloader to wrap.
        epoch_fn: The current epoch (``lambda: trainer.current_epoch``), read when an epoch's iterator starts.

    Example::

        # not run: a template of ConAdvStrategy's use, inside a Trainer
        lookahead = LookaheadLoader(train_loader, lambda: trainer.current_epoch)
        for i, batch in enumerate(lookahead):
            upcoming = lookahead.peek(i + 1)   # the next batch, or None at the end of the epoch
            lookahead.consumed = i + 1
    """

    def __init__(self, loader: Any, epoch_fn: Callable[[], int]) -> None:
        self.loader = loader
        self._epoch_fn = epoch_fn
        self._iterator: Any = None
        self._buffer: dict[int, Any] = {}
        self._pulled = 0
        self._yielded = 0
        self._exhausted = False
        self.epoch = 0
        self.consumed = 0
        self._skip: tuple[int, int] | None = None

    def __getattr__(self, name: str) -> Any:  # sampler, batch_sampler, dataset, ... (set_epoch etc.)
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> LookaheadLoader:
        self._buffer.clear()
        self._pulled = self._yielded = self.consumed = 0
        self._exhausted = False
        self.epoch = self._epoch_fn()
        skip, self._skip = self._skip, None
        count = skip[1] if skip is not None and skip[0] == self.epoch else 0
        seek = getattr(self.loader, "seek", None)
        if count and seek is not None:  # a resumable loader starts after `count` batches without reading them
            self._pulled = seek(count)
            count = 0
        self._iterator = iter(self.loader)
        for _ in range(count):  # any other loader: read and drop the batches already trained on
            if not self._pull():
                break
            self._buffer.pop(self._pulled - 1)
        self._yielded = self.consumed = self._pulled
        return self

    def __next__(self) -> Any:
        if self._yielded not in self._buffer and not self._pull():
            raise StopIteration
        item = self._buffer.pop(self._yielded)
        self._yielded += 1
        return item

    def _pull(self) -> bool:
        if self._exhausted or self._iterator is None:
            return False
        try:
            self._buffer[self._pulled] = next(self._iterator)
        except StopIteration:
            self._exhausted = True
            return False
        self._pulled += 1
        return True

    def peek(self, index: int) -> Any | None:
        """The batch at ``index`` of the current epoch, pulled early if needed; ``None`` past the end."""
        if index < self._yielded:
            return None
        while self._pulled <= index:
            if not self._pull():
                return None
        return self._buffer[index]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = (int(state["epoch"]), int(state["consumed"]))
