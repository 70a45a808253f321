"""Generalised Gauss-Newton matrix of a model's loss, as a matrix-free symmetric operator.

``G = J^T H_L J``: ``J`` the Jacobian of the outputs with respect to the parameters, ``H_L`` the Hessian of the
loss with respect to the outputs (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient
descent"; Martens 2020). The Hessian is ``G`` plus a term weighted by the loss's output gradient, so the two agree
at an interpolating minimum; ``G`` is positive semi-definite whenever the loss is convex in the outputs, which it is
for cross-entropy, MSE and logistic losses. Products use a Jacobian-vector and a vector-Jacobian product (see
``_output``), never ``J``.

Where it is the right choice: on classification losses the GGN is "what is often meant by the Hessian" (the
outlier eigenvalues of Sagun et al. 2017, "Empirical Analysis of the Hessian of Over-Parametrized Neural Networks",
come from it); being PSD, its spectral density can be drawn on a log scale, where its C - 1 outliers stand out from
the bulk near zero, and its trace and top eigenvalue never mix positive and negative curvature. Measure the Hessian
itself to see negative curvature (saddles, ``lambda_min``) or the exact stability edge of gradient descent away
from a minimum.
"""

from __future__ import annotations

from lightning_gd.curvature._output import LossSpec, OutputFn, OutputLoss, _OutputOperator, loss_spec

__all__ = ["GGNOperator", "LossSpec", "OutputFn", "OutputLoss", "loss_spec"]


class GGNOperator(_OutputOperator):
    """Generalised Gauss-Newton matrix ``J^T H_L J`` of ``loss(output_fn(model, batch))``, a symmetric PSD operator.

    Same conventions as :class:`~lightning_gd.curvature.HessianOperator` (flat vectors over ``params``, products in
    the parameters' dtype, the measurement context: modes, RNG, buffers and grads left as found, autocast off, the
    math attention kernel). ``H_L`` is written in closed form for the supported losses; any other loss is refused.

    Args:
        model: The module.
        output_fn: ``output_fn(model, batch) -> (outputs, targets)``; for ``"cross_entropy"`` ``outputs`` are
            ``(n, C)`` logits and ``targets`` ``(n,)`` class indices or ``(n, C)`` probabilities (flatten a sequence
            model's outputs to ``(batch * time, C)``); for ``"mse"`` and ``"bce_with_logits"`` any shape, targets
            alike.
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, a :class:`LossSpec` (reduction, ignore_index,
            label_smoothing) or the matching ``torch.nn`` module (``nn.CrossEntropyLoss(ignore_index=...)``).
        batch: Anything ``output_fn`` accepts.
        params: Parameters to differentiate with respect to (default: all trainable ones).
        hvp: ``"auto"``, ``"double_backward"`` (``J v`` by a second backward through ``J^T u``) or
            ``"forward_over_reverse"`` (``J v`` by forward mode, ``vmap``-ed); ``"auto"`` as for the Hessian.
        mode: ``"eval"`` or ``"train"``.
        seed: Seed of the forked RNG before every forward.
        chunk_size: Columns per ``vmap`` call in forward mode.

    Raises:
        ValueError: On an unsupported loss (naming it and the supported ones), a bad ``hvp``/``mode``/``chunk_size``,
            or a bad parameter selection.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_gd.curvature import GGNOperator, lanczos
        >>> model = nn.Linear(3, 4).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 4, (16,))
        >>> op = GGNOperator(model, lambda m, b: (m(b[0]), b[1]), "cross_entropy", (x, y))
        >>> bool(lanczos(op, which="smallest", tol=1e-8).eigenvalues[0] > -1e-10)  # positive semi-definite
        True
    """

    _kind = "ggn"
