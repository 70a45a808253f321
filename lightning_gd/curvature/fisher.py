"""Empirical Fisher matrix of a model's loss, as a matrix-free symmetric operator.

``F = (1/n) sum_i g_i g_i^T = G^T G / n`` for the per-term gradients ``g_i = J_i^T r_i`` of a loss that is a mean
of ``n`` terms (``sum`` reduction: without the ``1/n``), so that ``F`` is on the loss's own scale. Products are
``J^T (r r^T (J v)) / n`` by a Jacobian-vector and a vector-Jacobian product (see ``_output``): the per-term
gradients are never formed.

Where it is the right choice: it is cheap (one forward), PSD, and what adaptive methods' second moments estimate
(Adam's ``v`` is an EMA of its diagonal, at batch level). It is *not* a curvature of the loss: it scales with the
residuals, so it vanishes at an interpolating minimum where the GGN does not, and its eigenvectors can differ from
the Hessian's (Kunstner, Hennig & Balles 2019, "Limitations of the empirical Fisher approximation for natural
gradient descent"). Track it to watch gradient noise and alignment; use the GGN or the Hessian for sharpness.
"""

from __future__ import annotations

from lightning_gd.curvature._output import _OutputOperator

__all__ = ["EmpiricalFisherOperator"]


class EmpiricalFisherOperator(_OutputOperator):
    """Empirical Fisher ``G^T G / n`` of ``loss(output_fn(model, batch))`` (``G``: per-term gradients as rows).

    Same arguments and conventions as :class:`~lightning_gd.curvature.GGNOperator`; a term is a row of the outputs
    (an example, or a token once a sequence model's outputs are flattened).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_gd.curvature import EmpiricalFisherOperator, hutchinson_trace
        >>> model = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> op = EmpiricalFisherOperator(model, lambda m, b: (m(b[0]), b[1]), "mse", (x, y))
        >>> op.numel
        4
    """

    _kind = "fisher"
