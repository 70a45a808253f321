import csv
import math
import os
import subprocess
import sys

import lightning.pytorch  # noqa: F401  (first here, Lightning's console log handler keeps the real stderr: first
import pytest  # inside a capsys test, it would keep that test's stream and write to it once closed)
import yaml

from lightning_gd.cli import main
from lightning_gd.recipes import recipe_path, recipes
from tests.helpers.timeouts import scaled_timeout


def test_recipes_lists_quickstart_with_a_description(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["quickstart"])  # not quickstart-vision
    assert "LLaMA" in line and recipes()["quickstart"] in line


def test_python_m_runs_the_same_command():
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_gd", "recipes"], capture_output=True, text=True, timeout=scaled_timeout(60)
    )
    assert proc.returncode == 0 and "quickstart" in proc.stdout


@pytest.mark.parametrize("listing", ["recipes", "optimizers", "compressors"])
def test_a_listing_piped_into_a_reader_that_left_exits_quietly(listing):
    # `lightning-gd recipes | head -1`, the reader gone before the listing is written: no BrokenPipeError traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lightning_gd", listing], stdout=write_end, stderr=subprocess.PIPE,
            timeout=scaled_timeout(60),
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode()[-500:]


def test_recipe_is_package_data():
    path = recipe_path("quickstart")
    assert path.parent.name == "configs" and path.parent.parent.name == "recipes"
    assert recipe_path("quickstart.yaml") == path


@pytest.mark.parametrize("name", sorted(recipes()))
def test_every_builtin_recipe_parses(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", name, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]
    assert printed["trainer"]["max_steps"] > 0


def _uncommented_keys(text: str) -> list[str]:
    """Keys holding a value (a scalar or a list of scalars) with no comment on their line or the line above.

    ``class_path`` names its class itself, and a mapping's keys are commented at its leaves (litgpt's config hub
    comments every setting; ours comments every value, in line or above).
    """
    lines = text.splitlines()
    missing = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                row = key.start_mark.line
                commented = "#" in lines[row][key.end_mark.column :] or (
                    row > 0 and lines[row - 1].lstrip().startswith("#")
                )
                leaf = isinstance(value, yaml.ScalarNode) or (
                    isinstance(value, yaml.SequenceNode) and all(isinstance(v, yaml.ScalarNode) for v in value.value)
                )
                if leaf and key.value != "class_path" and not commented:
                    missing.append(f"line {row + 1}: {key.value}")
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for value in node.value:
                walk(value)

    walk(yaml.compose(text))
    return missing


@pytest.mark.parametrize("command", ["fit", "analyze"])
def test_the_command_destroys_the_process_group_it_ran_under(command, capsys):
    # Left to the interpreter's exit, gloo's worker threads now and then abort a run that succeeded (exit -6, seen in
    # CI; pytorch/pytorch#179291), and torchrun then restarts the job: the command destroys the group on its way out.
    import torch.distributed as dist

    from tests.helpers.ddp import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit):
            main([command, "--config", "quickstart", "--print_config"])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(recipes()))
def test_every_recipe_key_is_commented(name):
    text = recipe_path(name).read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and len(header[0]) > 20, name  # a description first
    assert f"lightning-gd fit --config {name}" in text, name  # and the command that runs it
    assert _uncommented_keys(text) == [], name


def test_the_comment_check_finds_an_uncommented_key():
    text = "# a recipe\ntrainer:\n  max_steps: 5  # steps\n  devices: 1\n  # the logger\n  logger: false\n"
    assert _uncommented_keys(text) == ["line 4: devices"]


def test_unknown_recipe_prints_available_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "quikstart"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown recipe 'quikstart'" in err and "quickstart" in err


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("trainer:\n  max_stepz: 3\nmodel:\n  class_path: CausalLMModule\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(cfg)])
    assert exit_info.value.code != 0
    assert "max_stepz" in capsys.readouterr().err


def test_quickstart_short_run_writes_the_run_directory(tmp_path, monkeypatch):
    # The quickstart recipe with its curvature callbacks measuring every 3 steps, so that a 6-step run measures
    # twice and draws sharpness.png.
    config = yaml.safe_load(recipe_path("quickstart").read_text())
    curvature = [
        c for c in config["trainer"]["callbacks"] if c["class_path"] in ("HessianTraceMonitor", "SharpnessTracker")
    ]
    assert len(curvature) == 2
    for callback in curvature:
        callback["init_args"]["every_n_steps"] = 3
    curvature[0]["init_args"]["num_probes"] = 3  # few products: the test is about the run directory
    curvature[1]["init_args"]["max_iter"] = 4
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", "quickstart.yaml",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--data.seq_len", "32", "--data.train_windows", "64",
        "--data.val_windows", "8", "--data.batch_size", "4", "--model.overrides", "{block_size: 32, n_layer: 1}",
    ])  # fmt: skip
    run = tmp_path / "runs" / "quickstart" / "version_0"
    names = {p.name for p in run.iterdir()}
    assert {
        "metrics.csv",
        "config.yaml",
        "hparams.yaml",
        "loss_curves.png",
        "sharpness.png",
        "sample.txt",
        "checkpoints",
    } <= names
    assert any(n.startswith("events.out.tfevents") for n in names)  # TensorBoard in the same run directory
    assert (run / "checkpoints" / "last.ckpt").is_file()
    for png in ("loss_curves.png", "sharpness.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    sample = (run / "sample.txt").read_text(encoding="utf-8")
    assert sample.startswith("def ") and len(sample) > len("def ") + 100  # the prompt and 240 sampled bytes
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("hessian/trace", "sharpness/preconditioned_lambda_max"):  # AdamW: P^-1 H (preconditioned="auto")
        measured = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        assert [step for step, _ in measured] == [3, 6], key
        assert all(math.isfinite(v) and v != 0 for _, v in measured), key
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 6
    assert not (tmp_path / "runs" / "quickstart" / "version_1").exists()


# ---------------------------------------------------------------- one-line errors for one-line mistakes
def _start_fails(args, capsys):
    """Run the command with ``args``; return its stderr after it exited with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "--debug" in err, err
    assert len([line for line in err.splitlines() if line.startswith("lightning-gd: error:")]) == 1, err
    return err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.preset", "huge"], ["--model.preset='huge'", "available: tiny, 125m, 350m, 1b"]),
        (["--data.data_dir", "missing"], ["--data.data_dir='missing' does not exist", "leave --data.data_dir out"]),
        (["--model.optimizer_recipe", "adamw-llamma"], ["CausalLMModule (--model)", "'adamw-llamma'", "adamw-llama"]),
        (["--ckpt_path", "nope.ckpt"], ["--ckpt_path 'nope.ckpt' does not exist", "leave --ckpt_path out"]),
    ],
)
def test_a_mistake_gets_one_line_and_leaves_no_run_directory(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    err = _start_fails(["fit", "--config", "quickstart", *args], capsys)
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "runs").exists()


def test_a_missing_checkpoint_names_the_latest_one_and_keeps_the_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    err = _start_fails(["fit", "--config", "quickstart", "--ckpt_path", "runs/quickstart/last.ckpt"], capsys)
    assert "(the latest here: runs/quickstart/version_0/checkpoints/last.ckpt)" in err, err
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart").iterdir()) == ["version_0"]


def test_a_failure_while_setting_up_the_data_removes_the_new_run_directory(tmp_path, monkeypatch, capsys):
    # The loggers create the run directory before the data module's setup() finds the corpus too short.
    monkeypatch.chdir(tmp_path)
    for name in "ab":
        (tmp_path / f"{name}.txt").write_text("x = 1\n" * 10)
    err = _start_fails(["fit", "--config", "quickstart", "--data.data_dir", str(tmp_path)], capsys)
    assert "--data.seq_len=128 is longer than the shortest split" in err, err
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_error_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Unknown Llama preset"):
        main(["fit", "--config", "quickstart", "--model.preset", "huge", "--debug"])
    monkeypatch.setenv("LIGHTNING_GD_DEBUG", "1")
    with pytest.raises(ValueError, match="Unknown Llama preset"):
        main(["fit", "--config", "quickstart", "--model.preset", "huge"])
    assert not (tmp_path / "runs").exists()  # the run directory is removed either way


def test_the_command_uses_the_resume_aware_progress_bar_unless_one_is_configured(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_gd.callbacks import ResumeProgressBar
    from lightning_gd.cli import LightningGDCLI, _resolve_config_names

    monkeypatch.chdir(tmp_path)

    def bar(*extra):
        args = _resolve_config_names(["--config", "quickstart", "--trainer.logger", "false", *extra])
        return LightningGDCLI(args=args, run=False).trainer.progress_bar_callback

    assert type(bar()) is ResumeProgressBar
    assert bar("--trainer.enable_progress_bar", "false") is None
    own = bar("--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate", "5")
    assert type(own) is TQDMProgressBar and own.refresh_rate == 5
