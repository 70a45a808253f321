"""The optimizer recipes as frozen, typed specs: torch-free, strict about keys, and the modules' defaults."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from lightning_gd.optim import OptimizerRecipe, WarmupDecayLR
from lightning_gd.optim.recipe import decay_groups
from lightning_gd.optim.specs import KEYS, MODULE_DEFAULTS, RECIPES, spec
from lightning_gd.recipes import CausalLMModule, ImageClassifierModule


def test_the_table_imports_without_torch_or_timm():
    # Load the file on its own (as `lightning-gd optimizers` needs it), whatever the package's __init__ imports.
    code = (
        "import importlib.util, sys\n"
        "s = importlib.util.spec_from_file_location('specs', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(s); sys.modules['specs'] = m; s.loader.exec_module(m)\n"
        "print(len(m.RECIPES), sorted(k for k in ('torch', 'timm', 'lightning') if k in sys.modules))\n"
    )
    import lightning_gd.optim.specs as specs

    out = subprocess.run([sys.executable, "-c", code, specs.__file__], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [str(len(RECIPES)), "[]"], out.stderr


def test_a_misspelt_key_names_the_known_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'weight_decy'; known keys: description, optimizer, lr"):
        spec(weight_decy=0.1)
    with pytest.raises(ValueError, match=r"from_name\('adamw-llama'\): unknown key\(s\) 'lr_sheduler'.*warmup_steps"):
        OptimizerRecipe.from_name("adamw-llama", lr_sheduler="wsd")
    assert "description" in KEYS and "lr_table" in KEYS


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECIPES["adamw-llama"].lr = 1.0


def test_causal_lm_default_is_the_optimizer_it_always_built():
    # The default recipe gives what CausalLMModule built by hand before: AdamW(lr 1e-3, betas (0.9, 0.95),
    # wd 0.1) over the two decay groups, and 5% warm-up + cosine to 10%.
    module = CausalLMModule(overrides={"n_layer": 1})
    opt = module.optimizer_recipe.build_optimizer(module.model)
    sched = module.optimizer_recipe.build(module.model, total_steps=40)["lr_scheduler"]["scheduler"]
    by_hand = torch.optim.AdamW(decay_groups(module.model), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW and opt.defaults == by_hand.defaults
    for ours, theirs in zip(opt.param_groups, by_hand.param_groups, strict=True):
        assert [p is q for p, q in zip(ours["params"], theirs["params"], strict=True)] == [True] * len(ours["params"])
        assert {k: v for k, v in ours.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
    expected = WarmupDecayLR(by_hand, warmup_steps=0.05, min_lr_ratio=0.1, total_steps=40)
    assert [sched.lr_factor(s) for s in range(41)] == [expected.lr_factor(s) for s in range(41)]
    assert MODULE_DEFAULTS["CausalLMModule"].optimizer == "adamw"


def test_image_classifier_default_is_sgd_with_classical_momentum():
    module = ImageClassifierModule("resnet10t", num_classes=3, in_chans=1)
    opt = module.optimizer_recipe.build(module, total_steps=10)["optimizer"]
    assert type(opt) is torch.optim.SGD
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["nesterov"]) == (0.1, 0.9, False)


@pytest.mark.parametrize("owner", ["CausalLMModule", "ImageClassifierModule"])
def test_a_recipe_with_callables_warns_once_and_the_recipe_wins(owner):
    kwargs = {"overrides": {"n_layer": 1}} if owner == "CausalLMModule" else {"model_name": "resnet10t"}
    cls = CausalLMModule if owner == "CausalLMModule" else ImageClassifierModule
    with pytest.warns(UserWarning, match=rf"{owner}: `optimizer_recipe`=.*replaces the `optimizer` argument"):
        module = cls(**kwargs, optimizer_recipe="diffgrad", optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    assert module.optimizer_recipe.name == "diffgrad" and module.optimizer_factory is None
