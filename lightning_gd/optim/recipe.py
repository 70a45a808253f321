"""``OptimizerRecipe``: one well-configured optimizer, its parameter groups, LR scaling, schedule and clipping.

Optimizers by name: this package's ``conda``, ``diffgrad`` and ``mfac``, plus every name of
``timm.optim.list_optimizers()`` built through ``timm.optim.create_optimizer_v2`` (LARS, LAMB, AdamP, PSGD-Kron,
Muon, ...); none of timm's optimizers is reimplemented. Named recipes are frozen specs
(:data:`lightning_gd.optim.specs.RECIPES`, readable without torch) and are listed by ``lightning-gd optimizers``.

Parameter groups (for any ``nn.Module``):

- no weight decay on 1-D parameters (norms), biases and embeddings (and a head tied to them);
- Conda and the Muon family (``muon``, ``nmuon``, ``adamuon``, ``nadamuon``) only on 2-D hidden matrices; the
  rest (embeddings, norms, biases, conv kernels, and 2-D matrices whose name matches ``fallback_patterns``,
  e.g. an untied ``lm_head``) takes their AdamW path, flagged ``conda=False`` for Conda and
  ``use_fallback=True`` for timm's Muon (which would otherwise run Muon on embeddings and conv kernels).

LR scaling: ``lr * batch_size / reference_batch_size`` (``linear``, Goyal et al. 2017) or its square root
(``sqrt``, Krizhevsky 2014; LAMB), or none. A recipe with a batch-size table (the ImageNet ones) takes its peak
LR and warm-up from the row for the batch size instead, and refuses a batch size it has no row for.

The schedule is :class:`~lightning_gd.optim.WarmupDecayLR` (linear warm-up, then cosine, linear, polynomial,
warmup-stable-decay or constant), stepped every optimizer step; its total is the Trainer's
``estimated_stepping_batches`` when ``total_steps`` is not given.

The modules' defaults are recipes too (:data:`~lightning_gd.optim.specs.MODULE_DEFAULTS`), and their
``optimizer`` / ``lr_scheduler`` callables replace a recipe's optimizer or schedule over the same parameter
groups (:meth:`OptimizerRecipe.build`): every ``configure_optimizers`` of the package is one call.

Gradient clipping is returned, not applied: ``gradient_clip_val`` / ``gradient_clip_algorithm`` are for the
Trainer (``Trainer(gradient_clip_val=recipe.gradient_clip_val)``) or for the module's
``configure_gradient_clipping`` (call :meth:`OptimizerRecipe.clip_gradients`; ``CausalLMModule`` does).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, get_args

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_gd.optim.conda import Conda
from lightning_gd.optim.diffgrad import DiffGrad
from lightning_gd.optim.mfac import MFAC
from lightning_gd.optim.specs import (
    KEYS,
    RECIPES,
    ClipAlgorithm,
    Decay,
    LRScaling,
    LRTableRow,
    OptimizerSpec,
    check_keys,
)
from lightning_gd.optim.warmup_decay import WarmupDecayLR
from lightning_gd.utils.checks import check_number

__all__ = ["OptimizerRecipe", "decay_groups"]

_OWN_OPTIMIZERS: dict[str, type[Optimizer]] = {"conda": Conda, "diffgrad": DiffGrad, "mfac": MFAC}
_MUON_FAMILY = ("muon", "nmuon", "adamuon", "nadamuon")
# Optimizers whose update of a parameter depends on its shape or on per-tensor quantities (SVD or
# orthogonalization of 2-D matrices, Kronecker or factored preconditioners, per-layer trust ratios or norms, the
# gradient window of M-FAC). DeepSpeed ZeRO gives the optimizer one flat 1-D partition per group instead: these
# would silently become another algorithm (measured: Conda and Muon take their AdamW path; the ZeRO-2 weights
# differ from DDP's by a whole step), so they are refused there. Elementwise optimizers (SGD, Adam, AdamW, Lion,
# DiffGrad, ...) are unaffected.
_SHAPE_DEPENDENT = ("conda", "mfac", "*muon", "kron*", "*adamp", "*sgdp", "*lars", "*larc", "*lamb*",
                    "*adafactor*", "*novograd*", "adahessian")  # fmt: skip
_OVERRIDES = tuple(k for k in KEYS if k not in ("description", "lr_table"))  # what a caller may set


def _optimizer_names() -> list[str]:
    import timm.optim

    return sorted({*_OWN_OPTIMIZERS, *timm.optim.list_optimizers()})


def _table_row(name: str, table: Sequence[LRTableRow], batch_size: int) -> tuple[float, float]:
    for low, high, lr, warmup_epochs in table:
        if batch_size >= low and (high is None or batch_size < high):
            return lr, warmup_epochs
    known = ", ".join(f"{low}" if high == low + 1 else f"[{low}, {high or 'inf'})" for low, high, _, _ in table)
    raise ValueError(f"Recipe {name!r} has no rule for `batch_size`={batch_size}; it knows batch sizes: {known}")


def decay_groups(
    module: nn.Module,
    weight_decay: float | None = None,
    fallback_patterns: Sequence[str] = (),
    hybrid: tuple[str, bool] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups without weight decay on norms, biases and embeddings (a tied head is listed once).

    Plain optimizers get two groups in the module's parameter order: the decayed parameters (with
    ``"weight_decay": weight_decay`` unless it is ``None``, which leaves the optimizer's own default), then the
    rest with ``weight_decay=0``. A hybrid optimizer (``hybrid``: the param-group key and value that send a group
    to its AdamW path, e.g. ``("conda", False)``) gets its 2-D hidden matrices alone in the first group, the
    other decayed parameters (conv kernels, matrices matching ``fallback_patterns``) in the second, flagged.
    Empty groups are left out.

    Example::

        decay, no_decay = decay_groups(model)   # torch.optim.AdamW(decay_groups(model), weight_decay=0.1)
    """
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    hidden, decay_rest, no_decay = [], [], []
    for name, p in module.named_parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or id(p) in embeddings:
            no_decay.append(p)
        elif hybrid is not None and p.ndim == 2 and not any(fnmatch.fnmatchcase(name, f) for f in fallback_patterns):
            hidden.append(p)
        else:
            decay_rest.append(p)
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if hybrid is None:
        groups = [{"params": decay_rest, **decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        key, value = hybrid
        groups = [
            {"params": hidden, **decay},
            {"params": decay_rest, **decay, key: value},
            {"params": no_decay, "weight_decay": 0.0, key: value},
        ]
    return [g for g in groups if g["params"]]


def _hybrid_flag(optimizer: str) -> tuple[str, bool] | None:
    """The param-group key that sends a group to the optimizer's AdamW path, for the hybrid optimizers."""
    if optimizer == "conda":
        return ("conda", False)
    if optimizer in _MUON_FAMILY:
        return ("use_fallback", True)
    return None


class OptimizerRecipe:
    """An optimizer by name with its parameter groups, batch-size LR scaling, schedule and gradient clipping.

    Every argument left ``None`` takes the named recipe's value (``name``, a frozen
    :class:`~lightning_gd.optim.specs.OptimizerSpec`), or the generic default when no recipe is named (AdamW,
    lr 1e-3, no decay, no warm-up, cosine to 0, no clipping). The resolved values are attributes of the same
    names; :attr:`lr` is the peak lr after batch-size scaling.

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

    Raises:
        ValueError: an unknown recipe or optimizer name (listing the known ones), a misspelt setting in
            :meth:`from_name` / :meth:`from_spec` (naming the known keys), or a bad value (naming it).

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
        lr_scaling: LRScaling | None = None,
        schedule: Decay | None = None,
        warmup_steps: int | float | None = None,
        warmup_epochs: float | None = None,
        dataset_size: int | None = None,
        total_steps: int | None = None,
        min_lr_ratio: float | None = None,
        power: float | None = None,
        decay_fraction: float | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: ClipAlgorithm | None = None,
        fallback_patterns: Sequence[str] | None = None,
    ) -> None:
        if name is not None and name not in RECIPES:
            raise ValueError(f"Unknown optimizer recipe {name!r}; valid names: {', '.join(RECIPES)}")
        explicit = {k: v for k, v in locals().items() if k not in ("self", "name", "__class__") and v is not None}
        self.name = name
        self._resolve(RECIPES[name] if name is not None else OptimizerSpec(), explicit)

    def _resolve(self, recipe: OptimizerSpec, explicit: dict[str, Any]) -> None:
        """Set the attributes from ``recipe`` with the ``explicit`` settings over it, and check them."""
        values = {**{k: getattr(recipe, k) for k in _OVERRIDES}, **explicit}
        values["optimizer_kwargs"] = {**recipe.optimizer_kwargs, **explicit.get("optimizer_kwargs", {})}
        self.description: str = recipe.description
        self.optimizer: str = values["optimizer"].lower()
        if self.optimizer not in _OWN_OPTIMIZERS:
            import timm.optim

            if self.optimizer.split("_")[-1] not in timm.optim.list_optimizers():
                raise ValueError(
                    f"Unknown `optimizer`={values['optimizer']!r}; valid names: {', '.join(_optimizer_names())}"
                )
        for key, kind in (("lr_scaling", LRScaling), ("schedule", Decay), ("gradient_clip_algorithm", ClipAlgorithm)):
            if values[key] not in (choices := get_args(kind)):
                raise ValueError(f"Unknown `{key}`={values[key]!r}; valid names: {', '.join(choices)}")
        for key in ("lr", "weight_decay", "min_lr_ratio", "gradient_clip_val"):
            check_number(key, values[key], 0)
        if values["batch_size"] is not None and values["batch_size"] < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {values['batch_size']!r}")
        self.weight_decay: float = float(values["weight_decay"])
        self.optimizer_kwargs: dict[str, Any] = dict(values["optimizer_kwargs"])
        self.batch_size: int | None = values["batch_size"]
        self.reference_batch_size: int | None = values["reference_batch_size"]
        self.lr_scaling: LRScaling = values["lr_scaling"]
        self.schedule: Decay = values["schedule"]
        self.warmup_steps: int | float = values["warmup_steps"]
        self.warmup_epochs: float | None = values["warmup_epochs"]
        self.dataset_size: int | None = values["dataset_size"]
        self.total_steps: int | None = values["total_steps"]
        self.min_lr_ratio: float = float(values["min_lr_ratio"])
        self.power: float = float(values["power"])
        self.decay_fraction: float = float(values["decay_fraction"])
        self.gradient_clip_val: float = float(values["gradient_clip_val"])
        self.gradient_clip_algorithm: ClipAlgorithm = values["gradient_clip_algorithm"]
        self.fallback_patterns: tuple[str, ...] = tuple(values["fallback_patterns"])
        self.lr: float = float(values["lr"])
        if recipe.lr_table is not None and "lr" not in explicit:
            self.lr, table_warmup = _table_row(self.name or "", recipe.lr_table, self.batch_size)
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
        """The named recipe, with any setting overridden (``batch_size=4096``, ``lr=...``); a misspelt one raises
        naming the known keys."""
        check_keys(f"OptimizerRecipe.from_name({name!r})", overrides, _OVERRIDES)
        return cls(name=name, **overrides)

    @classmethod
    def from_spec(cls, spec: OptimizerSpec, **overrides: Any) -> OptimizerRecipe:
        """A recipe from an unnamed spec (the modules' defaults, your own table), with ``overrides`` over it."""
        check_keys("OptimizerRecipe.from_spec", overrides, _OVERRIDES)
        recipe = cls.__new__(cls)
        recipe.name = None
        recipe._resolve(spec, {k: v for k, v in overrides.items() if v is not None})
        return recipe

    @staticmethod
    def catalog() -> dict[str, str]:
        """Names of the built-in recipes mapped to one-line descriptions."""
        return {name: recipe.description for name, recipe in RECIPES.items()}

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
        """:func:`decay_groups` for this recipe's optimizer and weight decay; empty groups are left out."""
        return decay_groups(module, self.weight_decay, self.fallback_patterns, _hybrid_flag(self.optimizer))

    def build_optimizer(self, params: nn.Module | Iterable[Any]) -> Optimizer:
        """The optimizer over ``params``: a module (grouped by :meth:`param_groups`) or parameters / groups."""
        groups = self.param_groups(params) if isinstance(params, nn.Module) else list(params)
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay, **self.optimizer_kwargs}
        own = _OWN_OPTIMIZERS.get(self.optimizer)
        if own is not None:
            return own(groups, **kwargs)
        import timm.optim

        return timm.optim.create_optimizer_v2(groups, opt=self.optimizer, **kwargs)

    def build_scheduler(self, optimizer: Optimizer, total_steps: int | None = None) -> WarmupDecayLR:
        """The warm-up + decay schedule; ``total_steps`` falls back to :attr:`total_steps`."""
        total = total_steps if total_steps is not None else self.total_steps
        return WarmupDecayLR(
            optimizer,
            warmup_steps=self.warmup_steps,
            total_steps=total,
            min_lr_ratio=self.min_lr_ratio,
            decay=self.schedule,
            power=self.power,
            decay_fraction=self.decay_fraction,
        )

    def build(
        self,
        module: nn.Module,
        total_steps: int | None = None,
        optimizer: Callable[[Iterable[Any]], Optimizer] | None = None,
        lr_scheduler: Callable[[Optimizer], LRScheduler] | None = None,
        params: nn.Module | None = None,
    ) -> dict[str, Any]:
        """What ``configure_optimizers`` returns: the optimizer and its schedule, stepped every optimizer step.

        Args:
            module: The module to train; a LightningModule attached to a Trainer gives the schedule's length.
            total_steps: The schedule's length; else :attr:`total_steps`, else the Trainer's
                ``estimated_stepping_batches``.
            optimizer: ``param_groups -> Optimizer`` replacing the recipe's optimizer (a module's ``optimizer``
                argument); it gets :func:`decay_groups` with its own weight decay on the decayed group.
            lr_scheduler: ``optimizer -> LRScheduler`` replacing the recipe's schedule; a
                :class:`~lightning_gd.optim.WarmupDecayLR` built without ``total_steps`` gets the length above.
            params: The module whose parameters are trained, when not ``module`` itself (a wrapped model).

        Raises:
            ValueError: when that Trainer runs DeepSpeed ZeRO and the recipe's optimizer depends on parameter
                shapes or per-tensor norms (Conda, M-FAC, Muon, PSGD-Kron, AdamP, LARS, LAMB, Adafactor, NovoGrad,
                AdaHessian): ZeRO's flat partitions would silently turn it into another algorithm.
        """
        params = module if params is None else params
        total = total_steps if total_steps is not None else self.total_steps
        trainer = _attached_trainer(module)
        if total is None and trainer is not None:
            total = max(1, int(trainer.estimated_stepping_batches))
        if optimizer is None:
            self._check_strategy(getattr(trainer, "strategy", None))
            opt = self.build_optimizer(params)
        else:
            opt = optimizer(decay_groups(params, None, self.fallback_patterns))
        scheduler = self.build_scheduler(opt, total) if lr_scheduler is None else lr_scheduler(opt)
        if isinstance(scheduler, WarmupDecayLR) and scheduler.total_steps is None and total is not None:
            scheduler.set_total_steps(total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_strategy(self, strategy: Any) -> None:
        """Refuse a shape-dependent optimizer under DeepSpeed ZeRO (see ``_SHAPE_DEPENDENT``)."""
        from lightning_gd.utils.deepspeed_state import deepspeed_stage

        stage = deepspeed_stage(strategy)
        if stage and any(fnmatch.fnmatchcase(self.optimizer, pattern) for pattern in _SHAPE_DEPENDENT):
            raise ValueError(
                f"optimizer {self.optimizer!r} does not work under DeepSpeed ZeRO stage {stage}: its update depends"
                " on each parameter's shape or per-tensor norms, and ZeRO hands the optimizer flat 1-D partitions"
                " instead, so it would silently run another algorithm. Use DDP (`strategy='ddp'`), or an"
                " elementwise optimizer (e.g. `adamw-llama`) under DeepSpeed."
            )

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
