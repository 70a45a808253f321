import os

import pytest
import torch

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
