"""The progress bar's totals after a mid-epoch resume."""

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_gd.callbacks import ResumeProgressBar
from tests.helpers.models import TinyClassifier, classification_loader


def _fit(tmp_path, max_steps, ckpt_path=None, accumulate=1):
    trainer = Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[ResumeProgressBar()],
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(TinyClassifier(), classification_loader(n=160, batch_size=16), ckpt_path=ckpt_path)  # 10 batches
    bar = trainer.progress_bar_callback
    assert isinstance(bar, ResumeProgressBar)
    return trainer, bar.train_progress_bar


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable.*")
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_resumed_run_counts_from_where_it_stopped(tmp_path, accumulate):
    # Steps 0-3 (4 batches with accumulation 2: 3 x 2), then a resume to step 6: Lightning's own bar read "6/3".
    trainer, bar = _fit(tmp_path, 3 if accumulate == 1 else 2, accumulate=accumulate)
    done = 3 if accumulate == 1 else 4  # batches of the first run
    assert (bar.n, bar.total) == (done, done)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    max_steps = 6 if accumulate == 1 else 4
    _, bar = _fit(tmp_path, max_steps, ckpt_path=tmp_path / "mid.ckpt", accumulate=accumulate)
    assert (bar.initial, bar.n, bar.total) == (done, 6 if accumulate == 1 else 8, 6 if accumulate == 1 else 8)


def test_it_is_lightnings_tqdm_bar():
    assert issubclass(ResumeProgressBar, TQDMProgressBar)
