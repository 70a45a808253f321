"""Private base of the curvature operators built from a model's outputs: ``A = J^T M J``.

``J`` is the Jacobian of the model's outputs with respect to the measured parameters and ``M`` a symmetric
positive semi-definite matrix on the output space, given by the loss of the outputs: its Hessian for the
generalised Gauss-Newton matrix (Schraudolph 2002; Martens 2020, "New insights and perspectives on the natural
gradient method"), the outer products of the per-term output gradients for the empirical Fisher (Kunstner, Hennig &
Balles 2019, "Limitations of the empirical Fisher approximation"). A product never forms ``J``: ``J v`` is a
Jacobian-vector product and ``J^T u`` a vector-Jacobian product, computed either

* reverse-only (``hvp="double_backward"``): ``J^T u`` by backward; ``J v = d/du <J^T u, v>`` by a second backward
  through the first (the "double-vjp" trick, linear in the dummy ``u``), sharing one forward and one first backward
  between every column of a ``matmat``; or
* forward-mode (``hvp="forward_over_reverse"``): ``torch.func.jvp`` for ``J v`` (``vmap``-ed over the columns) and
  ``torch.func.vjp`` for ``J^T u``.

``hvp="auto"`` tries the one preferred for the device first, as :class:`~lightning_gd.curvature.HessianOperator`.

Losses: ``M`` is written in closed form for the losses whose Hessian with respect to the outputs is known and
positive semi-definite (``_LOSSES``); any other is refused, naming it and the supported ones. Shapes: ``outputs``
``(n, C)`` logits with ``targets`` ``(n,)`` class indices or ``(n, C)`` probabilities for ``"cross_entropy"`` (flatten
a sequence model's ``(batch, time, C)`` to ``(batch * time, C)``); any ``(n, ...)`` with targets of the same shape
for ``"mse"`` and ``"bce_with_logits"``. A *term* is a row: an example, or a token once flattened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from lightning_gd.curvature.operator import HvpMethod, OperatorMode, _ModelOperator, _shape_of

OutputLoss = Literal["cross_entropy", "mse", "bce_with_logits"]
Reduction = Literal["mean", "sum"]
OutputFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]
_LOSSES: tuple[str, ...] = get_args(OutputLoss)
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)
_MODULES = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce_with_logits"}


@dataclass(frozen=True)
class LossSpec:
    """A loss of the model's outputs whose output-space curvature is known in closed form.

    Attributes:
        name: ``"cross_entropy"``, ``"mse"`` or ``"bce_with_logits"``.
        reduction: ``"mean"`` (over terms, and over the elements of a row for ``mse`` / ``bce_with_logits``,
            as ``torch.nn.functional`` does) or ``"sum"``.
        ignore_index: Cross-entropy targets to ignore (their rows count neither in the loss nor in ``n``).
        label_smoothing: Cross-entropy label smoothing.
    """

    name: OutputLoss
    reduction: Reduction = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0


def loss_spec(loss: OutputLoss | LossSpec | nn.Module) -> LossSpec:
    """The :class:`LossSpec` of a loss given by name, as a spec, or as a ``torch.nn`` loss module.

    Raises:
        ValueError: For a loss whose Hessian with respect to the outputs is not available in closed form (or not
            positive semi-definite), naming it and the supported ones; or for options that change it (class
            ``weight``, ``pos_weight``, a reduction other than mean/sum).
    """
    if isinstance(loss, LossSpec):
        spec = loss
    elif isinstance(loss, str) and loss in _LOSSES:
        spec = LossSpec(loss)  # type: ignore[arg-type]
    elif isinstance(loss, nn.Module) and type(loss) in _MODULES:
        name = _MODULES[type(loss)]
        for attr in ("weight", "pos_weight"):
            if getattr(loss, attr, None) is not None:
                raise ValueError(f"loss {loss!r}: `{attr}` is not supported by the Gauss-Newton/Fisher operators")
        spec = LossSpec(
            name,  # type: ignore[arg-type]
            reduction=loss.reduction,  # type: ignore[arg-type]
            ignore_index=int(getattr(loss, "ignore_index", -100)),
            label_smoothing=float(getattr(loss, "label_smoothing", 0.0)),
        )
    else:
        shown = loss if isinstance(loss, str) else type(loss).__name__
        raise ValueError(
            f"loss {shown!r} is not supported: the Gauss-Newton and Fisher operators need the loss's Hessian with"
            f" respect to the model's outputs in closed form, known for {_LOSSES} (or the torch.nn modules"
            f" {[c.__name__ for c in _MODULES]}). For another loss, measure curvature='hessian'."
        )
    if spec.reduction not in _REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {_REDUCTIONS}, got {spec.reduction!r}")
    return spec


class _OutputCurvature:
    """``M``, the per-term gradients and the loss value of one batch of outputs, for a :class:`LossSpec`."""

    def __init__(self, spec: LossSpec, outputs: Tensor, targets: Tensor) -> None:
        f = outputs.detach()
        self.spec, self.shape = spec, f.shape
        if spec.name == "cross_entropy":
            if f.ndim != 2:
                raise ValueError(f"cross_entropy needs outputs of shape (n, C), got {tuple(f.shape)}: flatten them")
            C = f.shape[1]
            if targets.shape == f.shape:
                y = targets.to(f.dtype)
                keep = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
            elif targets.shape == f.shape[:1] and not targets.is_floating_point():
                keep = targets != spec.ignore_index
                y = F.one_hot(targets.clamp_min(0) * keep, C).to(f.dtype) * keep[:, None]
            else:
                raise ValueError(f"cross_entropy targets must be (n,) indices or (n, C), got {_shape_of(targets)}")
            if spec.label_smoothing:
                y = (1 - spec.label_smoothing) * y + spec.label_smoothing / C * y.sum(dim=1, keepdim=True)
            p = torch.softmax(f, dim=1)
            mass = y.sum(dim=1, keepdim=True)  # 1 per kept row (0 for ignored ones)
            self.terms = int(keep.sum()) if spec.reduction == "mean" else 1
            self._p, self._mass, self._y, self._f = p, mass, y, f
            self.residual = mass * p - y  # d loss_i / d f_i, per term
            self._scale = 1.0 / max(self.terms, 1)
        else:
            if targets.shape != f.shape:
                raise ValueError(
                    f"{spec.name} targets must have the outputs' shape {tuple(f.shape)}, got {_shape_of(targets)}"
                )
            y = targets.to(f.dtype)
            n = f.shape[0] if f.ndim else 1
            per_row = f[0].numel() if f.ndim else 1
            self.terms = n if spec.reduction == "mean" else 1
            # mean over all elements = (1/n) sum_i loss_i with loss_i the mean over the row's elements.
            self._row = 1.0 / per_row if spec.reduction == "mean" else 1.0
            self._scale = 1.0 / n if spec.reduction == "mean" else 1.0
            if spec.name == "mse":
                self.residual = 2.0 * (f - y) * self._row
                self._curv = torch.full_like(f, 2.0 * self._row)
            else:  # bce_with_logits
                s = torch.sigmoid(f)
                self.residual = (s - y) * self._row
                self._curv = s * (1 - s) * self._row
            self._y, self._f = y, f

    def value(self) -> Tensor:
        spec, f, y = self.spec, self._f, self._y
        if spec.name == "cross_entropy":
            per_row = torch.logsumexp(f, dim=1) * self._mass[:, 0] - (y * f).sum(dim=1)
            return per_row.sum() * (self._scale if spec.reduction == "mean" else 1.0)
        if spec.name == "mse":
            total = (f - y).square().sum()
        else:
            total = F.binary_cross_entropy_with_logits(f, y, reduction="sum")
        return total * (self._row * self._scale if spec.reduction == "mean" else 1.0)

    def hessian(self, U: Tensor) -> Tensor:
        """``H_L U`` for ``U`` of shape ``(m, *outputs.shape)`` (the loss's Hessian in the outputs, per column)."""
        if self.spec.name == "cross_entropy":
            p = self._p
            return self._scale * self._mass * (p * U - p * (p * U).sum(dim=-1, keepdim=True))
        return self._scale * self._curv * U

    def fisher(self, U: Tensor) -> Tensor:
        """``(scale) sum_i r_i r_i^T U_i`` for ``U`` of shape ``(m, *outputs.shape)``: the per-term outer products."""
        r = self.residual
        dims = tuple(range(2, U.ndim))
        coeff = (r * U).sum(dim=dims, keepdim=True) if dims else r * U
        return self._scale * r * coeff


class _OutputOperator(_ModelOperator):
    """``J^T M J`` over a model's outputs: :class:`GGNOperator` and :class:`EmpiricalFisherOperator`."""

    _kind = "ggn"  # which M: "ggn" (the loss's Hessian) or "fisher" (per-term gradient outer products)

    def __init__(
        self,
        model: nn.Module,
        output_fn: OutputFn,
        loss: OutputLoss | LossSpec | nn.Module,
        batch: Any,
        params: Iterable[Tensor] | None = None,
        hvp: HvpMethod = "auto",
        mode: OperatorMode = "eval",
        *,
        seed: int = 0,
        chunk_size: int | None = None,
    ) -> None:
        if not callable(output_fn):
            raise ValueError(f"output_fn must be callable, got {output_fn!r}")
        self._spec = loss_spec(loss)
        super().__init__(model, batch, params, hvp, mode, seed, chunk_size)
        self._output_fn = output_fn
        # functional_call needs a module whose forward gives the outputs: wrap the model (registering it as a
        # child does not modify it) and prefix the parameter names accordingly.
        self._wrapper = _OutputModule(model, self._outputs)
        self._wrapped_names = tuple(f"model.{name}" for name in self._names)

    @property
    def loss_spec(self) -> LossSpec:
        """The loss of the outputs."""
        return self._spec

    def loss(self) -> Tensor:
        """Return the (detached, scalar) loss of the outputs in the measurement context."""
        with self._measuring(), torch.no_grad():
            outputs, targets = self._outputs(self._model)
            return _OutputCurvature(self._spec, outputs, targets).value().detach()

    def gradient(self) -> Tensor:
        """Return the flat gradient ``J^T r`` of the loss (same measurement context as the products)."""
        with self._measuring():
            outputs, targets = self._outputs(self._model)
            curv = _OutputCurvature(self._spec, outputs, targets)
            grads = torch.autograd.grad(
                outputs, self._params, grad_outputs=curv.residual * curv._scale, allow_unused=True
            )
        return self._flatten(grads)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(numel={self.numel}, params={len(self._names)}, loss={self._spec.name!r}, "
            f"hvp={self._requested_hvp!r} (using {self._method!r}), mode={self._mode!r})"
        )

    # ------------------------------------------------------------------ internals
    def _outputs(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        self._reseed()
        out = self._output_fn(model, self._batch)
        if not (isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
            raise ValueError(f"output_fn must return (outputs, targets) tensors, got {type(out).__name__}")
        return out[0], out[1]

    def _middle(self, curv: _OutputCurvature, U: Tensor) -> Tensor:
        return curv.hessian(U) if self._kind == "ggn" else curv.fisher(U)

    def _products(self, V: Tensor, method: str) -> Tensor:
        with self._measuring():
            if method == "double_backward":
                return self._reverse(V)
            step = self._chunk_size or V.shape[1]
            return torch.cat([self._forward(V[:, i : i + step]) for i in range(0, V.shape[1], step)], dim=1)

    def _reverse(self, V: Tensor) -> Tensor:
        outputs, targets = self._outputs(self._model)
        out = torch.zeros_like(V)
        if not outputs.requires_grad:
            return out
        curv = _OutputCurvature(self._spec, outputs, targets)
        dummy = torch.zeros_like(outputs, requires_grad=True)
        # J^T u as a (linear) function of u, kept as a graph: its derivative in u along v is J v.
        jt = torch.autograd.grad(outputs, self._params, grad_outputs=dummy, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(jt) if g is not None and g.requires_grad]
        if not live:
            return out
        offsets = [0]
        for n in self._numels:
            offsets.append(offsets[-1] + n)
        m = V.shape[1]
        for j in range(m):
            v = self._unflatten(V[:, j])
            (jv,) = torch.autograd.grad([jt[i] for i in live], dummy, grad_outputs=[v[i] for i in live],
                                        retain_graph=True)  # fmt: skip
            u = self._middle(curv, jv.detach().unsqueeze(0))[0]
            back = torch.autograd.grad(outputs, self._params, grad_outputs=u, retain_graph=j < m - 1, allow_unused=True)
            for i, h in enumerate(back):
                if h is not None:
                    out[offsets[i] : offsets[i + 1], j] = h.reshape(-1)
        return out

    def _forward(self, V: Tensor) -> Tensor:
        primals = tuple(p.detach() for p in self._params)
        wrapper, names, batch = self._wrapper, self._wrapped_names, self._batch
        targets_box: list[Tensor] = []

        def outputs_of(*values: Tensor) -> Tensor:
            outputs, targets = functional_call(wrapper, dict(zip(names, values, strict=True)), (batch,))
            if not targets_box:  # from the first (plain) call only: later calls run under vmap
                targets_box.append(targets.detach())
            return outputs

        outputs, vjp_fn = vjp(outputs_of, *primals)
        curv = _OutputCurvature(self._spec, outputs, targets_box[0])

        def jv_of(*tangents: Tensor) -> Tensor:
            return jvp(outputs_of, primals, tangents)[1]

        tangents = self._unflatten_batched(V)
        JV = vmap(jv_of, randomness="same")(*tangents)  # (m, *outputs.shape)
        U = self._middle(curv, JV.detach())
        columns = vmap(vjp_fn)(U)
        return self._flatten_batched(columns)


class _OutputModule(nn.Module):
    """``forward(batch) = output_fn(model, batch)``, so ``functional_call`` can swap the parameters."""

    def __init__(self, model: nn.Module, outputs: Callable[[nn.Module], tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.model = model
        self._outputs = outputs

    def forward(self, batch: Any) -> tuple[Tensor, Tensor]:  # batch is already bound in outputs
        return self._outputs(self.model)
