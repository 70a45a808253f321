"""Tiny models and data for tests: fast on CPU, with the layers that make measurement tricky."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "KinkedRegressor",
    "TinyClassificationData",
    "TinyClassifier",
    "classification_loader",
    "classification_tensors",
    "kinked_loader",
]


def classification_tensors(n: int = 64, in_dim: int = 8, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded, learnable classification problem: labels from a random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=gen)
    teacher = torch.randn(in_dim, classes, generator=gen)
    return x, (x @ teacher).argmax(dim=1)


def classification_loader(
    n: int = 64, in_dim: int = 8, classes: int = 3, batch_size: int = 16, seed: int = 0, shuffle: bool = False
) -> DataLoader:
    x, y = classification_tensors(n, in_dim, classes, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class TinyClassifier(LightningModule):
    """MLP classifier with optional BatchNorm and Dropout (the layers a measurement must not disturb).

    Args:
        in_dim, hidden, classes: Layer sizes.
        batchnorm: Insert ``BatchNorm1d`` after the first layer.
        dropout: Dropout probability after the activation (0 disables it).
        lr, momentum: SGD settings; ``optimizer="adam"`` uses Adam with ``lr``.
    """

    def __init__(
        self,
        in_dim: int = 8,
        hidden: int = 16,
        classes: int = 3,
        batchnorm: bool = True,
        dropout: float = 0.1,
        lr: float = 0.1,
        momentum: float = 0.0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)


class TinyClassificationData(LightningDataModule):
    """:func:`classification_loader` as a data module, so a LightningCLI YAML can name it (``class_path``)."""

    def __init__(self, n: int = 64, batch_size: int = 16, seed: int = 0, shuffle: bool = False) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle

    def train_dataloader(self) -> DataLoader:
        return classification_loader(n=self.n, batch_size=self.batch_size, seed=self.seed, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return classification_loader(n=32, batch_size=self.batch_size, seed=self.seed + 1)


class KinkedRegressor(LightningModule):
    """A ReLU regressor with one hidden unit held exactly at its kink for the whole run.

    Unit 0 has bias 0 and weights -1, and the inputs of :func:`kinked_loader` are positive except sample 0, the
    zero vector: the unit is dead on every other sample and at pre-activation exactly 0 on sample 0, where its
    gradient (ReLU'(0) = 0) is 0, so no optimizer moves it off the kink. Any central difference moving its bias
    crosses the kink; double backward does not see it.
    """

    def __init__(self, in_dim: int = 3, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.net[0].weight[0] = -1.0
            self.net[0].bias[0] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def kinked_loader(n: int = 32, in_dim: int = 3, seed: int = 0) -> DataLoader:
    """One batch of ``n`` positive inputs (sample 0 the zero vector), random targets: see :class:`KinkedRegressor`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, in_dim, generator=gen) + 0.1
    x[0] = 0.0
    return DataLoader(TensorDataset(x, torch.randn(n, 1, generator=gen)), batch_size=n)
