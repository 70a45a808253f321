import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from timm.optim.kron import Kron
from timm.optim.lamb import Lamb
from timm.optim.lars import Lars
from timm.optim.muon import Muon
from torch import nn

from lightning_gd.cli import LightningGDCLI, _resolve_config_names, main
from lightning_gd.optim import MFAC, Conda, DiffGrad, OptimizerRecipe, WarmupDecayLR
from lightning_gd.recipes import CausalLMModule
from tests.helpers.models import TinyClassifier, classification_loader

LLM_RECIPES = ["adamw-llama", "conda-llama", "muon-llama", "psgd-kron-llama"]


class _Net(nn.Module):
    """Embedding, a norm, a conv kernel, hidden matrices with a bias, and an untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1, bias=False)
        self.norm = nn.LayerNorm(4)
        self.hidden = nn.Linear(4, 6)
        self.lm_head = nn.Linear(6, 10, bias=False)


def _names(module, group):
    by_id = {id(p): n for n, p in module.named_parameters()}
    return sorted(by_id[id(p)] for p in group["params"])


def test_param_groups_for_plain_and_hybrid_optimizers():
    net = _Net()
    plain = OptimizerRecipe(optimizer="adamw", weight_decay=0.1).param_groups(net)
    assert [_names(net, g) for g in plain] == [
        ["conv.weight", "hidden.weight", "lm_head.weight"],
        ["embed.weight", "hidden.bias", "norm.bias", "norm.weight"],
    ]
    assert [g["weight_decay"] for g in plain] == [0.1, 0.0]
    for optimizer, key, value in [("conda", "conda", False), ("muon", "use_fallback", True)]:
        groups = OptimizerRecipe(optimizer=optimizer, weight_decay=0.1).param_groups(net)
        assert [_names(net, g) for g in groups] == [
            ["hidden.weight"],  # the only 2-D hidden matrix
            ["conv.weight", "lm_head.weight"],  # decayed, AdamW path
            ["embed.weight", "hidden.bias", "norm.bias", "norm.weight"],
        ]
        assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]
        assert [g.get(key) for g in groups] == [None, value, value]


def test_tied_head_is_listed_once_without_decay():
    module = CausalLMModule(overrides={"n_layer": 1})
    groups = OptimizerRecipe.from_name("muon-llama").param_groups(module.model)
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(module.model.parameters()))
    no_decay = [g for g in groups if g["weight_decay"] == 0.0][0]
    assert any(p is module.model.embed.weight for p in no_decay["params"]) and no_decay["use_fallback"]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adamw-llama", torch.optim.AdamW),
        ("conda-llama", Conda),
        ("muon-llama", Muon),
        ("psgd-kron-llama", Kron),
        ("diffgrad", DiffGrad),
        ("lars-imagenet", Lars),
        ("lamb-imagenet", Lamb),
    ],
)
def test_named_recipes_build_the_right_optimizer_and_step(name, cls):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    out = OptimizerRecipe.from_name(name).build(net, total_steps=10)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert type(opt) is cls and isinstance(sched, WarmupDecayLR) and out["lr_scheduler"]["interval"] == "step"
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    sched.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_mfac_recipe_with_a_small_window():
    net = nn.Linear(3, 2)
    opt = OptimizerRecipe.from_name("mfac", optimizer_kwargs={"num_grads": 4}).build_optimizer(net)
    assert isinstance(opt, MFAC) and opt.num_grads == 4 and opt.damp == 1e-5
    conda = OptimizerRecipe.from_name("conda-llama", optimizer_kwargs={"update_proj_gap": 50})
    assert conda.optimizer_kwargs == {"betas": (0.9, 0.99), "scale": 0.25, "update_proj_gap": 50}  # merged


def test_batch_size_scaling():
    linear = OptimizerRecipe(lr=0.1, batch_size=1024, reference_batch_size=256, lr_scaling="linear")
    sqrt = OptimizerRecipe(lr=0.1, batch_size=1024, reference_batch_size=256, lr_scaling="sqrt")
    none = OptimizerRecipe(lr=0.1, batch_size=1024, reference_batch_size=256, lr_scaling="none")
    assert (linear.lr, sqrt.lr, none.lr) == pytest.approx((0.4, 0.2, 0.1))
    with pytest.raises(ValueError, match="reference_batch_size"):
        OptimizerRecipe(lr=0.1, batch_size=1024, lr_scaling="linear")


def test_imagenet_tables():
    lars = OptimizerRecipe.from_name("lars-imagenet", batch_size=20000)
    assert lars.lr == 25.0 and lars.warmup_steps == 5 * math.ceil(1281167 / 20000)  # 5 epochs of 65 steps
    assert OptimizerRecipe.from_name("lars-imagenet", batch_size=65536).lr == 43.0
    assert OptimizerRecipe.from_name("lars-imagenet", batch_size=8192).lr == 10.0
    assert lars.schedule == "polynomial" and lars.power == 1.6 and lars.optimizer_kwargs["momentum"] == 0.92
    lamb = OptimizerRecipe.from_name("lamb-imagenet", batch_size=4096)
    # The LAMB authors' rule: 0.04 at 32K scaled by sqrt(B / 32K); warm-up 20 * B / 32K = 2.5 epochs of 313 steps
    assert lamb.lr == pytest.approx(0.04 * math.sqrt(4096 / 32768), rel=1e-4) and lamb.warmup_steps == 782
    assert OptimizerRecipe.from_name("lamb-imagenet", batch_size=32768).lr == 0.04
    assert lamb.weight_decay == 1.5 and lamb.optimizer_kwargs == {"bias_correction": False}
    with pytest.raises(ValueError, match=r"batch_size`=3000.*knows batch sizes: 512, 1024, .*, 16384, 32768"):
        OptimizerRecipe.from_name("lamb-imagenet", batch_size=3000)
    assert OptimizerRecipe.from_name("lamb-imagenet", batch_size=3000, lr=1e-3).lr == 1e-3  # an explicit lr wins


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "adamw-llamma"}, r"Unknown optimizer recipe 'adamw-llamma'; valid names: adamw-llama, conda-llama"),
        ({"optimizer": "adamq"}, r"Unknown `optimizer`='adamq'; valid names: .*conda.*diffgrad.*kron.*lamb.*mfac"),
        ({"schedule": "cosin"}, r"Unknown `schedule`='cosin'; valid names: cosine, linear, polynomial, wsd, constant"),
        ({"lr_scaling": "log"}, r"valid names: linear, sqrt, none"),
        ({"lr": -1.0}, "`lr` must be a finite number >= 0"),
        ({"batch_size": 0}, "`batch_size`"),
    ],
)
def test_bad_input_names_the_valid_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerRecipe(**kwargs)


class _RecipeClassifier(TinyClassifier):
    def __init__(self, recipe: OptimizerRecipe) -> None:
        super().__init__(batchnorm=False, dropout=0.0)
        self.recipe = recipe

    def configure_optimizers(self):
        return self.recipe.build(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.recipe.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.max_norm_seen = max(
            getattr(self, "max_norm_seen", 0.0),
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()])).item(),
        )


def test_build_in_a_trainer_takes_the_total_from_it_and_clips(tmp_path):
    seed_everything(0)
    recipe = OptimizerRecipe(
        optimizer="sgd", lr=0.5, optimizer_kwargs={"momentum": 0.0, "nesterov": False}, warmup_steps=2,
        schedule="linear", min_lr_ratio=0.0, gradient_clip_val=0.01,
    )  # fmt: skip
    module = _RecipeClassifier(recipe)
    trainer = Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    loader = classification_loader(batch_size=16)  # 64 examples: 4 steps an epoch, 12 in all
    trainer.fit(module, loader)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.total_steps == 12 and sched.last_epoch == 12
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)  # linear to 0 at step 12
    assert module.max_norm_seen == pytest.approx(0.01, rel=1e-5)  # the recipe clipped every step


def test_trainer_clipping_wins_over_the_recipe(tmp_path):
    module = _RecipeClassifier(OptimizerRecipe(optimizer="sgd", lr=0.1, gradient_clip_val=0.01))
    trainer = Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1e-4, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, classification_loader(batch_size=16))
    assert module.max_norm_seen == pytest.approx(1e-4, rel=1e-4)


def test_optimizers_command_lists_every_recipe(capsys):
    main(["optimizers"])
    out = capsys.readouterr().out
    for name, description in OptimizerRecipe.catalog().items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert description in line


@pytest.mark.slow
@pytest.mark.parametrize("name", LLM_RECIPES)
def test_quickstart_override_trains_two_steps(name, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    # timm's Kron torch.compiles its kernels for every shape (minutes on a CPU): eager is enough for 2 steps
    torch.compiler.set_stance("force_eager")
    request.addfinalizer(lambda: torch.compiler.set_stance("default"))
    cli = LightningGDCLI(
        args=_resolve_config_names([
            "fit", "--config", "quickstart", "--model.optimizer_recipe", name,
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false",
            "--data.seq_len", "32", "--data.train_windows", "16", "--data.val_windows", "4", "--data.batch_size", "4",
            "--model.overrides", "{n_layer: 1}",
        ])
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    recipe = cli.model.optimizer_recipe
    assert recipe.name == name
    opt = cli.trainer.optimizers[0]
    expected = {"adamw-llama": torch.optim.AdamW, "conda-llama": Conda, "muon-llama": Muon, "psgd-kron-llama": Kron}
    assert type(opt) is expected[name]
    assert opt.param_groups[0]["lr"] == pytest.approx(
        recipe.lr * cli.trainer.lr_scheduler_configs[0].scheduler.lr_factor(2)
    )
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


def test_recipe_from_yaml_class_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LightningGDCLI(
        args=_resolve_config_names([
            "--config", "quickstart",
            "--model.optimizer_recipe", "{class_path: OptimizerRecipe, init_args: {name: conda-llama, lr: 0.02}}",
        ]),
        run=False,
    )  # fmt: skip
    assert isinstance(cli.model.optimizer_recipe, OptimizerRecipe) and cli.model.optimizer_recipe.lr == 0.02
