"""Every touch of a third-party library's private state, in one place, each failing loudly when upstream moves.

lightning-gd reads a few private attributes of Lightning, torch, torchdata and litdata where no public API
gives what it needs. Each such touch lives here, behind a function that checks the name still exists and
otherwise raises :class:`UpstreamChanged` naming the library, the private name and what depends on it: a
renamed attribute stops the run with that message instead of silently doing the wrong thing (training as
dense DDP, resuming at the wrong batch). ``tests/test_compat.py`` runs every function against the installed
versions, so an upgrade that renames one fails a test first.

This module imports neither Lightning nor torchdata nor litdata at import time (the compression layer uses it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["UpstreamChanged", "litdata_loader_epoch", "private_attr"]


class UpstreamChanged(RuntimeError):
    """A private name lightning-gd relies on is missing from the installed version of a library."""


def _changed(library: str, name: str, purpose: str) -> UpstreamChanged:
    return UpstreamChanged(
        f"lightning-gd relies on {library}'s private `{name}` ({purpose}), which the installed version does not"
        " have (was it renamed in an upgrade?). Pin the previous version or report this at lightning-gd."
    )


def private_attr(obj: Any, name: str, library: str, purpose: str) -> Any:
    """``getattr(obj, name)``, raising :class:`UpstreamChanged` when ``obj`` has no such attribute."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _changed(library, name, purpose) from None


def _key(state: Any, path: tuple[str, ...], library: str, purpose: str) -> Any:
    """``state[path[0]][path[1]]...``, raising :class:`UpstreamChanged` when a key is missing."""
    for key in path:
        if not isinstance(state, dict) or key not in state:
            raise _changed(library, "".join(f"[{k!r}]" for k in path), purpose)
        state = state[key]
    return state


def litdata_loader_epoch(state: dict[str, Any]) -> int:
    """The epoch of a litdata ``StreamingDataLoader.state_dict()`` (``current_epoch``)."""
    return int(_key(state, ("current_epoch",), "litdata StreamingDataLoader state", "the epoch of a saved stream"))
