"""Exact resume of every built-in recipe from a mid-epoch checkpoint, through the real command line.

Each recipe runs 2N steps uninterrupted and again resumed from its step-N checkpoint (an epoch ends between N
and 2N, with dropout on); weights, optimizer, scheduler and callback state and the logged metrics after step N
must be bit-identical. New recipes in ``lightning_gd/recipes/configs/`` are picked up by the parametrization.
"""

import dataclasses
import shutil
import warnings

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.recipes.recipe_tag import RecipeTag
from lightning_gd.recipes.registry import recipes
from tests.helpers.resume import _working_dir, first_run, resume_and_compare, run_fit

STEPS = 5  # see tests/helpers/resume.py: the step-5 checkpoint is mid-epoch in epoch 1 or 2


@pytest.fixture(scope="module")
def quickstart_first_run(tmp_path_factory):
    """The issue's case: checkpoints by ``every_n_train_steps`` (saved before that step's validation)."""
    tmp = tmp_path_factory.mktemp("quickstart_every_n")
    return first_run("quickstart", tmp, steps=STEPS, after_validation=False), tmp


@pytest.mark.parametrize("recipe", sorted(recipes()))
def test_every_recipe_resumes_bit_identically(recipe, tmp_path):
    """Every shipped recipe, shrunk by tests/helpers/resume.py's per-class tiny settings (a recipe with a data or
    model class the harness cannot shrink fails here until its tiny settings are added)."""
    first = first_run(recipe, tmp_path, steps=STEPS)  # checkpoints after validation, like last.ckpt
    result = resume_and_compare(first, tmp_path)
    assert result.tensors_compared > 10 and result.metric_values_compared > 0
    if recipe == "quickstart":  # the recipe's stateful callbacks took part in the comparison
        assert any(name.startswith("MetricPlotter") for name in result.callbacks_compared)
        assert any(name.startswith("SharpnessTracker") for name in result.callbacks_compared)


def test_quickstart_vision_resumes_bit_identically_without_conadv(tmp_path):
    # ConAdv's look-ahead keeps its own position; without it the digits loader's own position must carry the resume.
    first = first_run("quickstart-vision", tmp_path, steps=STEPS, extra=["--trainer.strategy", "auto"])
    ckpt = torch.load(first.checkpoint(STEPS), map_location="cpu", weights_only=False)
    assert "_num_yielded" in ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]  # the loader's own state
    result = resume_and_compare(first, tmp_path)
    assert result.tensors_compared > 10 and result.metric_values_compared > 0


def test_issue_command_resumes_bit_identically_with_another_worker_count(quickstart_first_run):
    # Saved with num_workers=0, resumed with one worker process: the position carries over exactly.
    first, tmp = quickstart_first_run
    ckpt = torch.load(first.checkpoint(STEPS), map_location="cpu", weights_only=False)
    position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert ckpt["epoch"] == 1 and position["_num_yielded"] == 1  # mid-epoch, after the first epoch
    assert ckpt["TextCorpusDataModule"]["settings"]["seq_len"] == 16
    assert ckpt["callbacks"]["RecipeTag"] == {"recipe": "quickstart"}  # the CLI tags every fit with its recipe
    result = resume_and_compare(first, tmp, resume_extra=["--data.init_args.num_workers", "1"], name="workers")
    assert result.tensors_compared > 10 and result.metric_values_compared > 0


def test_checkpoint_of_the_earlier_loader_format_resumes_bit_identically(quickstart_first_run):
    # Checkpoints written before the position sampler hold only torchdata's own count: strip our sampler's entry
    # from a checkpoint to get exactly that format, and resume it.
    first, tmp = quickstart_first_run
    old_dir = tmp / "old_format"
    old_dir.mkdir()
    ckpt = torch.load(first.checkpoint(STEPS), map_location="cpu", weights_only=False)
    position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position["_sampler_iter_state"].pop("sampler_state")["lightning_gd_samples_read"] == 4
    torch.save(ckpt, old_dir / first.checkpoint(STEPS).name)
    shutil.copy(first.checkpoint(2 * STEPS), old_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = resume_and_compare(dataclasses.replace(first, ckpt_dir=old_dir), tmp, name="old_format_run")
    assert not [w for w in caught if "TextCorpusDataModule" in str(w.message)]  # no "position lost" warning
    assert result.tensors_compared > 10 and result.metric_values_compared > 0


def _resume(first, tmp, ckpt_path, extra=(), name="bad"):
    with _working_dir(tmp):
        return run_fit(first.recipe, [*first.args, *extra], tmp / name, first.steps, ckpt_path=str(ckpt_path))


def test_checkpoint_with_other_batch_size_is_refused_naming_it(quickstart_first_run):
    first, tmp = quickstart_first_run
    with pytest.raises(MisconfigurationException, match=r"batch_size=4 -> 2"):
        _resume(first, tmp, first.checkpoint(STEPS), ["--data.init_args.batch_size", "2"])
    # On purpose: resume_mismatch='warn' continues with one warning, from the beginning of the epoch's data.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _resume(
            first,
            tmp,
            first.checkpoint(STEPS),
            ["--data.init_args.batch_size", "2", "--data.init_args.resume_mismatch", "warn"],
            name="warned",
        )
    ours = [str(w.message) for w in caught if "TextCorpusDataModule" in str(w.message)]
    assert len(ours) == 1 and "batch_size=4 -> 2" in ours[0] and "restarts" in ours[0], ours
    assert trainer.global_step == 2 * STEPS


@pytest.mark.parametrize("also_data_module_entry", [False, True])
def test_old_checkpoint_without_loader_state_warns_once_and_restarts_the_epoch(
    quickstart_first_run, also_data_module_entry
):
    first, tmp = quickstart_first_run
    old = torch.load(first.checkpoint(STEPS), map_location="cpu", weights_only=False)
    del old["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # as written before the loaders were stateful
    if also_data_module_entry:  # nor the data module's entry (RNG states, data settings)
        del old["TextCorpusDataModule"]
    name = f"old{int(also_data_module_entry)}"
    path = tmp / f"{name}.ckpt"
    torch.save(old, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _resume(first, tmp, path, name=name)
    ours = [str(w.message) for w in caught if "TextCorpusDataModule" in str(w.message)]
    assert len(ours) == 1 and "no data-loader position" in ours[0] and "beginning of the epoch" in ours[0], ours
    assert trainer.global_step == 2 * STEPS
    # It restarted the epoch: the resumed weights differ from the uninterrupted run's.
    a = torch.load(first.checkpoint(2 * STEPS), map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(tmp / name / f"step={2 * STEPS}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_recipe_warns_naming_both():
    with pytest.warns(UserWarning, match=r"checkpoint of recipe 'llama-tiny' in a run of recipe 'quickstart'"):
        RecipeTag("quickstart").load_state_dict({"recipe": "llama-tiny"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RecipeTag("quickstart").load_state_dict({"recipe": "quickstart"})  # the same recipe: silent
