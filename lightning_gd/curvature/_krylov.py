"""Private Lanczos process with full reorthogonalisation, shared by ``lanczos`` and ``density``.

Lanczos tridiagonalisation (Lanczos 1950; Golub & Meurant 2010, "Matrices, Moments and
Quadrature with Applications"). In floating point the three-term recurrence loses orthogonality
as soon as a Ritz value converges, producing spurious copies; every new vector is therefore
reorthogonalised against the whole basis with classical Gram-Schmidt applied twice ("twice is
enough", Giraud et al. 2005).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gd.curvature._utils import _gaussian, _work_dtype
from lightning_gd.curvature.base import CurvatureOperator

# Residual norms below this multiple of eps * ||T|| mean the Krylov space is invariant.
_BREAKDOWN_FACTOR = 100.0


class _LanczosProcess:
    """Grow an orthonormal Krylov basis ``Q`` and tridiagonal ``T = Q^T A Q`` one vector at a time.

    Usage: ``beta = step()``; then ``advance()`` (next vector ``w / beta``) or ``restart(gen)``
    (new random direction orthogonal to the basis, after a breakdown).
    """

    def __init__(self, op: CurvatureOperator, q0: Tensor, capacity: int) -> None:
        self.op = op
        self.dtype = _work_dtype(op.dtype)
        norm = torch.linalg.vector_norm(q0)
        self.q = (q0 / norm).to(dtype=self.dtype, device=op.device)
        self.basis = torch.empty(op.numel, min(capacity, 32), dtype=self.dtype, device=op.device)
        self.capacity = capacity
        self.size = 0
        self.alphas: list[float] = []
        self.betas: list[float] = []  # off-diagonal of T; betas[j] couples vectors j and j+1
        self.beta = 0.0  # norm of the current residual w
        self.w: Tensor | None = None
        self.num_matvecs = 0
        self.scale = 0.0  # running estimate of ||T||, for the breakdown threshold

    def step(self) -> float:
        """Add ``q`` to the basis, compute its residual; return the residual norm ``beta``."""
        j = self.size
        if j == self.basis.shape[1]:  # grow geometrically: few copies, memory only as needed
            grown = torch.empty(self.op.numel, min(2 * j, self.capacity), dtype=self.dtype, device=self.op.device)
            grown[:, :j] = self.basis
            self.basis = grown
        self.basis[:, j] = self.q
        w = self.op.matvec(self.q.to(self.op.dtype)).to(self.dtype)
        self.num_matvecs += 1
        alpha = torch.dot(self.q, w)
        w = w - alpha * self.q
        if j > 0:
            w = w - self.betas[-1] * self.basis[:, j - 1]
        basis = self.basis[:, : j + 1]
        for _ in range(2):
            w = w - basis @ (basis.T @ w)
        beta = torch.linalg.vector_norm(w).item()
        self.alphas.append(alpha.item())
        self.size = j + 1
        self.w, self.beta = w, beta
        self.scale = max(self.scale, abs(self.alphas[-1]), beta)
        return beta

    @property
    def broke_down(self) -> bool:
        """Whether the last residual vanished (the Krylov space is invariant under ``A``)."""
        eps = torch.finfo(self.dtype).eps
        return self.size >= self.op.numel or self.beta <= _BREAKDOWN_FACTOR * eps * self.scale

    def advance(self) -> None:
        """Continue the recurrence with ``q = w / beta``."""
        assert self.w is not None
        self.betas.append(self.beta)
        self.q = self.w / self.beta

    def restart(self, generator: torch.Generator) -> None:
        """Continue with a random unit vector orthogonal to the basis (``T`` gets a zero coupling)."""
        basis = self.basis[:, : self.size]
        q = _gaussian((self.op.numel,), generator, self.op).to(self.dtype)
        for _ in range(2):
            q = q - basis @ (basis.T @ q)
        self.betas.append(0.0)
        self.q = q / torch.linalg.vector_norm(q)

    def tridiagonal(self) -> Tensor:
        """The current ``T`` (float64, on CPU: it is tiny)."""
        T = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if self.size > 1:
            off = torch.tensor(self.betas[: self.size - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        return T
