"""A quiet CPU ``Trainer`` for tests: no logger, checkpoints, progress bar or model summary unless asked."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer

__all__ = ["quiet_trainer"]


def quiet_trainer(tmp_path: Any = None, **kwargs: Any) -> Trainer:
    """``Trainer(accelerator="cpu", ...)`` writing nothing and printing nothing; ``kwargs`` override any setting.

    ``tmp_path`` becomes ``default_root_dir`` (where checkpoints and logs would go when turned on).

    Example::

        trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[NoiseAnnealing()])
    """
    quiet: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                             "enable_progress_bar": False, "enable_model_summary": False}  # fmt: skip
    if tmp_path is not None:
        quiet["default_root_dir"] = str(tmp_path)
    return Trainer(**{**quiet, **kwargs})
