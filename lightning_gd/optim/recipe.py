"""``OptimizerRecipe``: one well-configured optimizer, its parameter groups, LR scaling, schedule and clipping.

Optimizers by name: this package's ``conda``, ``diffgrad`` and ``mfac``, plus every name of
``timm.optim.list_optimizers()`` built through ``timm.optim.create_optimizer_v2`` (LARS, LAMB, AdamP, PSGD-Kron,
Muon, ...); none of timm's optimizers is reimplemented. Named recipes are data (``_RECIPES`` below) and are
listed by ``lightning-gd optimizers``.

Parameter groups (for any ``nn.Module``):

- no weight decay on 1-D parameters (norms), biases and embeddings (and a head tied to them);
- Conda and the Muon family (``muon``, ``nmuon``, ``adamuon``, ``nadamuon``) only on 2-D hidden matrices; the
  rest (embeddings, norms, biases, conv kernels, and 2-D matrices whose name matches ``fallback_patterns``,
  e.g. an untied ``lm_head``) takes their AdamW path, flagged ``conda=False`` for Conda and
  ``use_fallback=True`` for timm's Muon (which would otherwise run Muon on embeddings and conv kernels).

LR scaling: ``lr * batch_size / reference_batch_size`` (``linear``, Goyal et al. 2017) or its square root
(``sqrt``, Krizhevsky 2014; LAMB), or none. A recipe with a batch-size table (the ImageNet ones) takes its peak
LR and warm-up from the row for the batch size instead, and refuses a batch size it has no row for.

The schedule is :class:`~lightning_gd.optim.WarmupCosineLR` (linear warm-up, then cosine, linear, polynomial or
warmup-stable-decay), stepped every optimizer step; its total is the Trainer's ``estimated_stepping_batches``
when ``total_steps`` is not given.

Gradient clipping is returned, not applied: ``gradient_clip_val`` / ``gradient_clip_algorithm`` are for the
Trainer (``Trainer(gradient_clip_val=recipe.gradient_clip_val)``) or for the module's
``configure_gradient_clipping`` (call :meth:`OptimizerRecipe.clip_gradients`; ``CausalLMModule`` does).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from lightning_gd.optim.conda import Conda
from lightning_gd.optim.diffgrad import DiffGrad
from lightning_gd.optim.mfac import MFAC
from lightning_gd.optim.warmup_cosine import _DECAYS, WarmupCosineLR

__all__ = ["OptimizerRecipe"]

_OWN_OPTIMIZERS: dict[str, type[Optimizer]] = {"conda": Conda, "diffgrad": DiffGrad, "mfac": MFAC}
_MUON_FAMILY = ("muon", "nmuon", "adamuon", "nadamuon")
_IMAGENET_TRAIN_IMAGES = 1_281_167

# ConAdv's reference LARS rule (ANCHORS section 5, from the TF code): (smallest batch, largest batch exclusive,
# peak lr, warm-up epochs). LARS's trust ratio (coefficient 1e-3) turns lr 10 into a 1% relative step.
_LARS_IMAGENET_TABLE: tuple[tuple[int, int | None, float, float], ...] = (
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
_LAMB_IMAGENET_TABLE: tuple[tuple[int, int | None, float, float], ...] = tuple(
    (b, b + 1, round(0.01 * math.sqrt(b / 2048), 6), 20.0 * b / 32768) for b in (512 * 2**i for i in range(7))
)

# Named recipes, as data. Keys not given take _BASE's value.
_BASE: dict[str, Any] = dict(
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.0,
    optimizer_kwargs={},
    batch_size=None,
    reference_batch_size=None,
    lr_scaling="none",
    schedule="cosine",
    warmup_steps=0,
    warmup_epochs=None,
    dataset_size=None,
    total_steps=None,
    min_lr_ratio=0.0,
    power=1.0,
    decay_fraction=0.2,
    gradient_clip_val=0.0,
    gradient_clip_algorithm="norm",
    fallback_patterns=("lm_head*", "*.lm_head*", "head.*", "*.head.*", "classifier*", "*.classifier*", "fc.*"),
)
_LLAMA = dict(warmup_steps=0.1, schedule="cosine", min_lr_ratio=0.1, gradient_clip_val=1.0)
_RECIPES: dict[str, dict[str, Any]] = {
    "adamw-llama": dict(
        _LLAMA,
        description="AdamW lr 1e-3, betas (0.9, 0.95), wd 0.1; 10% warm-up, cosine to 10%; clip 1.0 (LLaMA, litgpt)",
        optimizer="adamw",
        weight_decay=0.1,
        optimizer_kwargs={"betas": (0.9, 0.95)},
    ),
    "conda-llama": dict(
        _LLAMA,
        description="Conda lr 0.01, betas (0.9, 0.99), scale 0.25 on hidden matrices, AdamW for the rest (paper)",
        optimizer="conda",
        lr=0.01,
        optimizer_kwargs={"betas": (0.9, 0.99), "scale": 0.25, "update_proj_gap": 2000},
    ),
    "muon-llama": dict(
        _LLAMA,
        description="timm Muon (RMS matched to AdamW) lr 1e-3, momentum 0.95, wd 0.1 on hidden matrices; AdamW rest",
        optimizer="muon",
        weight_decay=0.1,
        optimizer_kwargs={"momentum": 0.95, "betas": (0.9, 0.95)},
    ),
    "psgd-kron-llama": dict(
        _LLAMA,
        description="timm PSGD-Kron (kronw) lr 3e-4, momentum 0.9, decoupled wd 0.1 (Li, Lie-group preconditioners)",
        optimizer="kronw",
        lr=3e-4,
        weight_decay=0.1,
        optimizer_kwargs={"momentum": 0.9},
    ),
    "adamp": dict(
        description="timm AdamP lr 1e-3, wd 1e-2; 5% warm-up, cosine to 0 (Heo et al. 2021)",
        optimizer="adamp",
        weight_decay=1e-2,
        warmup_steps=0.05,
    ),
    "diffgrad": dict(
        description="DiffGrad lr 1e-3, betas (0.9, 0.999); 5% warm-up, cosine to 0 (Dubey et al. 2019)",
        optimizer="diffgrad",
        warmup_steps=0.05,
    ),
    "mfac": dict(
        description="M-FAC lr 1e-3, 1024 gradients, damp 1e-5; constant lr (Frantar et al. 2021; small models)",
        optimizer="mfac",
        optimizer_kwargs={"num_grads": 1024, "damp": 1e-5},
        schedule="constant",
    ),
    "lars-imagenet": dict(
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
    "lamb-imagenet": dict(
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


def _optimizer_names() -> list[str]:
    import timm.optim

    return sorted({*_OWN_OPTIMIZERS, *timm.optim.list_optimizers()})


def _table_row(
    name: str, table: Sequence[tuple[int, int | None, float, float]], batch_size: int
) -> tuple[float, float]:
    for low, high, lr, warmup_epochs in table:
        if batch_size >= low and (high is None or batch_size < high):
            return lr, warmup_epochs
    known = ", ".join(f"{low}" if high == low + 1 else f"[{low}, {high or 'inf'})" for low, high, _, _ in table)
    raise ValueError(f"Recipe {name!r} has no rule for `batch_size`={batch_size}; it knows batch sizes: {known}")


def _hybrid_flag(optimizer: str) -> tuple[str, bool] | None:
    """The param-group key that sends a group to the optimizer's AdamW path, for the hybrid optimizers."""
    if optimizer == "conda":
        return ("conda", False)
    if optimizer in _MUON_FAMILY:
        return ("use_fallback", True)
    return None


class OptimizerRecipe:
    """An optimizer by name with its parameter groups, batch-size LR scaling, schedule and gradient clipping.

    Every argument left ``None`` takes the named recipe's value (``name``), or the generic default when no
    recipe is named (AdamW, lr 1e-3, no decay, no warm-up, cosine to 0, no clipping). The resolved values are
    attributes of the same names; :attr:`lr` is the peak lr after batch-size scaling.

    Args:
        name: A named recipe (``OptimizerRecipe.catalog()``), or ``None``.
        optimizer: ``conda``, ``diffgrad``, ``mfac`` or any ``timm.optim.list_optimizers()`` name.
        lr: Peak learning rate at ``reference_batch_size`` (before scaling).
        weight_decay: Applied to the decayed group only (matrices and conv kernels).
        optimizer_kwargs: Further keyword arguments of the optimizer (``betas``, ``momentum``, ``scale``, ...),
            merged over the named recipe's.
        batch_size: The global batch size; selects the row of a recipe's batch-size table or scales ``lr``.
        reference_batch_size: The batch size ``lr`` was tuned at (for ``lr_scaling``).
        lr_scaling: ``linear``, ``sqrt`` or ``none``.
        schedule: Decay after warm-up: ``cosine``, ``linear``, ``polynomial``, ``wsd`` or ``constant``.
        warmup_steps: Linear warm-up as steps (int) or a fraction of the total (float in [0, 1)).
        warmup_epochs: Warm-up in epochs of ``dataset_size / batch_size`` steps (overrides ``warmup_steps``).
        dataset_size: Training examples per epoch, for ``warmup_epochs``.
        total_steps: Schedule length; ``None`` takes the Trainer's ``estimated_stepping_batches`` in :meth:`build`.
        min_lr_ratio: Final lr as a fraction of the peak.
        power: Exponent of the ``polynomial`` schedule.
        decay_fraction: Share of the post-warm-up steps that ``wsd`` spends decaying.
        gradient_clip_val: Clip threshold for the Trainer or ``configure_gradient_clipping``; 0 turns it off.
        gradient_clip_algorithm: ``norm`` (global L2 norm) or ``value``.
        fallback_patterns: Names (fnmatch) of 2-D matrices that Conda / Muon leave to AdamW (the output head).

    Example::

        class MyModule(LightningModule):
            def configure_optimizers(self):
                return OptimizerRecipe.from_name("lamb-imagenet", batch_size=4096).build(self)

        # YAML (LightningCLI):  optimizer_recipe: {class_path: OptimizerRecipe, init_args: {name: conda-llama}}
    """

    def __init__(
        self,
        name: str | None = None,
        optimizer: str | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        batch_size: int | None = None,
        reference_batch_size: int | None = None,
        lr_scaling: Literal["linear", "sqrt", "none"] | None = None,
        schedule: Literal["cosine", "linear", "polynomial", "wsd", "constant"] | None = None,
        warmup_steps: int | float | None = None,
        warmup_epochs: float | None = None,
        dataset_size: int | None = None,
        total_steps: int | None = None,
        min_lr_ratio: float | None = None,
        power: float | None = None,
        decay_fraction: float | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] | None = None,
        fallback_patterns: Sequence[str] | None = None,
    ) -> None:
        if name is not None and name not in _RECIPES:
            raise ValueError(f"Unknown optimizer recipe {name!r}; valid names: {', '.join(_RECIPES)}")
        explicit = {k: v for k, v in locals().items() if k not in ("self", "name", "__class__") and v is not None}
        recipe = _RECIPES.get(name, {}) if name is not None else {}
        values = {**_BASE, **{k: v for k, v in recipe.items() if k in _BASE}, **explicit}
        values["optimizer_kwargs"] = {**recipe.get("optimizer_kwargs", {}), **explicit.get("optimizer_kwargs", {})}
        self.name = name
        self.description: str = recipe.get("description", "custom recipe")
        self.optimizer: str = values["optimizer"].lower()
        if self.optimizer not in _OWN_OPTIMIZERS:
            import timm.optim

            if self.optimizer.split("_")[-1] not in timm.optim.list_optimizers():
                raise ValueError(f"Unknown `optimizer`={optimizer!r}; valid names: {', '.join(_optimizer_names())}")
        if values["lr_scaling"] not in ("linear", "sqrt", "none"):
            raise ValueError(f"Unknown `lr_scaling`={values['lr_scaling']!r}; valid names: linear, sqrt, none")
        if values["schedule"] not in _DECAYS:
            raise ValueError(f"Unknown `schedule`={values['schedule']!r}; valid names: {', '.join(_DECAYS)}")
        if values["gradient_clip_algorithm"] not in ("norm", "value"):
            raise ValueError(
                f"Unknown `gradient_clip_algorithm`={values['gradient_clip_algorithm']!r}; valid: norm, value"
            )
        for key in ("lr", "weight_decay", "min_lr_ratio", "gradient_clip_val"):
            if values[key] < 0:
                raise ValueError(f"`{key}` must be >= 0, got {values[key]!r}")
        if values["batch_size"] is not None and values["batch_size"] < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {values['batch_size']!r}")
        self.weight_decay: float = float(values["weight_decay"])
        self.optimizer_kwargs: dict[str, Any] = dict(values["optimizer_kwargs"])
        self.batch_size: int | None = values["batch_size"]
        self.reference_batch_size: int | None = values["reference_batch_size"]
        self.lr_scaling: str = values["lr_scaling"]
        self.schedule: str = values["schedule"]
        self.warmup_steps: int | float = values["warmup_steps"]
        self.warmup_epochs: float | None = values["warmup_epochs"]
        self.dataset_size: int | None = values["dataset_size"]
        self.total_steps: int | None = values["total_steps"]
        self.min_lr_ratio: float = float(values["min_lr_ratio"])
        self.power: float = float(values["power"])
        self.decay_fraction: float = float(values["decay_fraction"])
        self.gradient_clip_val: float = float(values["gradient_clip_val"])
        self.gradient_clip_algorithm: str = values["gradient_clip_algorithm"]
        self.fallback_patterns: tuple[str, ...] = tuple(values["fallback_patterns"])
        self.lr: float = float(values["lr"])
        table = recipe.get("lr_table")
        if table is not None and "lr" not in explicit:
            self.lr, table_warmup = _table_row(name or "", table, self.batch_size)
            if "warmup_epochs" not in explicit and "warmup_steps" not in explicit:
                self.warmup_epochs = table_warmup
        elif self.lr_scaling != "none" and self.batch_size is not None:
            if self.reference_batch_size is None:
                raise ValueError(f"`lr_scaling`={self.lr_scaling!r} needs `reference_batch_size`")
            ratio = self.batch_size / self.reference_batch_size
            self.lr *= ratio if self.lr_scaling == "linear" else math.sqrt(ratio)
        if self.warmup_epochs is not None:
            if self.dataset_size is None or self.batch_size is None:
                raise ValueError("`warmup_epochs` needs `dataset_size` and `batch_size`")
            self.warmup_steps = round(self.warmup_epochs * math.ceil(self.dataset_size / self.batch_size))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> OptimizerRecipe:
        """The named recipe, with any argument of ``__init__`` overridden (``batch_size=4096``, ``lr=...``)."""
        return cls(name=name, **overrides)

    @staticmethod
    def catalog() -> dict[str, str]:
        """Names of the built-in recipes mapped to one-line descriptions."""
        return {name: recipe["description"] for name, recipe in _RECIPES.items()}

    @staticmethod
    def optimizer_names() -> list[str]:
        """Every optimizer name a recipe accepts: this package's and timm's."""
        return _optimizer_names()

    def __repr__(self) -> str:
        return (
            f"OptimizerRecipe(name={self.name!r}, optimizer={self.optimizer!r}, lr={self.lr:g}, "
            f"weight_decay={self.weight_decay:g}, schedule={self.schedule!r}, warmup_steps={self.warmup_steps!r}, "
            f"gradient_clip_val={self.gradient_clip_val:g})"
        )

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """The groups described in the module docstring; empty groups are left out."""
        embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        hidden, decay_rest, no_decay = [], [], []
        for name, p in module.named_parameters():  # shared (tied) parameters are listed once
            if not p.requires_grad:
                continue
            if p.ndim < 2 or name.endswith(".bias") or id(p) in embeddings:
                no_decay.append(p)
            elif p.ndim == 2 and not any(fnmatch.fnmatchcase(name, pat) for pat in self.fallback_patterns):
                hidden.append(p)
            else:
                decay_rest.append(p)
        flag = _hybrid_flag(self.optimizer)
        if flag is None:
            groups = [{"params": hidden + decay_rest, "weight_decay": self.weight_decay}]
            groups.append({"params": no_decay, "weight_decay": 0.0})
        else:
            key, value = flag
            groups = [
                {"params": hidden, "weight_decay": self.weight_decay},
                {"params": decay_rest, "weight_decay": self.weight_decay, key: value},
                {"params": no_decay, "weight_decay": 0.0, key: value},
            ]
        return [g for g in groups if g["params"]]

    def build_optimizer(self, params: nn.Module | Iterable[Any]) -> Optimizer:
        """The optimizer over ``params``: a module (grouped by :meth:`param_groups`) or parameters / groups."""
        groups = self.param_groups(params) if isinstance(params, nn.Module) else list(params)
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay, **self.optimizer_kwargs}
        own = _OWN_OPTIMIZERS.get(self.optimizer)
        if own is not None:
            return own(groups, **kwargs)
        import timm.optim

        return timm.optim.create_optimizer_v2(groups, opt=self.optimizer, **kwargs)

    def build_scheduler(self, optimizer: Optimizer, total_steps: int | None = None) -> WarmupCosineLR:
        """The warm-up + decay schedule; ``total_steps`` falls back to :attr:`total_steps`."""
        total = total_steps if total_steps is not None else self.total_steps
        return WarmupCosineLR(
            optimizer,
            warmup_steps=self.warmup_steps,
            total_steps=total,
            min_lr_ratio=self.min_lr_ratio,
            decay=self.schedule,  # type: ignore[arg-type]
            power=self.power,
            decay_fraction=self.decay_fraction,
        )

    def build(self, module: nn.Module, total_steps: int | None = None) -> dict[str, Any]:
        """What ``configure_optimizers`` returns: the optimizer and its schedule, stepped every optimizer step.

        The schedule's length is ``total_steps``, else :attr:`total_steps`, else the Trainer's
        ``estimated_stepping_batches`` when ``module`` is a LightningModule attached to one.
        """
        optimizer = self.build_optimizer(module)
        total = total_steps if total_steps is not None else self.total_steps
        trainer = _attached_trainer(module)
        if total is None and trainer is not None:
            total = max(1, int(trainer.estimated_stepping_batches))
        scheduler = self.build_scheduler(optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def clip_gradients(
        self,
        module: Any,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip from a LightningModule's ``configure_gradient_clipping``: the Trainer's setting when it has one,
        the recipe's otherwise.

        Example::

            def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
                self.recipe.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        """
        if gradient_clip_val is None and self.gradient_clip_val > 0:
            gradient_clip_val, gradient_clip_algorithm = self.gradient_clip_val, self.gradient_clip_algorithm
        module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _attached_trainer(module: nn.Module) -> Any:
    """The Trainer a LightningModule is attached to; ``None`` for a plain module or a detached LightningModule."""
    if not hasattr(type(module), "trainer"):  # a plain nn.Module (duck-typed: no Lightning import here)
        return None
    try:
        return module.trainer
    except RuntimeError:  # LightningModule.trainer raises when no Trainer is attached
        return None
