"""The named optimizer recipes as data: frozen, typed specs, readable without importing torch or timm.

Each recipe is one :class:`OptimizerSpec` (as timm describes its optimizers with ``OptimInfo`` and
:mod:`lightning_gd.compression.registry` its compressors): the optimizer by name, its settings, its schedule and
clipping, and a one-line description. :class:`~lightning_gd.optim.OptimizerRecipe` builds them;
``lightning-gd optimizers`` lists :data:`RECIPES` from here without loading torch. The modules' own defaults
(``CausalLMModule``, ``ImageClassifierModule``) are specs too (:data:`MODULE_DEFAULTS`), so every
``configure_optimizers`` goes through one path.

This module imports only the standard library: keep it that way (``tests/optim/test_specs.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

__all__ = [
    "DECAYS",
    "KEYS",
    "MODULE_DEFAULTS",
    "RECIPES",
    "ClipAlgorithm",
    "Decay",
    "LRScaling",
    "LRTableRow",
    "OptimizerSpec",
    "check_keys",
    "spec",
]

#: The schedule after the linear warm-up (:class:`~lightning_gd.optim.WarmupDecayLR`'s ``decay``).
Decay = Literal["cosine", "linear", "polynomial", "wsd", "constant"]
DECAYS: tuple[str, ...] = get_args(Decay)
#: How the peak learning rate follows the batch size.
LRScaling = Literal["linear", "sqrt", "none"]
#: Lightning's gradient clipping algorithms.
ClipAlgorithm = Literal["norm", "value"]
#: ``(smallest batch, largest batch exclusive or None, peak lr, warm-up epochs)``.
LRTableRow = tuple[int, int | None, float, float]

_IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer recipe: what :class:`~lightning_gd.optim.OptimizerRecipe` builds.

    Attributes:
        description: One line, shown by ``lightning-gd optimizers``.
        optimizer: ``conda``, ``diffgrad``, ``mfac`` or a ``timm.optim.list_optimizers()`` name.
        lr: Peak learning rate at ``reference_batch_size``.
        weight_decay: Of the decayed group (matrices and conv kernels).
        optimizer_kwargs: Further keyword arguments of the optimizer (``betas``, ``momentum``, ...).
        batch_size: The global batch size (row of ``lr_table``, or the scaled batch).
        reference_batch_size: The batch size ``lr`` was tuned at, for ``lr_scaling``.
        lr_scaling: ``linear``, ``sqrt`` or ``none``.
        schedule: The decay after warm-up.
        warmup_steps: Linear warm-up as steps (int) or a fraction of the total (float in [0, 1)).
        warmup_epochs: Warm-up in epochs of ``dataset_size / batch_size`` steps.
        dataset_size: Training examples per epoch, for ``warmup_epochs``.
        total_steps: Schedule length (``None``: the Trainer's estimate).
        min_lr_ratio: Final lr as a fraction of the peak.
        power: Exponent of the ``polynomial`` schedule.
        decay_fraction: Share of the post-warm-up steps ``wsd`` spends decaying.
        gradient_clip_val: Clip threshold (0: off).
        gradient_clip_algorithm: ``norm`` or ``value``.
        fallback_patterns: Names (fnmatch) of 2-D matrices that Conda / Muon leave to AdamW (output heads).
        lr_table: Peak lr and warm-up epochs by batch size (the ImageNet recipes), or ``None``.

    Example::

        >>> RECIPES["adamw-llama"].optimizer_kwargs
        {'betas': (0.9, 0.95)}
    """

    description: str = "custom recipe"
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int | None = None
    reference_batch_size: int | None = None
    lr_scaling: LRScaling = "none"
    schedule: Decay = "cosine"
    warmup_steps: int | float = 0
    warmup_epochs: float | None = None
    dataset_size: int | None = None
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    power: float = 1.0
    decay_fraction: float = 0.2
    gradient_clip_val: float = 0.0
    gradient_clip_algorithm: ClipAlgorithm = "norm"
    fallback_patterns: tuple[str, ...] = (
        "lm_head*", "*.lm_head*", "head.*", "*.head.*", "classifier*", "*.classifier*", "fc.*",
    )  # fmt: skip
    lr_table: tuple[LRTableRow, ...] | None = None


#: Every setting a recipe has (the fields of :class:`OptimizerSpec`).
KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(OptimizerSpec))


def check_keys(where: str, keys: Any, known: tuple[str, ...] = KEYS) -> None:
    """Raise ``ValueError`` naming the unknown keys of ``keys`` and the known ones (a misspelt setting)."""
    if unknown := sorted(set(keys) - set(known)):
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")


def spec(base: OptimizerSpec | None = None, /, **settings: Any) -> OptimizerSpec:
    """``base`` (or the defaults) with ``settings`` replaced; a misspelt key raises naming the known keys."""
    check_keys("optimizer recipe", settings)
    return dataclasses.replace(base or OptimizerSpec(), **settings)


# ConAdv's reference LARS rule (ANCHORS section 5, from the TF code). LARS's trust ratio (coefficient 1e-3) turns
# lr 10 into a 1% relative step.
_LARS_IMAGENET_TABLE: tuple[LRTableRow, ...] = (
    (1, 16384, 10.0, 5.0),
    (16384, 32768, 25.0, 5.0),
    (32768, 65536, 31.2, 25.0),
    (65536, None, 43.0, 41.0),
)
# LAMB on ResNet-50, 90 epochs, as the LAMB authors trained it (their TF code, fastalgo/imagenet_resnet50_lamb, and
# their PyTorch port, NUS-HPC-AI-Lab/pytorch-lamb): peak lr 0.04 at batch 32K with 20 warm-up epochs (76.3% top-1
# in their log), scaled by sqrt(B / 32K), i.e. 0.01 * sqrt(B / 2048), with the warm-up proportional to the batch
# (the same ~782 warm-up steps at every batch size); linear decay to 0, LAMB weight decay 1.5 (not on BN/bias),
# no bias correction. The paper reports 77.1% (2K) ... 76.4% (32K). Rows for the powers of two 512 ... 32K.
_LAMB_IMAGENET_TABLE: tuple[LRTableRow, ...] = tuple(
    (b, b + 1, round(0.01 * math.sqrt(b / 2048), 6), 20.0 * b / 32768) for b in (512 * 2**i for i in range(7))
)

_LLAMA = spec(warmup_steps=0.1, schedule="cosine", min_lr_ratio=0.1, gradient_clip_val=1.0)

#: The named recipes (``OptimizerRecipe.from_name``, ``--model.optimizer_recipe NAME``, ``lightning-gd optimizers``).
RECIPES: dict[str, OptimizerSpec] = {
    "adamw-llama": spec(
        _LLAMA,
        description="AdamW lr 1e-3, betas (0.9, 0.95), wd 0.1; 10% warm-up, cosine to 10%; clip 1.0 (LLaMA, litgpt)",
        optimizer="adamw",
        weight_decay=0.1,
        optimizer_kwargs={"betas": (0.9, 0.95)},
    ),
    "conda-llama": spec(
        _LLAMA,
        description="Conda lr 0.01, betas (0.9, 0.99), scale 0.25 on hidden matrices, AdamW for the rest (paper)",
        optimizer="conda",
        lr=0.01,
        optimizer_kwargs={"betas": (0.9, 0.99), "scale": 0.25, "update_proj_gap": 2000},
    ),
    "muon-llama": spec(
        _LLAMA,
        description="timm Muon (RMS matched to AdamW) lr 1e-3, momentum 0.95, wd 0.1 on hidden matrices; AdamW rest",
        optimizer="muon",
        weight_decay=0.1,
        optimizer_kwargs={"momentum": 0.95, "betas": (0.9, 0.95)},
    ),
    "psgd-kron-llama": spec(
        _LLAMA,
        description="timm PSGD-Kron (kronw) lr 3e-4, momentum 0.9, decoupled wd 0.1 (Li, Lie-group preconditioners)",
        optimizer="kronw",
        lr=3e-4,
        weight_decay=0.1,
        optimizer_kwargs={"momentum": 0.9},
    ),
    "adamp": spec(
        description="timm AdamP lr 1e-3, wd 1e-2; 5% warm-up, cosine to 0 (Heo et al. 2021)",
        optimizer="adamp",
        weight_decay=1e-2,
        warmup_steps=0.05,
    ),
    "diffgrad": spec(
        description="DiffGrad lr 1e-3, betas (0.9, 0.999); 5% warm-up, cosine to 0 (Dubey et al. 2019)",
        optimizer="diffgrad",
        warmup_steps=0.05,
    ),
    "mfac": spec(
        description="M-FAC lr 1e-3, 1024 gradients, damp 1e-5; constant lr (Frantar et al. 2021; small models)",
        optimizer="mfac",
        optimizer_kwargs={"num_grads": 1024, "damp": 1e-5},
        schedule="constant",
    ),
    "lars-imagenet": spec(
        description="timm LARS, momentum 0.92, wd 5e-5, poly(1.6) decay; peak lr / warm-up by batch (ConAdv)",
        optimizer="lars",
        weight_decay=5e-5,
        optimizer_kwargs={"momentum": 0.92},
        schedule="polynomial",
        power=1.6,
        batch_size=32768,
        dataset_size=_IMAGENET_TRAIN_IMAGES,
        lr_table=_LARS_IMAGENET_TABLE,
    ),
    "lamb-imagenet": spec(
        description="timm LAMB, wd 1.5, no bias correction, linear decay; lr 0.01*sqrt(B/2048), warm-up 20*B/32K"
        " epochs; B = 512..32K (LAMB authors' code)",
        optimizer="lamb",
        weight_decay=1.5,
        optimizer_kwargs={"bias_correction": False},
        schedule="linear",
        batch_size=4096,
        dataset_size=_IMAGENET_TRAIN_IMAGES,
        lr_table=_LAMB_IMAGENET_TABLE,
    ),
}

#: What the modules train with when given no recipe (their ``optimizer`` / ``lr_scheduler`` callables, when given,
#: replace the optimizer / the schedule of these, over the same parameter groups).
MODULE_DEFAULTS: dict[str, OptimizerSpec] = {
    "CausalLMModule": spec(
        description="AdamW lr 1e-3, betas (0.9, 0.95), wd 0.1; 5% warm-up, cosine to 10% (LLaMA's betas and decay)",
        optimizer="adamw",
        weight_decay=0.1,
        optimizer_kwargs={"betas": (0.9, 0.95)},
        warmup_steps=0.05,
        min_lr_ratio=0.1,
    ),
    "ImageClassifierModule": spec(
        description="SGD lr 0.1, momentum 0.9 (not Nesterov), no decay; 5% warm-up, cosine to 10%",
        optimizer="momentum",  # timm's name of torch.optim.SGD with classical momentum (its "sgd" is Nesterov)
        lr=0.1,
        optimizer_kwargs={"momentum": 0.9},
        warmup_steps=0.05,
        min_lr_ratio=0.1,
    ),
}
