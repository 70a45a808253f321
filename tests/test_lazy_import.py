"""The lazy root package: light imports, the same public names, short names through ``register()``."""

import importlib
import json
import subprocess
import sys

import pytest

import lightning_gd
from tests.helpers.timeouts import scaled_timeout

_HEAVY = ("torch", "lightning", "timm", "litdata")


def _loaded_after(statement: str) -> dict[str, bool]:
    """Which heavy packages a fresh interpreter holds after running ``statement``."""
    code = f"import sys, json\n{statement}\nprint(json.dumps({{m: m in sys.modules for m in {_HEAVY!r}}}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled_timeout(120), check=True
    )
    return json.loads(proc.stdout.splitlines()[-1])


def test_root_and_listing_modules_import_no_torch():
    loaded = _loaded_after(
        "import lightning_gd, lightning_gd.cli, lightning_gd.recipes.registry, lightning_gd.compression.registry"
    )
    assert not any(loaded.values()), loaded


def test_pure_torch_layers_import_no_lightning_timm_or_litdata():
    loaded = _loaded_after("import lightning_gd.curvature, lightning_gd.compression.hook, lightning_gd.dynamics")
    assert loaded == {"torch": True, "lightning": False, "timm": False, "litdata": False}


def test_root_exports_every_name_of_the_glue_subpackages():
    expected = {"__version__", "register", "CausalLMModule", "Llama", "LlamaConfig", "TextCorpusDataModule"}
    expected |= {"TokenStreamDataModule"}
    for name in ("callbacks", "optim", "plugins", "strategies"):
        expected |= set(importlib.import_module(f"lightning_gd.{name}").__all__)
    assert set(lightning_gd.__all__) == expected
    for name in lightning_gd.__all__:
        assert getattr(lightning_gd, name) is not None, name
    assert set(lightning_gd.__all__) <= set(dir(lightning_gd))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_gd.Nope  # noqa: B018


@pytest.mark.parametrize("name", ["recipes", "compression"])
def test_lazy_subpackages_resolve_every_name(name):
    module = importlib.import_module(f"lightning_gd.{name}")
    for attribute in module.__all__:
        assert getattr(module, attribute) is not None, attribute


def test_register_gives_a_plain_lightning_cli_the_short_names(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.strategies import StrategyRegistry

    lightning_gd.register()
    assert "ddp_topk" in StrategyRegistry
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: MetricPlotter\n"
        "model:\n  class_path: CausalLMModule\n  init_args: {preset: tiny, overrides: {n_layer: 1}}\n"
        "data:\n  class_path: TextCorpusDataModule\n  init_args: {data_dir: " + json.dumps(str(tmp_path)) + "}\n"
    )
    for name in "abcd":
        (tmp_path / f"{name}.txt").write_text(f"{name} = 1\n" * 300)
    cli = LightningCLI(args=["--config", str(config)], run=False, subclass_mode_model=True, subclass_mode_data=True)
    assert type(cli.model).__name__ == "CausalLMModule"
    assert any(type(c).__name__ == "MetricPlotter" for c in cli.trainer.callbacks)
