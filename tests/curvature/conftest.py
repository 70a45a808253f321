"""Small float64 models and exact dense Hessians shared by the curvature tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from tests.helpers.hessian import dense_hessian_of


class TinyCNN(nn.Module):
    """Conv -> BatchNorm -> tanh -> Dropout -> Linear, on 1x5x5 inputs (81 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.tanh(self.bn(self.conv(x))))
        return self.head(h.flatten(1))


def cross_entropy(model: Callable[[Tensor], Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@dataclass
class Problem:
    model: nn.Module
    batch: Any
    loss_fn: Callable[..., Tensor]


def make_mlp(seed: int = 0) -> Problem:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    return Problem(model, batch, cross_entropy)


def make_cnn(seed: int = 0) -> Problem:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyCNN().double()
        # Non-trivial running statistics, so that eval mode differs from train mode.
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
        batch = (torch.randn(8, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
    return Problem(model, batch, cross_entropy)


def dense_hessian(problem: Problem, train: bool = False, seed: int = 0) -> Tensor:
    """Exact Hessian of the loss w.r.t. all trainable parameters, flattened in named order.

    Train mode mirrors HessianOperator's contract: batch statistics, running statistics left
    alone (buffers are copies), and the RNG reseeded with ``seed`` before the single forward.
    """
    model = problem.model
    modes = {m: m.training for m in model.modules()}
    model.train(train)

    def f(params: dict[str, Tensor]) -> Tensor:
        state = {n: b.clone() for n, b in model.named_buffers()}
        state.update(params)
        torch.manual_seed(seed)
        return problem.loss_fn(lambda x: functional_call(model, state, (x,)), problem.batch)

    try:
        with torch.random.fork_rng():
            return dense_hessian_of(model, f)
    finally:
        for m, flag in modes.items():
            m.training = flag


@pytest.fixture(scope="session")
def mlp_hessian() -> Tensor:
    return dense_hessian(make_mlp())


@pytest.fixture(scope="session")
def cnn_hessian_eval() -> Tensor:
    return dense_hessian(make_cnn(), train=False)


@pytest.fixture(scope="session")
def cnn_hessian_train() -> Tensor:
    return dense_hessian(make_cnn(), train=True)


@pytest.fixture
def mlp() -> Problem:
    """A fresh MLP problem (same weights and batch as ``mlp_hessian``)."""
    return make_mlp()


@pytest.fixture
def cnn() -> Problem:
    """A fresh CNN problem (same weights, buffers and batch as the ``cnn_hessian_*`` fixtures)."""
    return make_cnn()


@pytest.fixture
def make_problem() -> Callable[[str, int], Problem]:
    """Factory ``make_problem(kind, seed)`` for ``kind`` in ``{"mlp", "cnn"}``."""
    return lambda kind, seed=0: {"mlp": make_mlp, "cnn": make_cnn}[kind](seed)


@pytest.fixture
def exact_hessian() -> Callable[..., Tensor]:
    """The ``dense_hessian(problem, train=False, seed=0)`` helper."""
    return dense_hessian
