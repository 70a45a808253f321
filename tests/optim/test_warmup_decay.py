import math
import re

import pytest
import torch

from lightning_gd.optim import WarmupCosineLR, WarmupDecayLR


def _lrs(n, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupDecayLR(opt, **kw)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_hand_computed_schedule():
    lrs = _lrs(12, warmup_steps=3, total_steps=11, min_lr_ratio=0.1)
    assert lrs[:3] == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    # cosine over the 8 steps after warm-up: step 3 is the peak, step 11 the floor
    expect = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 8)) for s in range(3, 12)]
    assert lrs[3:] == pytest.approx(expect)
    assert lrs[3] == pytest.approx(1.0) and lrs[11] == pytest.approx(0.1)


def test_fractional_warmup_and_late_total_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupDecayLR(opt, warmup_steps=0.1)  # total unknown yet
    sched.set_total_steps(100)  # 10 warm-up steps
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 / 11)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)


def test_resume_from_state_dict_continues_the_schedule():
    full = _lrs(20, warmup_steps=4, total_steps=20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupDecayLR(opt, warmup_steps=4, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = WarmupDecayLR(opt2, warmup_steps=4, total_steps=20)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    resumed = []
    for _ in range(13):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(full[7:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": -1}, "`warmup_steps` must be a finite number >= 0, got -1"),
        ({"warmup_steps": 1.5}, "`warmup_steps` as a fraction of `total_steps` must be in [0, 1), got 1.5"),
        ({"total_steps": 0}, "`total_steps` must be a finite number >= 1, got 0"),
        ({"min_lr_ratio": 2.0}, "`min_lr_ratio` must be in [0, 1], got 2.0"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=re.escape(match)):
        WarmupDecayLR(opt, **kwargs)


def test_set_total_steps_names_the_bad_value():
    sched = WarmupDecayLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    with pytest.raises(ValueError, match=re.escape("`total_steps` must be a finite number >= 1, got -5")):
        sched.set_total_steps(-5)


@pytest.mark.parametrize(
    ("kwargs", "after_warmup"),
    [
        # W = 2, S = 10: progress p = (s - 2) / 8 for s = 2..10, floor r = 0.2
        ({"decay": "linear"}, [0.2 + 0.8 * (1 - (s - 2) / 8) for s in range(2, 11)]),
        ({"decay": "polynomial", "power": 2.0}, [0.2 + 0.8 * (1 - (s - 2) / 8) ** 2 for s in range(2, 11)]),
        # wsd with D = 0.25: f = 1 up to p = 0.75 (s = 8), then (1 - p) / 0.25: 0.5 at s = 9, 0 at s = 10
        ({"decay": "wsd", "decay_fraction": 0.25}, [1.0] * 7 + [0.2 + 0.8 * 0.5, 0.2]),
        ({"decay": "constant"}, [1.0] * 9),
    ],
)
def test_decay_shapes_by_hand(kwargs, after_warmup):
    lrs = _lrs(11, warmup_steps=2, total_steps=10, min_lr_ratio=0.2, **kwargs)
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lrs[2:] == pytest.approx(after_warmup)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": "cosin"}, "valid names: cosine, linear"),
        ({"power": 0.0}, "power"),
        ({"decay_fraction": 0.0}, "decay_fraction"),
    ],
)
def test_bad_decay_arguments(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        WarmupDecayLR(opt, **kwargs)


def test_the_earlier_name_still_works_in_code_checkpoints_and_yaml(tmp_path, monkeypatch):
    # WarmupCosineLR is the earlier name: the same schedule, and a state saved under it loads into WarmupDecayLR.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = WarmupCosineLR(opt, warmup_steps=2, total_steps=10, decay="linear")
    assert isinstance(old, WarmupDecayLR)
    for _ in range(5):
        opt.step()
        old.step()
    new = WarmupDecayLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), warmup_steps=2, total_steps=10)
    new.load_state_dict(old.state_dict())
    assert new.decay == "linear" and new.get_last_lr() == old.get_last_lr()
    from lightning_gd.cli import LightningGDCLI, _resolve_config_names

    monkeypatch.chdir(tmp_path)
    for path in ("WarmupCosineLR", "lightning_gd.optim.warmup_cosine.WarmupCosineLR"):
        scheduler = f"{{class_path: {path}, init_args: {{warmup_steps: 7}}}}"
        args = _resolve_config_names(["--config", "quickstart", "--model.lr_scheduler", scheduler])
        cli = LightningGDCLI(args=args, run=False)
        built = cli.model.lr_scheduler_factory(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
        assert type(built) is WarmupCosineLR and built.warmup_steps == 7
