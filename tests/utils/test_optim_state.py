"""Per-parameter optimizer-state lookup across several optimizers (``lightning_gd.utils.optim_state``)."""

import pytest
import torch
from torch import nn

from lightning_gd.utils.optim_state import adam_moments, is_adam_family, owner_of


def _step(optimizers, params):
    for opt in optimizers:
        opt.zero_grad()
    sum((p**2).sum() for p in params).backward()
    for opt in optimizers:
        opt.step()


def test_each_parameter_gets_the_moments_of_the_optimizer_that_owns_it():
    torch.manual_seed(0)
    gen, disc, head, frozen = (nn.Parameter(torch.randn(3)) for _ in range(4))
    opt_g = torch.optim.Adam([gen], lr=1e-3, betas=(0.5, 0.999), eps=1e-7)
    opt_d = torch.optim.AdamW([{"params": [disc], "lr": 2e-4}, {"params": [head], "lr": 5e-4, "betas": (0.8, 0.9)}])
    sgd = torch.optim.SGD([frozen], lr=0.1, momentum=0.9)
    _step([opt_g, opt_d, sgd], [gen, disc, head, frozen])
    _step([opt_g, opt_d], [gen, disc, head])  # the SGD one stepped once, the Adam ones twice
    got = adam_moments([sgd, opt_g, opt_d], [disc, gen, frozen, head])
    assert got[2] is None  # owned by SGD: no Adam state
    disc_m, gen_m, head_m = got[0], got[1], got[3]
    assert disc_m.exp_avg_sq is opt_d.state[disc]["exp_avg_sq"]  # the optimizer's own tensor, no copy
    assert (disc_m.optimizer_index, disc_m.lr, disc_m.beta1, disc_m.beta2, disc_m.step) == (2, 2e-4, 0.9, 0.999, 2.0)
    assert (gen_m.optimizer_index, gen_m.lr, gen_m.beta1, gen_m.eps) == (1, 1e-3, 0.5, 1e-7)
    assert (head_m.lr, head_m.beta1, head_m.beta2) == (5e-4, 0.8, 0.9)
    owners = owner_of([sgd, opt_g, opt_d], [disc, gen, head, frozen, nn.Parameter(torch.zeros(1))])
    assert [o if o is None else (o.index, o.group["lr"]) for o in owners] == [
        (2, 2e-4),
        (1, 1e-3),
        (2, 5e-4),
        (0, 0.1),
        None,
    ]


def test_not_found_is_explicit():
    w = nn.Parameter(torch.ones(4))
    adam = torch.optim.Adam([w])
    assert adam_moments([adam], [w]) == [None]  # not stepped yet: no state
    assert adam_moments([], [w]) == [None]  # no optimizer owns it
    _step([adam], [w])
    assert adam_moments([adam], [w])[0].step == 1.0
    # A second moment that is not shaped like the parameter (a projected optimizer), three betas (Adan-like),
    # no eps (Lion-like): not Cohen et al.'s preconditioner, so "not found".
    for group_update, state_update in [
        ({}, {"exp_avg_sq": torch.ones(2)}),
        ({"betas": (0.9, 0.99, 0.999)}, {}),
        ({"eps": None}, {}),
    ]:
        opt = torch.optim.Adam([w])
        opt.param_groups[0].update(group_update)
        if opt.param_groups[0]["eps"] is None:
            del opt.param_groups[0]["eps"]
        opt.state[w] = {**adam.state[w], **state_update}
        assert adam_moments([opt], [w]) == [None], (group_update, state_update)


def test_is_adam_family_is_the_one_answer():
    w = nn.Parameter(torch.zeros(1))
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam):
        assert is_adam_family(cls([w]).param_groups[0]), cls
    for opt in (torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.Adagrad([w]), torch.optim.RMSprop([w])):
        assert not is_adam_family(opt.param_groups[0]), type(opt)


@pytest.mark.parametrize("name", ["adamw", "lamb", "nadamw", "adamp"])
def test_timm_adam_family_has_moments(name):
    timm_optim = pytest.importorskip("timm.optim")
    w = nn.Parameter(torch.randn(3, 3))
    opt = timm_optim.create_optimizer_v2([w], opt=name, lr=1e-3)
    _step([opt], [w])
    (m,) = adam_moments([opt], [w])
    assert is_adam_family(opt.param_groups[0]) and m is not None and m.exp_avg_sq.shape == w.shape
