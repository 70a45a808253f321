"""Auxiliary BatchNorm: separate running statistics (and optionally affine parameters) for adversarial inputs.

Xie et al. 2020, "Adversarial Examples Improve Image Recognition" (AdvProp): clean and adversarial inputs come
from different distributions, so mixing them in one BatchNorm hurts clean accuracy; the adversarial batch gets
its own BatchNorm. ConAdv (Liu et al. 2022) does the same. Here the auxiliary tensors live on the existing
BatchNorm layers of any model (``aux_running_mean``, ``aux_running_var``, ``aux_num_batches_tracked`` and, with
``separate_affine``, ``aux_weight`` / ``aux_bias``), so they move with ``.to()``, are saved in the
``state_dict`` and are seen by optimizers and DDP; :func:`auxiliary_bn` swaps them in for the duration of a
``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["add_auxiliary_bn", "auxiliary_bn", "has_auxiliary_bn"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")
_AFFINE = ("weight", "bias")
_ACTIVE_FLAG = "_lightning_gd_aux_bn_active"


def _bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def add_auxiliary_bn(model: nn.Module, separate_affine: bool = False) -> int:
    """Give every BatchNorm layer of ``model`` auxiliary running statistics (copies of the current ones).

    Idempotent: layers that have them already are left alone (``separate_affine=True`` still adds the
    affine copies where missing). Call it before building the optimizer when ``separate_affine=True``.

    Args:
        model: Any module; its ``_BatchNorm`` layers (BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d)
            get the auxiliary tensors.
        separate_affine: Also give the adversarial branch its own ``weight`` and ``bias`` (copies).

    Returns:
        The number of BatchNorm layers.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> add_auxiliary_bn(model)
        1
        >>> sorted(k for k in model.state_dict() if k.startswith("1.aux"))
        ['1.aux_num_batches_tracked', '1.aux_running_mean', '1.aux_running_var']
    """
    if getattr(model, _ACTIVE_FLAG, False):
        raise RuntimeError("add_auxiliary_bn: cannot add auxiliary BatchNorm inside `auxiliary_bn(model)`")
    layers = _bn_layers(model)
    for layer in layers:
        for name in _STATS:
            tensor = layer._buffers.get(name)
            if tensor is not None and f"aux_{name}" not in layer._buffers:
                layer.register_buffer(f"aux_{name}", tensor.detach().clone())
        if separate_affine and layer.affine:
            for name in _AFFINE:
                param = layer._parameters.get(name)
                if param is not None and f"aux_{name}" not in layer._parameters:
                    layer.register_parameter(f"aux_{name}", nn.Parameter(param.detach().clone()))
    return len(layers)


def has_auxiliary_bn(model: nn.Module) -> bool:
    """Whether every BatchNorm layer of ``model`` with running statistics has auxiliary ones."""
    return all(
        "aux_running_mean" in layer._buffers
        for layer in _bn_layers(model)
        if layer._buffers.get("running_mean") is not None
    )


def _swap(layer: _BatchNorm) -> None:
    for store, names in ((layer._buffers, _STATS), (layer._parameters, _AFFINE)):
        for name in names:
            aux = f"aux_{name}"
            if aux in store:
                store[name], store[aux] = store[aux], store[name]


@contextmanager
def auxiliary_bn(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every BatchNorm layer of ``model`` uses (and updates) its auxiliary tensors.

    The main running statistics (and, with separate affine parameters, the main ``weight`` / ``bias``) are
    neither read nor written inside the block; the auxiliary ones are untouched outside it. Layers without
    auxiliary tensors (see :func:`add_auxiliary_bn`) behave as usual. The swap is undone on exceptions too.

    Raises:
        RuntimeError: when nested for the same model.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> clean, adversarial, y = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> add_auxiliary_bn(model)
        1
        >>> loss = F.cross_entropy(model(clean), y)  # main statistics
        >>> with auxiliary_bn(model):
        ...     loss = loss + F.cross_entropy(model(adversarial), y)  # auxiliary statistics
        >>> int(model[1].aux_num_batches_tracked), int(model[1].num_batches_tracked)
        (1, 1)
    """
    if getattr(model, _ACTIVE_FLAG, False):
        raise RuntimeError("auxiliary_bn(model) is already active for this model; it cannot be nested")
    layers = _bn_layers(model)
    object.__setattr__(model, _ACTIVE_FLAG, True)
    for layer in layers:
        _swap(layer)
    try:
        yield model
    finally:
        for layer in layers:
            _swap(layer)
        object.__setattr__(model, _ACTIVE_FLAG, False)
