"""Lazy package attributes (PEP 562): a package names where each public object lives and imports it on first use.

``import lightning_gd`` or ``import lightning_gd.curvature`` then costs what the code used needs: the pure-torch
layers never load Lightning, timm or litdata, and ``lightning-gd recipes`` answers without torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package whose public names live in its modules.

    Args:
        package: The package's ``__name__``.
        exports: Public name -> the module that defines it, relative to the package (``".llama"``) or absolute.
        submodules: Names of the package's submodules that ``package.name`` imports on first access.

    Example::

        # not run: module-level code of a package's __init__.py
        # in lightning_gd/recipes/__init__.py
        __getattr__, __dir__ = lazy_attributes(__name__, {"Llama": ".llama", "LlamaConfig": ".llama"})
    """
    submodules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later look-ups find the attribute: one import per name
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports) | submodules)

    return __getattr__, __dir__
