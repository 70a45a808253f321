"""Exact resume under real 2-process gloo DDP: the quickstart with compressed gradients (``ddp_topk``) and a resume
of that checkpoint on another world size (one warning naming the change), and an ImageNet recipe with its ConAdv
strategy and timm augmentation on a tiny ImageFolder."""

import warnings

import pytest
import torch

from tests.helpers.ddp import run_ddp_script
from tests.helpers.resume import _working_dir, run_fit

STEPS = 5  # see tests/helpers/resume.py: the step-5 checkpoint is mid-epoch in epoch 1 or 2


def _ddp_job(tmp_path_factory, strategy, recipe="quickstart", data=()):
    tmp = tmp_path_factory.mktemp(f"resume_{recipe}")
    strategy_args = ["--trainer.strategy", strategy] if strategy else []
    extra = [*data, *strategy_args, "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    results = run_ddp_script(
        f"""
        import dataclasses, os
        from pathlib import Path
        from tests.helpers.ddp import write_result
        from tests.helpers.resume import first_run, resume_and_compare

        work = Path(os.getcwd())
        first = first_run({recipe!r}, work, steps={STEPS}, extra={extra!r})
        result = resume_and_compare(first, work)
        import torch.distributed as dist
        rank = dist.get_rank()
        write_result({{"rank": rank, "world_size": dist.get_world_size(),
                      "result": dataclasses.asdict(result) if result else None,
                      "args": first.args}}, rank)
        """,
        tmp,
        timeout=600,
    )
    return results, tmp


@pytest.fixture(scope="module")
def ddp_quickstart(tmp_path_factory):
    return _ddp_job(tmp_path_factory, "ddp_topk")


def test_two_process_ddp_topk_resumes_bit_identically(ddp_quickstart):
    results, tmp = ddp_quickstart
    _assert_exact(results, tmp)
    ckpt = torch.load(tmp / "a" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    assert any("compress" in str(key).lower() for key in ckpt), "no compression state: not a ddp_topk run"


@pytest.mark.slow
def test_two_process_conadv_imagenet_recipe_resumes_bit_identically(tmp_path_factory):
    # The recipe's own ConAdvStrategy and ImageFolderDataModule (tiny ImageFolder: 12 images, 6 per rank at batch 1,
    # 3 optimizer steps of 2 micro-batches per epoch); 64 px so the last BatchNorm sees 2 x 2 values per channel.
    data = ["--data.init_args.batch_size", "1", "--data.init_args.image_size", "64"]
    results, tmp = _ddp_job(tmp_path_factory, None, recipe="resnet50-conadv-32k", data=data)
    assert [r["world_size"] for r in results] == [2, 2]
    result = results[0]["result"]
    assert result["tensors_compared"] > 10 and result["metric_values_compared"] > 0
    ckpt = torch.load(tmp / "a" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ImageFolderDataModule"]["world_size"] == 2 and len(ckpt["ImageFolderDataModule"]["rng"]) == 2
    assert set(ckpt["conadv"]["ranks"]) == {0, 1}  # every rank's pending adversarial batch


def _assert_exact(results, tmp):
    assert [r["world_size"] for r in results] == [2, 2]
    result = results[0]["result"]  # rank 0 compared the final checkpoints and metrics.csv
    assert result["tensors_compared"] > 10 and result["metric_values_compared"] > 0
    ckpt = torch.load(tmp / "a" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["TextCorpusDataModule"]["world_size"] == 2
    assert len(ckpt["TextCorpusDataModule"]["rng"]) == 2  # every rank's RNG states


def test_resume_on_another_world_size_warns_once_naming_it(ddp_quickstart):
    results, tmp = ddp_quickstart
    args = results[0]["args"][:-6]  # without the DDP arguments, which come last
    assert "ddp" not in args
    args += ["--trainer.strategy", "auto", "--trainer.devices", "1"]
    with _working_dir(tmp), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run_fit("quickstart", args, tmp / "single", STEPS, ckpt_path=str(tmp / "a" / f"step={STEPS}.ckpt"))
    ours = [str(w.message) for w in caught if "TextCorpusDataModule" in str(w.message)]
    assert len(ours) == 1 and "world size 2 on world size 1" in ours[0], ours
    assert trainer.global_step == 2 * STEPS
