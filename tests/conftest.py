import os

import pytest

from lightning_gd.utils.threads import set_thread_defaults

# OpenMP threads that spin while they wait slow everything down several times on a shared machine: wait passively
# (unless OMP_WAIT_POLICY is set), here and in every subprocess, as the lightning-gd command does.
set_thread_defaults(os.environ)

import torch  # noqa: E402  (after the OpenMP settings)

# Small, deterministic and quiet: tests share two cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("PL_DISABLE_FORK", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
