"""Pure-PyTorch curvature engine: Hessian-vector products and spectral estimators.

* :class:`HessianOperator`: matrix-free Hessian of ``loss_fn(model, batch)`` (side-effect free).
* :class:`DenseOperator`, :class:`PreconditionedOperator`, :class:`ReducedOperator` (mean over
  data-parallel ranks): other symmetric operators.
* :func:`hutchinson_trace`: Hutchinson (1989) / Hutch++ (Meyer et al. 2021) trace estimates.
* :func:`lanczos`: extreme eigenpairs (Lanczos; Golub & Meurant 2010).
* :func:`spectral_density`: stochastic Lanczos quadrature density (Ghorbani et al. 2019;
  PyHessian, Yao et al. 2020).

Nothing here imports Lightning; the callbacks build on these functions.
"""

from lightning_gd.curvature.base import CurvatureOperator
from lightning_gd.curvature.dense import DenseOperator
from lightning_gd.curvature.density import SpectralDensity, spectral_density
from lightning_gd.curvature.lanczos import EigResult, lanczos
from lightning_gd.curvature.operator import HessianOperator, HvpMethod, OperatorMode
from lightning_gd.curvature.preconditioned import PreconditionedOperator
from lightning_gd.curvature.reduced import ReducedOperator
from lightning_gd.curvature.trace import TraceEstimate, hutchinson_trace

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "EigResult",
    "HessianOperator",
    "HvpMethod",
    "OperatorMode",
    "PreconditionedOperator",
    "ReducedOperator",
    "SpectralDensity",
    "TraceEstimate",
    "hutchinson_trace",
    "lanczos",
    "spectral_density",
]
