import re

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gd.callbacks import MetricPlotter
from tests.helpers.models import TinyClassifier, classification_loader


def test_plots_train_and_val_curves_to_png_and_tensorboard(tmp_path):
    plotter = MetricPlotter(every_n_steps=2)
    tb = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = Trainer(
        accelerator="cpu", max_steps=12, val_check_interval=4, limit_val_batches=1, logger=[tb],
        callbacks=[plotter], enable_progress_bar=False, enable_checkpointing=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(TinyClassifier(), classification_loader(), classification_loader(n=16))
    assert [s for s, _ in plotter.history["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in plotter.history["val/loss"]] == [4, 8, 12]
    png = tmp_path / "run" / "version_0" / "loss_curves.png"
    assert plotter.last_path == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(str(png.parent), size_guidance={"images": 0}).Reload()
    assert "metrics/loss_curves" in events.Tags()["images"]


def test_history_is_checkpointed(tmp_path):
    plotter = MetricPlotter(metrics=["train/loss"], every_n_steps=1)
    trainer = Trainer(
        accelerator="cpu", max_steps=3, logger=CSVLogger(tmp_path), callbacks=[plotter],
        enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(TinyClassifier(), classification_loader())
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed_plotter = MetricPlotter(metrics=["train/loss"], every_n_steps=1)
    trainer2 = Trainer(
        accelerator="cpu", max_steps=5, logger=CSVLogger(tmp_path), callbacks=[resumed_plotter],
        enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer2.fit(TinyClassifier(), classification_loader(), ckpt_path=ckpt)
    assert [s for s, _ in resumed_plotter.history["train/loss"]] == [1, 2, 3, 4, 5]
    assert resumed_plotter.history["train/loss"][:3] == plotter.history["train/loss"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metrics": []}, "`metrics` must name at least one metric, got []"),
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive integer, got 0"),
        ({"filename": "x.jpg"}, "`filename` must end with .png, got 'x.jpg'"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(kwargs, match):
    with pytest.raises(MisconfigurationException, match=re.escape(match)):
        MetricPlotter(**kwargs)
