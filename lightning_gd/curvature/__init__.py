"""Pure-PyTorch curvature engine: Hessian-vector products and spectral estimators.

* :class:`HessianOperator`: matrix-free Hessian of ``loss_fn(model, batch)`` (side-effect free).
* :class:`GGNOperator`, :class:`EmpiricalFisherOperator`: the generalised Gauss-Newton ``J^T H_L J`` and the
  empirical Fisher ``G^T G / n`` of a loss of the model's outputs (PSD; Jacobian-vector products).
* :class:`FiniteDifferenceOperator`: the Hessian by central differences of gradients a caller computes (a sharded
  strategy's own forward and backward), its vectors each rank's shards; :func:`finite_difference_error`;
  :func:`finite_difference_check` (is the product step-independent here? ReLU kinks, half-precision gradients).
* :class:`DenseOperator`, :class:`PreconditionedOperator`, :class:`ReducedOperator` (mean over
  data-parallel ranks): other symmetric operators.
* :func:`hutchinson_trace`: Hutchinson (1989) / Hutch++ (Meyer et al. 2021) / XTrace (Epperly, Tropp & Webber
  2024) trace estimates.
* :func:`lanczos`: extreme eigenpairs (block Lanczos; Golub & Meurant 2010), every copy of a repeated one.
* :func:`spectral_density`: stochastic Lanczos quadrature density (Ghorbani et al. 2019;
  PyHessian, Yao et al. 2020).
* :mod:`lightning_gd.curvature.landscape`: the loss along lines and planes through the parameters, along
  eigenvectors or filter-normalized random directions (Li et al. 2018).

Nothing here imports Lightning; the callbacks build on these functions.
"""

from lightning_gd.curvature.base import CurvatureOperator
from lightning_gd.curvature.dense import DenseOperator
from lightning_gd.curvature.density import SpectralDensity, spectral_density
from lightning_gd.curvature.finite_difference import (
    FiniteDifferenceOperator,
    finite_difference_eps,
    finite_difference_error,
)
from lightning_gd.curvature.fisher import EmpiricalFisherOperator
from lightning_gd.curvature.ggn import GGNOperator, LossSpec, OutputLoss, loss_spec
from lightning_gd.curvature.lanczos import EigResult, lanczos
from lightning_gd.curvature.operator import HessianOperator, HvpMethod, OperatorMode
from lightning_gd.curvature.preconditioned import PreconditionedOperator
from lightning_gd.curvature.reduced import ReducedOperator
from lightning_gd.curvature.step_check import StepCheck, finite_difference_check
from lightning_gd.curvature.trace import TraceEstimate, hutchinson_trace

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "EigResult",
    "EmpiricalFisherOperator",
    "FiniteDifferenceOperator",
    "GGNOperator",
    "HessianOperator",
    "HvpMethod",
    "LossSpec",
    "OperatorMode",
    "OutputLoss",
    "PreconditionedOperator",
    "ReducedOperator",
    "SpectralDensity",
    "StepCheck",
    "TraceEstimate",
    "finite_difference_check",
    "finite_difference_eps",
    "finite_difference_error",
    "hutchinson_trace",
    "lanczos",
    "loss_spec",
    "spectral_density",
]
