"""Private Lanczos process with bounded memory, shared by ``lanczos`` and ``density``.

Lanczos tridiagonalisation (Lanczos 1950; Golub & Meurant 2010, "Matrices, Moments and Quadrature with
Applications"). In floating point the three-term recurrence loses orthogonality as soon as a Ritz value
converges, producing spurious copies. Each step therefore applies the three-term recurrence (cheap: it removes
the large components of ``A q``), then one classical Gram-Schmidt pass against every stored vector removes
what rounding left; its coefficients correct the new column of the projected matrix ``H = Q^T A Q``
(Rayleigh-Ritz on the Krylov space, tridiagonal up to rounding). A second pass runs only when the first still
cancelled more than ``1 - 1/sqrt(2)`` of the norm (Daniel, Gragg, Kaufman & Stewart 1976; "twice is enough",
Giraud et al. 2005): rarely after the recurrence, but always on the first step after a thick restart.

Memory. The basis is stored row-major in blocks of ``_BLOCK`` rows, one contiguous row per vector, allocated
once and never copied; Gram-Schmidt streams only the rows in use (one matrix-vector product per block and pass).
At most ``max_basis`` vectors are stored:

* :func:`~lightning_gd.curvature.lanczos` then *thick-restarts* (Wu & Simon 2000, "Thick-restart Lanczos
  method for large symmetric eigenvalue problems"): the basis is rotated in place onto the best Ritz vectors,
  the residual becomes the next vector, and the iteration goes on with ``A Q = Q H + w e^T`` intact, so the
  residual bound and the warm start keep working;
* :func:`~lightning_gd.curvature.spectral_density` keeps a window of the latest ``max_basis`` vectors
  (local reorthogonalisation): its Gauss quadrature stays exact for the probe's measure up to rounding, and a
  ghost copy of a converged Ritz value only splits that node's weight.

Precision: the basis, the residual and Gram-Schmidt are in the working dtype, the operator's dtype promoted to at
least float32 (float32 for bfloat16/float16/float32 operators, float64 for float64 ones); the operator receives
its own dtype; ``H`` is kept in float64 on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gd.curvature._utils import _gaussian, _work_dtype
from lightning_gd.curvature.base import CurvatureOperator

# Residual norms below this multiple of eps * ||T|| mean the Krylov space is invariant.
_BREAKDOWN_FACTOR = 100.0
# Rows per storage block: over-allocation is at most _BLOCK - 1 vectors, and Gram-Schmidt runs one matrix-vector
# product per block.
_BLOCK = 4
# Columns per chunk when the basis is rotated in place (thick restart, Ritz vectors): bounds the temporaries.
_CHUNK = 1 << 16
# Daniel-Gragg-Kaufman-Stewart (1976) test: a second Gram-Schmidt pass when the first removed more than
# 1 - 1/sqrt(2) of the norm ("twice is enough", Giraud et al. 2005).
_DGKS = 0.5**0.5


class _LanczosProcess:
    """Grow an orthonormal Krylov basis ``Q`` and the projected ``H = Q^T A Q`` one vector at a time.

    Usage: ``beta = step()``; then ``advance()`` (next vector ``w / beta``), ``restart(gen)`` (a random
    direction orthogonal to the basis, after a breakdown) or ``thick_restart(S)`` (keep the Ritz vectors
    ``Q S`` when the basis is full).

    Extra memory on the operator's device, in the working dtype: the stored rows (at most ``max_basis``,
    allocated ``_BLOCK`` at a time) and the residual ``w``; besides, the operator's own product output.

    Args:
        op: The symmetric operator.
        q0: Start vector (any nonzero scale).
        capacity: Most products this process will compute.
        max_basis: Most vectors stored at once (``>= 2``); ``None`` means ``capacity``.
        window: What happens when ``max_basis`` vectors are stored and the caller advances: ``False`` (the caller
            must call :meth:`thick_restart` first), ``True`` (the oldest vector is overwritten: local
            reorthogonalisation).
    """

    def __init__(
        self, op: CurvatureOperator, q0: Tensor, capacity: int, max_basis: int | None = None, window: bool = False
    ) -> None:
        self.op = op
        self.dtype = _work_dtype(op.dtype)
        self.max_basis = max(2, min(capacity, max_basis if max_basis is not None else capacity))
        self.window = window
        self._blocks: list[Tensor] = []
        self._index: list[int] = []  # Krylov index of the vector held in each slot
        self.size = 0  # vectors in the projected matrix H (restarts rebase it)
        dim = capacity if window else self.max_basis
        self._H = torch.zeros(dim, dim, dtype=torch.float64)
        self.beta = 0.0  # norm of the current residual w
        self._coupling = 0.0  # H[j-1, j] of the three-term recurrence (0 after a restart)
        self.w: Tensor | None = None
        self.num_matvecs = 0
        self.num_restarts = 0
        self.scale = 0.0  # running estimate of ||H||, for the breakdown threshold
        self._reorth_eta = torch.finfo(self.dtype).eps ** 0.25
        row = self._slot_row(0)
        row.copy_(q0)  # converts dtype and device without a temporary (q0 may be a warm start kept on the host)
        row.div_(torch.linalg.vector_norm(row))
        self._index.append(0)

    # ---------------------------------------------------------------- storage
    @property
    def stored(self) -> int:
        """Number of vectors currently stored."""
        return len(self._index)

    def _slot_row(self, slot: int) -> Tensor:
        """Row ``slot`` of the storage, allocating its block on first use (never reallocating)."""
        b, r = divmod(slot, _BLOCK)
        while len(self._blocks) <= b:
            rows = min(_BLOCK, self.max_basis - _BLOCK * len(self._blocks))
            self._blocks.append(torch.empty(rows, self.op.numel, dtype=self.dtype, device=self.op.device))
        return self._blocks[b][r]

    def _in_use(self) -> list[Tensor]:
        """The stored rows, block by block (views, no copy)."""
        n, out = self.stored, []
        for b, block in enumerate(self._blocks):
            used = min(block.shape[0], n - _BLOCK * b)
            if used <= 0:
                break
            out.append(block[:used])
        return out

    def _orthogonalize(self, w: Tensor) -> Tensor:
        """One classical Gram-Schmidt pass of ``w`` (in place) against the stored rows; return the coefficients."""
        blocks = self._in_use()
        coeffs = [block @ w for block in blocks]  # all coefficients from the same w: classical Gram-Schmidt
        for block, c in zip(blocks, coeffs, strict=True):
            w.addmv_(block.T, c, alpha=-1.0)
        return torch.cat(coeffs)

    # ---------------------------------------------------------------- the recurrence
    def step(self) -> float:
        """Apply ``A`` to the newest vector, orthogonalise the result; return the residual norm ``beta``."""
        j = self.size
        slot = j % self.max_basis  # vector j lives in slot j mod max_basis
        q = self._slot_row(slot)
        w = self.op.matvec(q.to(self.op.dtype)).to(self.dtype)
        self.num_matvecs += 1
        # Three-term recurrence first (cheap, and it removes the large components), then one Gram-Schmidt pass
        # against every stored vector for what rounding left; a second pass only if that one still cancelled.
        alpha = torch.dot(q, w)
        w.addcmul_(q, alpha, value=-1.0)
        if self._coupling:
            w.add_(self._slot_row((j - 1) % self.max_basis), alpha=-self._coupling)
        c = self._orthogonalize(w)
        beta = torch.linalg.vector_norm(w)
        # ||w before the pass||^2 = beta^2 + ||c||^2 (w just lost its components c along the orthonormal rows).
        if (beta * beta < _DGKS**2 * (beta * beta + c.square().sum())).item():
            c = c + self._orthogonalize(w)
            beta = torch.linalg.vector_norm(w)
        c64 = c.to(device="cpu", dtype=torch.float64)
        idx = torch.tensor(self._index, dtype=torch.long)  # Krylov index of each slot, in c's order
        column = torch.zeros(j + 1, dtype=torch.float64)
        column[idx] = c64
        column[j] += float(alpha)
        if self._coupling:
            column[j - 1] += self._coupling
        self._H[: j + 1, j] = column
        self._H[j, : j + 1] = column
        self.size = j + 1
        self.w, self.beta = w, float(beta)
        self.scale = max(self.scale, abs(float(column[j])), self.beta)
        return self.beta

    @property
    def broke_down(self) -> bool:
        """Whether the last residual vanished (the Krylov space is invariant under ``A``)."""
        eps = torch.finfo(self.dtype).eps
        return self.size >= self.op.numel or self.beta <= _BREAKDOWN_FACTOR * eps * self.scale

    @property
    def full(self) -> bool:
        """Whether the next vector has no free row (``thick_restart`` needed unless in window mode)."""
        return self.stored >= self.max_basis

    def _next_row(self) -> Tensor:
        if not self.window:
            if self.full:
                raise RuntimeError("the Lanczos basis is full: thick_restart() first")
            slot = self.stored
            self._index.append(self.size)
        else:
            slot = self.size % self.max_basis
            if slot < self.stored:
                self._index[slot] = self.size
            else:
                self._index.append(self.size)
        return self._slot_row(slot)

    def advance(self) -> None:
        """Continue the recurrence with ``q = w / beta``."""
        assert self.w is not None
        torch.div(self.w, self.beta, out=self._next_row())
        self._coupling = self.beta
        self.w = None

    def restart(self, generator: torch.Generator) -> None:
        """Continue with a random unit vector orthogonal to the basis (``H`` gets a zero coupling)."""
        q = _gaussian((self.op.numel,), generator, self.op).to(self.dtype)
        for _ in range(2):
            self._orthogonalize(q)
        row = self._next_row()
        torch.div(q, torch.linalg.vector_norm(q), out=row)
        self._coupling = 0.0
        self.w = None

    def thick_restart(self, S: Tensor, theta: Tensor) -> None:
        """Replace the full basis ``Q`` by the Ritz vectors ``Q S`` (in place), then continue with ``w / beta``.

        Args:
            S: Orthonormal eigenvectors of ``H`` to keep, shape ``(size, l)`` with ``l < max_basis``.
            theta: Their Ritz values, shape ``(l,)``.
        """
        assert self.w is not None and not self.window
        ell = S.shape[1]
        self._rotate(S)
        self._index = list(range(ell))
        self._H.zero_()
        self._H[range(ell), range(ell)] = theta.to(torch.float64)
        self.size = ell
        self.num_restarts += 1
        self.advance()  # the residual is orthogonal to every Ritz vector: the next basis vector
        self._coupling = 0.0  # it couples to every kept Ritz vector (Gram-Schmidt finds the arrowhead row)

    def _rotate(self, S: Tensor) -> None:
        """Overwrite rows ``0..l-1`` with ``Q S`` (``l`` columns of ``S``), chunk by chunk over the entries."""
        assert self._index == list(range(self.stored))
        S = S.to(dtype=self.dtype, device=self.op.device)
        blocks = self._in_use()
        n, ell = self.op.numel, S.shape[1]
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            out = torch.zeros(ell, stop - start, dtype=self.dtype, device=self.op.device)
            offset = 0
            for block in blocks:
                rows = block.shape[0]
                out.addmm_(S[offset : offset + rows].T, block[:, start:stop])
                offset += rows
            for i in range(ell):  # safe in place: each chunk of the result reads only the same chunk
                self._slot_row(i)[start:stop] = out[i]

    def ritz_vectors(self, S: Tensor) -> Tensor:
        """``Q S`` as columns, shape ``(numel, l)``, in the working dtype (a new tensor; the basis is unchanged)."""
        assert self._index == list(range(self.stored))
        S = S.to(dtype=self.dtype, device=self.op.device)
        out = torch.zeros(S.shape[1], self.op.numel, dtype=self.dtype, device=self.op.device)
        offset = 0
        for block in self._in_use():
            rows = block.shape[0]
            out.addmm_(S[offset : offset + rows].T, block)
            offset += rows
        return out.T

    def tridiagonal(self) -> Tensor:
        """The current projected matrix ``H`` (float64, on CPU: it is tiny); tridiagonal up to rounding."""
        return self._H[: self.size, : self.size].clone()
