"""Private (block) Lanczos process with bounded memory, shared by ``lanczos`` and ``density``.

Lanczos tridiagonalisation (Lanczos 1950; Golub & Meurant 2010, "Matrices, Moments and Quadrature with
Applications"). In floating point the three-term recurrence loses orthogonality as soon as a Ritz value
converges, producing spurious copies. Each step therefore applies the three-term recurrence (cheap: it removes
the large components of ``A q``), then one classical Gram-Schmidt pass against every stored vector removes
what rounding left; its coefficients correct the new column of the projected matrix ``H = Q^T A Q``
(Rayleigh-Ritz on the Krylov space, tridiagonal up to rounding). A second pass runs only when the first still
cancelled more than ``1 - 1/sqrt(2)`` of the norm (Daniel, Gragg, Kaufman & Stewart 1976; "twice is enough",
Giraud et al. 2005): rarely after the recurrence, but always on the first step after a thick restart.

Blocks. With a start block of ``b`` orthonormal vectors the process is block Lanczos in Ruhe's band form (Ruhe
1979, "Implementation aspects of band Lanczos algorithms for computation of eigenvalues of large sparse symmetric
matrices"; Golub & Underwood 1977): vector ``j``'s product, orthogonalised against every stored vector, gives
vector ``j + b``, so ``H`` is banded with ``b`` sub-diagonals and the Krylov space is that of the whole block,
``span{Q_0, A Q_0, A^2 Q_0, ...}``. A single start vector's Krylov space holds one vector of each eigenspace, so
single-vector Lanczos cannot see the second copy of a repeated eigenvalue; a block of ``b`` finds up to ``b``
copies. The ``b`` products of a block are computed in one ``matmat`` (a Hessian operator then shares its forward
and first backward between them), then orthogonalised one after the other, which is the QR of the block's
residual. The residual of the Ritz pairs is ``A Q_m s - theta Q_m s = E s`` with ``E`` the couplings of the first
``m`` vectors to the ``b`` vectors ahead (rows of ``H`` below ``m``, and the pending residual). With ``b = 1``
every formula reduces to the single-vector process, operation for operation.

Memory. The basis is stored row-major in blocks of ``_BLOCK`` rows, one contiguous row per vector, allocated
once and never copied; Gram-Schmidt streams only the rows in use (one matrix-vector product per block and pass).
At most ``max_basis`` vectors are stored:

* :func:`~lightning_gd.curvature.lanczos` then *thick-restarts* (Wu & Simon 2000, "Thick-restart Lanczos
  method for large symmetric eigenvalue problems"): the basis is rotated in place onto the best Ritz vectors,
  the vectors ahead (and the residual) follow them, and the iteration goes on with ``A Q = Q H + (ahead) E``
  intact, so the residual bound and the warm start keep working;
* :func:`~lightning_gd.curvature.spectral_density` keeps a window of the latest ``max_basis`` vectors
  (local reorthogonalisation, single vector only): its Gauss quadrature stays exact for the probe's measure up to
  rounding, and a ghost copy of a converged Ritz value only splits that node's weight.

Sharded operators (see ``_utils``): each rank stores its part of every vector; the inner products, norms and
Gram-Schmidt coefficients are all-reduced (one small all-reduce per pass), and ``H`` is built from them only, so it
is the same on every rank and so is every decision taken on it. Memory per rank: the same counts of vectors, each
the size of the rank's part.

Precision: the basis, the residual and Gram-Schmidt are in the working dtype, the operator's dtype promoted to at
least float32 (float32 for bfloat16/float16/float32 operators, float64 for float64 ones); the operator receives
its own dtype; ``H`` is kept in float64 on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gd.curvature._utils import _allreduce, _dim, _dot, _gaussian, _matmat, _norm, _sharded, _work_dtype
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

    Usage: ``beta = step()`` (the product of vector ``size``, orthogonalised: residual ``w`` of norm ``beta``);
    then ``advance()`` (next vector ``w / beta``), ``restart(gen)`` (a random direction orthogonal to the basis,
    after a breakdown) or ``thick_restart(S)`` (keep the Ritz vectors ``Q S`` when the basis is full). With a
    block of ``b`` start vectors, ``b - 1`` vectors ahead of ``size`` are stored besides (see the module docstring).

    Extra memory on the operator's device, in the working dtype: the stored rows (at most ``max_basis``,
    allocated ``_BLOCK`` at a time) and the block's ``b`` products (the residual ``w`` is one of them); besides,
    the operator's own product output.

    Args:
        op: The symmetric operator.
        q0: Start vector (any nonzero scale), or a start block of shape ``(numel, b)``: orthonormalised here, a
            column that is (numerically) in the span of the previous ones replaced by a random direction.
        capacity: Most products this process will compute.
        max_basis: Most vectors stored at once (``>= b + 1``); ``None`` means ``capacity + b - 1``.
        window: What happens when ``max_basis`` vectors are stored and the caller advances: ``False`` (the caller
            must call :meth:`thick_restart` first), ``True`` (the oldest vector is overwritten: local
            reorthogonalisation; single vector only).
        generator: Source of the random columns that replace dependent start columns (block only).
    """

    def __init__(
        self,
        op: CurvatureOperator,
        q0: Tensor,
        capacity: int,
        max_basis: int | None = None,
        window: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.op = op
        self.dtype = _work_dtype(op.dtype)
        self.dim = _dim(op)  # the space's dimension (a sharded operator's vectors are this rank's part of it)
        self._sharded = _sharded(op)
        self.block = 1 if q0.ndim == 1 else q0.shape[1]
        if window and self.block > 1:
            raise ValueError("window mode is single-vector only")
        b = self.block
        limit = capacity + b - 1 if max_basis is None else max_basis
        self.max_basis = max(b + 1, min(capacity + b - 1, limit))
        self.window = window
        self._blocks: list[Tensor] = []
        self._index: list[int] = []  # Krylov index of the vector held in each slot
        self.size = 0  # vectors whose product is in the projected matrix H (restarts rebase it)
        dim = capacity if window else self.max_basis
        self._H = torch.zeros(dim, dim, dtype=torch.float64)
        self.beta = 0.0  # norm of the current residual w
        self._floor = 0  # H[j, i] for i >= floor are recurrence-known couplings (0 after a restart)
        self.w: Tensor | None = None
        self._pending: list[Tensor] = []  # products of the block computed ahead, in column order
        self.num_matvecs = 0
        self.capacity = capacity
        self.num_restarts = 0
        self.scale = 0.0  # running estimate of ||H||, for the breakdown threshold
        self._reorth_eta = torch.finfo(self.dtype).eps ** 0.25
        if b == 1:
            row = self._slot_row(0)
            row.copy_(q0)  # converts dtype and device without a temporary (q0 may be a warm start kept on the host)
            row.div_(_norm(op, row))
            self._index.append(0)
            return
        for i in range(b):
            row = self._slot_row(i)
            row.copy_(q0[:, i])
            self._orthonormalize_new(row, generator)
            self._index.append(i)

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

    def _in_use(self, rows: int | None = None) -> list[Tensor]:
        """The first ``rows`` stored rows (default: all), block by block (views, no copy)."""
        n, out = self.stored if rows is None else rows, []
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
        if self._sharded:  # one all-reduce for every coefficient of the pass
            coeffs = list(_allreduce(self.op, torch.cat(coeffs)).split([block.shape[0] for block in blocks]))
        for block, c in zip(blocks, coeffs, strict=True):
            w.addmv_(block.T, c, alpha=-1.0)
        return torch.cat(coeffs)

    def _orthonormalize_new(self, row: Tensor, generator: torch.Generator | None) -> None:
        """Make ``row`` (not yet counted in ``stored``) a unit vector orthogonal to the stored rows (twice is
        enough); a row that vanishes under the projection becomes a random direction."""
        for attempt in range(3):
            norm0 = _norm(self.op, row)
            if self.stored:
                for _ in range(2):
                    self._orthogonalize(row)
            norm = _norm(self.op, row)
            if norm > self._reorth_eta**2 * norm0 and norm > 0:
                row.div_(norm)
                return
            if attempt == 2:
                break
            gen = generator if generator is not None else torch.Generator().manual_seed(self.stored + 1)
            row.copy_(_gaussian((self.op.numel,), gen, self.op))
        raise RuntimeError("could not complete the Lanczos start block: the operator's space is exhausted")

    # ---------------------------------------------------------------- the recurrence
    def _product(self, j: int) -> Tensor:
        """``A q_j`` in the working dtype: computed now, or taken from the block computed ahead."""
        if self.block > 1 and not self._pending:
            # One matmat for every stored vector ahead whose product is still missing (at most b, within capacity).
            count = min(self.block, self.stored - j, self.capacity - self.num_matvecs)
            rows = torch.stack([self._slot_row(i % self.max_basis) for i in range(j, j + count)], dim=1)
            out = _matmat(self.op, rows.to(self.op.dtype)).to(self.dtype)
            del rows
            self.num_matvecs += count
            self._pending = list(out.unbind(dim=1))
        if self._pending:
            return self._pending.pop(0).clone()  # a contiguous residual; the block's output is freed column by column
        q = self._slot_row(j % self.max_basis)
        self.num_matvecs += 1
        return self.op.matvec(q.to(self.op.dtype)).to(self.dtype)

    def step(self) -> float:
        """Apply ``A`` to vector ``size``, orthogonalise the result; return the residual norm ``beta``."""
        j = self.size
        slot = j % self.max_basis  # vector j lives in slot j mod max_basis (window), slot j otherwise
        q = self._slot_row(slot)
        w = self._product(j)
        # The known part of the band first (cheap, and it removes the large components: for b = 1 the three-term
        # recurrence), then one Gram-Schmidt pass against every stored vector for what rounding left; a second
        # pass only if that one still cancelled.
        alpha = _dot(self.op, q, w)
        w.addcmul_(q, alpha, value=-1.0)
        known = [(i, float(self._H[j, i])) for i in range(max(self._floor, j - self.block), j)]
        known = [(i, h) for i, h in known if h]
        for i, h in known:
            w.add_(self._slot_row(i % self.max_basis), alpha=-h)
        c = self._orthogonalize(w)
        beta = _norm(self.op, w)
        # ||w before the pass||^2 = beta^2 + ||c||^2 (w just lost its components c along the orthonormal rows).
        if (beta * beta < _DGKS**2 * (beta * beta + c.square().sum())).item():
            c = c + self._orthogonalize(w)
            beta = _norm(self.op, w)
        c64 = c.to(device="cpu", dtype=torch.float64)
        idx = torch.tensor(self._index, dtype=torch.long)  # Krylov index of each slot, in c's order
        column = torch.zeros(max(j, max(self._index)) + 1, dtype=torch.float64)
        column[idx] = c64
        column[j] += float(alpha)
        for i, h in known:
            column[i] += h
        length = column.numel()
        self._H[:length, j] = column
        self._H[j, :length] = column
        self.size = j + 1
        self.w, self.beta = w, float(beta)
        self.scale = max(self.scale, abs(float(column[j])), self.beta)
        return self.beta

    @property
    def broke_down(self) -> bool:
        """Whether the last residual vanished (the Krylov space is invariant under ``A``)."""
        eps = torch.finfo(self.dtype).eps
        return self.size >= self.dim or self.beta <= _BREAKDOWN_FACTOR * eps * self.scale

    @property
    def full(self) -> bool:
        """Whether the next vector has no free row (``thick_restart`` needed unless in window mode)."""
        return self.stored >= self.max_basis

    @property
    def has_pending(self) -> bool:
        """Whether products of the current block are computed but not yet orthogonalised."""
        return bool(self._pending)

    @property
    def exhausted(self) -> bool:
        """Whether the stored vectors span the whole space (no further vector can be orthogonal to them)."""
        return not self.window and self.stored >= self.dim

    def residual_norms(self, S: Tensor) -> Tensor:
        """``||A Q_m s - theta Q_m s||`` for the columns ``s`` of ``S`` (eigenvectors of :meth:`projected`)."""
        m = self.size
        last = (self.beta * S[-1]).abs()  # the pending residual couples to vector m - 1 only
        if self.block == 1:
            return last
        ahead = self._H[m : max(m, self.stored), :m] @ S
        return torch.sqrt(ahead.square().sum(dim=0) + last.square())

    def _next_row(self) -> Tensor | None:
        if not self.window:
            if self.exhausted:
                return None
            if self.full:
                raise RuntimeError("the Lanczos basis is full: thick_restart() first")
            slot = self.stored
            self._index.append(slot)
        else:
            slot = self.size % self.max_basis
            if slot < self.stored:
                self._index[slot] = self.size
            else:
                self._index.append(self.size)
        return self._slot_row(slot)

    def advance(self) -> None:
        """Continue the recurrence with the next vector ``w / beta`` (``b`` places ahead for a block)."""
        assert self.w is not None
        new = self.size if self.window else self.stored  # Krylov index of the new vector
        row = self._next_row()
        if row is not None:
            torch.div(self.w, self.beta, out=row)
            self._H[new, self.size - 1] = self._H[self.size - 1, new] = self.beta  # the recurrence's coupling
        self.w = None

    def restart(self, generator: torch.Generator) -> None:
        """Continue with a random unit vector orthogonal to the basis (``H`` gets a zero coupling)."""
        q = _gaussian((self.op.numel,), generator, self.op).to(self.dtype)
        for _ in range(2):
            self._orthogonalize(q)
        row = self._next_row()
        if row is not None:
            torch.div(q, _norm(self.op, q), out=row)
        self.w = None

    def thick_restart(self, S: Tensor, theta: Tensor) -> None:
        """Replace the first ``size`` vectors ``Q`` by the Ritz vectors ``Q S`` (in place), move the vectors ahead
        after them, then continue with ``w / beta``.

        Args:
            S: Orthonormal eigenvectors of ``H`` to keep, shape ``(size, l)`` with ``l + b <= max_basis``.
            theta: Their Ritz values, shape ``(l,)``.
        """
        assert self.w is not None and not self.window
        m, ell = self.size, S.shape[1]
        S64 = S.to(torch.float64)
        ahead = self._H[m : self.stored, :m] @ S64  # couplings of the Ritz vectors to the stored vectors ahead
        self._rotate(S)
        for a in range(self.stored - m):  # the vectors ahead follow the Ritz vectors (forward copy: no overlap)
            self._slot_row(ell + a).copy_(self._slot_row(m + a))
        kept = ell + self.stored - m
        self._index = list(range(kept))
        self._H.zero_()
        self._H[range(ell), range(ell)] = theta.to(torch.float64)
        self._H[ell:kept, :ell] = ahead
        self._H[:ell, ell:kept] = ahead.T
        self.size = ell
        self.num_restarts += 1
        self._floor = ell  # the Ritz vectors' couplings are left to Gram-Schmidt (the arrowhead rows)
        beta = self.beta
        self.advance()  # the residual is orthogonal to every Ritz vector: the next basis vector
        self._H[kept, :ell] = beta * S64[-1]  # the arrowhead row of the residual (what the bound needs)
        self._H[:ell, kept] = beta * S64[-1]

    def _rotate(self, S: Tensor) -> None:
        """Overwrite rows ``0..l-1`` with ``Q S`` (``l`` columns of ``S``, ``Q`` the first ``S.shape[0]`` rows),
        chunk by chunk over the entries."""
        assert self._index == list(range(self.stored))
        S = S.to(dtype=self.dtype, device=self.op.device)
        blocks = self._in_use(S.shape[0])
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
        assert self.window or self._index[: S.shape[0]] == list(range(S.shape[0]))
        S = S.to(dtype=self.dtype, device=self.op.device)
        out = torch.zeros(S.shape[1], self.op.numel, dtype=self.dtype, device=self.op.device)
        offset = 0
        for block in self._in_use(S.shape[0]):
            rows = block.shape[0]
            out.addmm_(S[offset : offset + rows].T, block)
            offset += rows
        return out.T

    def projected(self) -> Tensor:
        """The current projected matrix ``H = Q^T A Q`` of the first ``size`` vectors (float64, on CPU: it is tiny);
        tridiagonal up to rounding for a single vector, banded with ``b`` sub-diagonals for a block."""
        return self._H[: self.size, : self.size].clone()
