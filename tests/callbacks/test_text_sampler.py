import re

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.callbacks import TextSampler
from lightning_gd.recipes import CausalLMModule
from tests.helpers.models import TinyClassifier, classification_loader


def test_writes_a_seeded_sample_without_touching_rng_or_modes(tmp_path):
    module = CausalLMModule(overrides={"block_size": 32, "n_layer": 1})
    module.model.blocks[0].eval()  # a mixed train/eval state must come back as it was
    sampler = TextSampler(prompt="def f", max_new_tokens=20, seed=3)
    trainer = Trainer(accelerator="cpu", max_steps=0, logger=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    modes = {m: m.training for m in module.modules()}
    rng = torch.get_rng_state()
    sampler.on_fit_end(trainer, module)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {m: m.training for m in module.modules()} == modes
    text = (tmp_path / "sample.txt").read_text(encoding="utf-8")
    assert text == sampler.last_sample and text.startswith("def f")
    again = TextSampler(prompt="def f", max_new_tokens=20, seed=3)
    again.on_fit_end(trainer, module)
    assert again.last_sample == sampler.last_sample


def test_module_without_generate_is_refused_at_setup(tmp_path):
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[TextSampler()],
                      default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(MisconfigurationException, match="needs a module with a `generate` method"):
        trainer.fit(TinyClassifier(), classification_loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ""}, "`prompt` must not be empty, got ''"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be a positive integer, got 0"),
        ({"temperature": -1.0}, "`temperature` must be a finite number >= 0, got -1.0"),
        ({"top_k": 0}, "`top_k` must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(kwargs, match):
    with pytest.raises(MisconfigurationException, match=re.escape(match)):
        TextSampler(**kwargs)
