"""Global RNG states (torch, CUDA, numpy, python) as checkpoint-safe values, gathered from every rank.

Lightning does not checkpoint the global RNGs that dropout and augmentations draw from; the data modules
store them in their checkpoint entry and put them back before the first resumed training step.
:func:`seeded_rngs` runs one sample's augmentation under RNGs seeded by the sample's own key, so the
augmentation neither depends on nor disturbs the global streams.

:func:`derive_seed` is the package's one way to turn a key (seed, step, rank, a name, ...) into a seed: the
compressors' shared indices and rounding, and the per-sample augmentation. :func:`tuple_hash_seed` is the
older derivation that two callbacks keep (see its docstring for why).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lightning_gd.utils.ranks import gather_from_ranks

__all__ = ["derive_seed", "gather_rng_states", "rng_states", "seeded_rngs", "set_rng_states", "tuple_hash_seed"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (integers and names), the same in every process and Python version.

    BLAKE2b of the parts joined by ``:``: nearby keys give unrelated seeds, and unlike ``hash`` the value does
    not depend on the interpreter.

    Example::

        >>> seed, step, bucket = 0, 10, 2
        >>> gen = torch.Generator().manual_seed(derive_seed("randomk", seed, step, bucket))
        >>> derive_seed("randomk", seed, step, bucket) == derive_seed("randomk", seed, step, bucket)  # on every rank
        True
    """
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def tuple_hash_seed(*parts: int, bits: int = 63) -> int:
    """``hash(parts)`` masked to ``bits`` bits: the older derivation, kept where its draws are published.

    ``NoiseAnnealing`` (63 bits) and ``GradientFlossing`` (31 bits) seed their noise and trajectories this way;
    their figures in ``benchmarks/RESULTS.md`` (delayed XOR, deep-MLP noise, strict saddles, local SGD) were
    drawn with it, so switching them to :func:`derive_seed` would change those numbers. CPython's hash of a
    tuple of integers is not randomized per process, so it is reproducible across runs and ranks.
    """
    return hash(tuple(parts)) & ((1 << bits) - 1)


def rng_states() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, numpy, python) as checkpoint-safe values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_states`, indexed by rank (a collective when ``world_size > 1``)."""
    local = rng_states()
    return gather_from_ranks(local) if world_size > 1 else [local]


@contextlib.contextmanager
def seeded_rngs(*key: int, restore: bool = True) -> Iterator[None]:
    """Run the block with the CPU torch, numpy and python RNGs seeded by ``key``; restore them afterwards.

    ``key`` is a tuple of non-negative integers, e.g. ``(seed, epoch, index)`` of one training sample: the
    block draws the same numbers whichever process runs it and whatever ran before, and the global streams
    continue as if it had not run. CUDA generators are not touched (dropout on the GPU keeps its stream).
    ``restore=False`` skips saving and restoring the streams (about 80 us of the 90 us this costs): for
    processes whose global streams nobody else reads, such as DataLoader workers.
    """
    seed = derive_seed(*(int(k) for k in key))  # nearby keys give unrelated streams
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if restore else None
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)  # numpy's legacy seed takes 32 bits
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])
