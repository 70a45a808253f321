"""Vision recipes through the real command line: the ImageNet recipes on a generated tiny ImageFolder, the
digits quickstart with its two PNGs, and the errors a person meets first (missing data, missing extra)."""

import csv
import re
import sys

import pytest
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.cli import main
from lightning_gd.recipes import ImageFolderDataModule, recipes
from lightning_gd.recipes.image_folder import make_tiny_image_folder

_QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _destroy_process_group():
    yield
    if dist.is_initialized():  # ConAdv is a DDP strategy: one device still makes a process group
        dist.destroy_process_group()


def _rows(run_dir):
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def _logged(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_imagenet_conadv_recipe_trains_on_a_generated_tiny_image_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            "resnet50-conadv-32k",
            *_QUIET,
            "--data.init_args.data_dir",
            str(tmp_path / "tiny"),
            "--data.init_args.generate_tiny",
            "true",
            "--data.init_args.image_size",
            "32",
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.num_workers",
            "0",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.precision",
            "32-true",
            "--trainer.max_steps",
            "2",
            "--trainer.accumulate_grad_batches",
            "2",
            "--trainer.benchmark",
            "false",
            "--trainer.log_every_n_steps",
            "1",
            "--model.init_args.num_classes",
            "3",
            "--model.init_args.model_name",
            "resnet10t",
        ]
    )  # fmt: skip  (a small timm ResNet: seconds on CPU)
    assert (tmp_path / "tiny" / "train" / "class_000").is_dir()
    rows = _rows(tmp_path / "runs" / "resnet50-conadv-32k")
    assert len(_logged(rows, "conadv/adv_loss")) >= 2 and len(_logged(rows, "train/loss")) >= 2
    assert _logged(rows, "val/acc1") and _logged(rows, "val/acc3")  # top-k capped at the 3 classes
    # LARS from the lars-imagenet recipe at 32K: lr 31.2 after the first of 25 * 40 warm-up steps.
    lrs = _logged(rows, "lr-Lars/pg1")
    assert lrs[0] == pytest.approx(31.2 / 1001)
    assert _logged(rows, "train/samples")  # ThroughputMonitor counts images


def test_imagenet_recipes_are_listed_and_the_missing_folder_fails_before_training(tmp_path, capsys):
    assert {"resnet50-lars-4k", "resnet50-lars-32k", "resnet50-lamb", "resnet50-conadv-32k",
            "quickstart-vision"} <= set(recipes())  # fmt: skip
    with pytest.raises(MisconfigurationException, match=r"ImageFolder root .*missing.* not found.*train/<class>"):
        ImageFolderDataModule(str(tmp_path / "missing"))
    (tmp_path / "nosplit").mkdir()
    with pytest.raises(MisconfigurationException, match="has no 'train' folder"):
        ImageFolderDataModule(str(tmp_path / "nosplit"))
    # Through the CLI: one line at instantiation, before any training step.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "resnet50-lars-4k", "--data.init_args.data_dir", str(tmp_path / "missing"),
              "--trainer.accelerator", "cpu", "--trainer.devices", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search("lightning-gd: error: .*ImageFolder root .* not found", err), err


def test_tiny_image_folder_goes_through_timm_transforms(tmp_path):
    make_tiny_image_folder(tmp_path / "d", classes=2, per_class=2, size=20)
    data = ImageFolderDataModule(str(tmp_path / "d"), image_size=16, batch_size=2, num_workers=0)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert tuple(x.shape) == (2, 3, 16, 16) and set(y.tolist()) <= {0, 1}
    assert len(data.val_set) == 2 and -3 < float(x.mean()) < 3  # normalized


@pytest.mark.slow
def test_quickstart_vision_short_run_writes_both_pngs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "quickstart-vision", *_QUIET, "--trainer.max_steps", "4",
          "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
          "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
          "--trainer.callbacks.every_n_steps", "1", "--data.init_args.batch_size", "32"])  # fmt: skip
    run = next((tmp_path / "runs" / "quickstart-vision").glob("version_*"))
    for png in ("conadv_curves.png", "adversarial_examples.png"):
        assert (run / png).stat().st_size > 10_000, png
    rows = _rows(run)
    assert _logged(rows, "conadv/staleness")[-1] == 1.0
    assert _logged(rows, "val/acc1") and _logged(rows, "conadv/adv_accuracy")


def test_missing_vision_extra_is_one_line_with_the_install_command(monkeypatch):
    from lightning_gd.recipes.digits import DigitsDataModule

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as exit_info:
        DigitsDataModule()
    message = str(exit_info.value.code)
    assert 'pip install "lightning-gd[vision]"' in message and "\n" not in message
