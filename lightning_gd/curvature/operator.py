"""Matrix-free Hessian of a model's loss on a fixed batch.

The Hessian of ``loss_fn(model, batch)`` with respect to some parameters is never formed: it is
applied to vectors by automatic differentiation (Pearlmutter 1994, "Fast exact multiplication by
the Hessian"), either reverse-over-reverse ("double backward") or forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``, batched over vectors with ``torch.func.vmap``), or, where neither
is available, by central differences of two ordinary gradients (``_differences``: no second-order graph,
accurate to about ``finfo(dtype).eps ** (2/3)``).
This is the operator the estimators of :mod:`lightning_gd.curvature` consume: Hutchinson (1989)
and Hutch++ (Meyer et al. 2021) traces, Lanczos eigenvalues (Golub & Meurant 2010) and the
stochastic Lanczos quadrature density of Ghorbani et al. (2019), as popularised by PyHessian
(Yao et al. 2020).

Measuring never leaves a trace on the model: parameter ``.grad``, buffers, train/eval flags of
every submodule and the CPU/CUDA random number generators are restored after every product.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _NormBase

from lightning_gd.curvature._differences import _central_differences, finite_difference_eps

__all__ = ["HessianOperator", "HvpMethod", "OperatorMode"]

_log = logging.getLogger(__name__)

HvpMethod = Literal["auto", "double_backward", "forward_over_reverse", "finite_difference"]
OperatorMode = Literal["eval", "train"]
_HVP_METHODS: tuple[str, ...] = get_args(HvpMethod)
_MODES: tuple[str, ...] = get_args(OperatorMode)


class _ModelOperator:
    """What every operator on a model's parameters shares: the parameter selection, flat vectors, the measurement
    context (modes, RNG, buffers, grads restored; see :class:`HessianOperator`) and the ``"auto"`` choice between
    the ways a product is computed. Subclasses define ``_products(V, method)``, ``loss()`` and ``gradient()``, and
    say with ``_finite_difference`` whether central differences of gradients are one of their methods."""

    _finite_difference = False  # whether "finite_difference" is a product method of this operator (the Hessian's)

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        params: Iterable[Tensor] | None,
        hvp: HvpMethod,
        mode: OperatorMode,
        seed: int,
        chunk_size: int | None,
    ) -> None:
        methods = tuple(m for m in _HVP_METHODS if self._finite_difference or m != "finite_difference")
        if hvp not in methods:
            raise ValueError(f"hvp must be one of {methods}, got {hvp!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        names, tensors = _select_params(model, params)
        self._model = model
        self._batch = batch
        self._names = names
        self._params = tensors
        self._shapes = tuple(p.shape for p in tensors)
        self._numels = tuple(p.numel() for p in tensors)
        self._requested_hvp = hvp
        self._method: str | None = None if hvp == "auto" else hvp
        self._mode = mode
        self._seed = int(seed)
        self._chunk_size = chunk_size
        self._num_matvecs = 0

    # ------------------------------------------------------------------ properties
    @property
    def numel(self) -> int:
        """Total number of measured parameter entries (the operator's size)."""
        return sum(self._numels)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the flat vectors (that of the first measured parameter)."""
        return self._params[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of the flat vectors (that of the first measured parameter)."""
        return self._params[0].device

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the measured parameters, in flat-vector order."""
        return self._names

    @property
    def param_numels(self) -> tuple[int, ...]:
        """Number of entries of each measured parameter, in flat-vector order."""
        return self._numels

    @property
    def params(self) -> tuple[Tensor, ...]:
        """The measured parameters, in flat-vector order."""
        return self._params

    @property
    def mode(self) -> str:
        """``"eval"`` or ``"train"``."""
        return self._mode

    @property
    def hvp_method(self) -> str | None:
        """HVP method in use; ``None`` while ``hvp="auto"`` has not run its first product yet."""
        return self._method

    @property
    def num_matvecs(self) -> int:
        """Number of operator products computed (a ``matmat`` with m columns counts m)."""
        return self._num_matvecs

    # ------------------------------------------------------------------ public products
    def matvec(self, v: Tensor) -> Tensor:
        """Return the product ``A @ v`` (the Hessian, Gauss-Newton or Fisher matrix ``A`` of the subclass).

        Args:
            v: Flat vector of shape ``(numel,)``.

        Returns:
            ``A @ v`` of shape ``(numel,)``, in :attr:`dtype` on :attr:`device`.
        """
        if not isinstance(v, Tensor) or v.shape != (self.numel,):
            raise ValueError(f"v must be a tensor of shape ({self.numel},), got {_shape_of(v)}")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for a batch of vectors.

        Args:
            V: Matrix of shape ``(numel, m)`` whose columns are flat vectors.

        Returns:
            ``A @ V`` of shape ``(numel, m)``, in :attr:`dtype` on :attr:`device`.
        """
        if not isinstance(V, Tensor) or V.ndim != 2 or V.shape[0] != self.numel:
            raise ValueError(f"V must be a tensor of shape ({self.numel}, m), got {_shape_of(V)}")
        V = V.to(dtype=self.dtype, device=self.device)
        if V.shape[1] == 0:
            return V.clone()
        if self._method is None:
            out = self._auto(V)
        else:
            out = self._products(V, self._method)
        self._num_matvecs += V.shape[1]
        return out

    def _auto(self, V: Tensor) -> Tensor:
        """Try the methods in ``_auto_methods()`` order, each after the previous one raised, and remember the first
        that works (central differences last: they are approximate, the two AD methods exact).

        Raises:
            RuntimeError: When every method fails, naming every failure (e.g. reentrant activation checkpointing,
                which refuses ``torch.autograd.grad``, around an op without a double backward).
        """
        order = self._auto_methods()
        failures: list[tuple[str, Exception]] = []
        for i, method in enumerate(order):
            try:
                out = self._products(V, method)
            except torch.OutOfMemoryError:
                raise  # Memory pressure is not a missing-feature signal: do not hide it.
            except Exception as err:  # noqa: BLE001 - any failure of an AD path means "fall back"
                first = failures[0][1] if failures else None
                if i == 1 and type(err) is type(first) and str(err) == str(first):
                    raise  # the same failure both exact ways (e.g. a bad loss): not about the HVP method
                failures.append((method, err))
                if i + 1 < len(order):
                    _log.info("%s HVP failed (%s: %s); using %s", method, type(err).__name__, err, order[i + 1])
                continue
            self._method = method
            return out
        tried = "; ".join(f"{m} failed with {type(e).__name__}: {e}" for m, e in failures)
        raise RuntimeError(
            f"{type(self).__name__}(hvp='auto'): no product method works for this model and loss. {tried}. With"
            " activation checkpointing, use torch.utils.checkpoint(use_reentrant=False), which double backward"
            " supports, or measure on an unwrapped copy of the model."
        ) from failures[-1][1]

    def _auto_methods(self) -> tuple[str, ...]:
        """The order ``hvp="auto"`` tries: the device's preferred AD method, the other, then central differences."""
        return _auto_order(self.device) + (("finite_difference",) if self._finite_difference else ())

    def _products(self, V: Tensor, method: str) -> Tensor:
        raise NotImplementedError

    def _cuda_devices(self) -> list[int]:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return []  # Touching an uninitialised CUDA RNG would initialise (and change) it.
        devices = {p.device.index for p in self._params if p.device.type == "cuda"}
        devices.add(torch.cuda.current_device())
        return sorted(d for d in devices if d is not None)

    def _reseed(self) -> None:
        # Called inside the forked RNG: each forward draws the same random numbers.
        torch.default_generator.manual_seed(self._seed)
        for index in self._cuda_devices():
            torch.cuda.default_generators[index].manual_seed(self._seed)

    @contextlib.contextmanager
    def _measuring(self, math_attention: bool = True) -> Iterator[None]:
        """Modes, RNG, buffers, ``.grad`` and ``requires_grad`` left as found; autocast off; with
        ``math_attention``, attention through SDPA's math kernel (what the AD methods need)."""
        model = self._model
        training = [(module, module.training) for module in model.modules()]
        grads = [(p, p.grad) for p in model.parameters()]
        requires = [(p, p.requires_grad) for p in self._params]
        buffers = [
            (module, name, buf, buf.clone())
            for module in model.modules()
            for name, buf in module._buffers.items()
            if buf is not None
        ]
        norms: list[_NormBase] = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self._cuda_devices(), device_type="cuda"))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            if _autocast_available(self.device.type):
                stack.enter_context(torch.autocast(device_type=self.device.type, enabled=False))
            # Flash / memory-efficient attention kernels have neither forward-mode AD nor double backward:
            # measure through the math kernel, which is plain differentiable ops. Central differences need first
            # derivatives only: they keep the fused kernels the model trains with.
            if math_attention:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            try:
                model.train(self._mode == "train")
                if self._mode == "train":
                    # Batch statistics without running-stat updates: a deterministic train forward.
                    norms = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
                    for norm in norms:
                        norm.track_running_stats = False
                for p in self._params:
                    p.requires_grad_(True)
                yield
            finally:
                for norm in norms:
                    norm.track_running_stats = True
                for module, flag in training:
                    module.training = flag
                for p, req in requires:
                    p.requires_grad_(req)
                for p, g in grads:
                    p.grad = g
                _restore_buffers(buffers)

    def _flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return _flatten(tensors, self._numels, self.dtype, self.device)

    def _unflatten(self, vec: Tensor) -> list[Tensor]:
        return _unflatten(vec, self._params)

    def _unflatten_batched(self, V: Tensor) -> list[Tensor]:
        rows = V.T.split(self._numels, dim=1)
        return [
            r.reshape(V.shape[1], *p.shape).to(dtype=p.dtype, device=p.device)
            for r, p in zip(rows, self._params, strict=True)
        ]

    def _flatten_batched(self, tensors: Sequence[Tensor]) -> Tensor:
        cols = [t.reshape(t.shape[0], -1).to(dtype=self.dtype, device=self.device) for t in tensors]
        return torch.cat(cols, dim=1).T.contiguous()


class HessianOperator(_ModelOperator):
    """Hessian of ``loss_fn(model, batch)`` w.r.t. parameters, as a symmetric linear operator.

    Vectors are flat: the parameters' entries concatenated in :attr:`param_names` order.

    Determinism and side effects. Every product runs inside a measurement context that

    * puts the model in eval mode (``mode="eval"``), or in train mode (``mode="train"``) with the
      normalisation layers (``BatchNorm``/``InstanceNorm``) using batch statistics *without*
      updating their running statistics (their ``track_running_stats`` is switched off for the
      duration of the forward), then restores every submodule's ``training`` flag;
    * forks the CPU RNG (and the CUDA RNG of the devices involved) and re-seeds it with ``seed``
      before each forward, so dropout masks and any other random op are identical in every
      product: the measured function is deterministic, hence the operator linear and symmetric.
      The caller's RNG state is restored afterwards;
    * snapshots all buffers and restores them (only when changed), restores every parameter's
      ``.grad`` reference (products use ``torch.autograd.grad``, which never accumulates);
    * disables autocast and enables grad, so the Hessian is measured in the parameters' dtype, and
      restricts ``scaled_dot_product_attention`` to its math kernel (the fused kernels have no
      forward-mode AD or double backward; central differences keep them).

    The batch is passed to ``loss_fn`` untouched; the parameters are read at each product, so
    the operator follows in-place updates of the model.

    Precision and memory. Products are computed and returned in the parameters' dtype (:attr:`dtype`, that of
    the first measured parameter), with autocast off: under ``bf16-mixed`` the float32 parameters give float32
    products; a model cast to bfloat16 gives bfloat16 products. Beyond autograd's own memory for the product
    (the create-graph gradient and its backward), ``matmat(V)`` holds its output, ``V.shape[1]`` flat vectors;
    double backward writes each product straight into it, forward-over-reverse also holds the ``vmap``-ed
    tangents and outputs of one chunk, central differences one copy of the measured parameters and one gradient.

    Central differences (``hvp="finite_difference"``): ``(g(theta + h v) - g(theta - h v)) / 2h``, two ordinary
    gradients per product (``torch.autograd.grad``, first order only) with ``h = 0.1 fd_eps w(v) / a(v)``: the
    entries of ``v`` that move most (``a(v) = sqrt(sum v^4 / sum v^2)``, spread or localised) move by a tenth of
    ``fd_eps`` times the weights where ``v`` sits (``w(v)``, their RMS; ``_differences``). Truncation ``O(h^2)``
    against roundoff ``O(u / h)`` gives ``fd_eps = finfo(dtype).eps ** (1/3)`` and a relative error of the order of
    ``finfo(dtype).eps ** (2/3)`` (2.4e-5 in float32; 3.9% in bfloat16, so a model held in half
    precision gets a coarse product: see :func:`~lightning_gd.curvature.finite_difference_error`). The parameters
    are perturbed in place and copied back bit for bit after every product. The product is not exactly linear or
    symmetric (its error is), which Lanczos and the trace estimators tolerate at that size. Use it where no exact
    method runs (ops without a double backward or forward-mode AD); ``"auto"`` falls back to it there.

    Args:
        model: The module whose loss is measured.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batch: Anything ``loss_fn`` accepts (tensor, tuple, dict, ...).
        params: Parameters of ``model`` to differentiate with respect to. Defaults to all
            parameters with ``requires_grad=True``, in ``named_parameters()`` order.
        hvp: ``"forward_over_reverse"``, ``"double_backward"``, ``"finite_difference"`` or ``"auto"``: on the
            first product try the exact method preferred for the device, fall back to the other if it raises (an op
            without forward-mode AD or without a double backward), then to central differences if both raise, and
            keep that choice. On CPU double backward comes first (1.06-1.39x faster per product in
            benchmarks/RESULTS.md, and more ops support it, e.g. ``cdist``, ``grid_sample``, ``embedding_bag``);
            on accelerators forward-over-reverse comes first (``vmap`` batches the probes of a ``matmat``).
        mode: ``"eval"`` or ``"train"`` (see above).
        seed: Seed of the forked RNG before every forward.
        chunk_size: For forward-over-reverse, at most this many vectors are pushed through one
            ``vmap`` call (bounds memory); ``None`` means all at once.
        fd_eps: Relative step of central differences (> 0); ``None``: ``finfo(dtype).eps ** (1/3)`` of the
            parameters' dtype.

    Raises:
        ValueError: On an unknown ``hvp`` or ``mode``, a non-positive ``fd_eps``, an empty parameter selection, or
            parameters that are not floating point or do not belong to ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_gd.curvature import HessianOperator
        >>> model = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> op = HessianOperator(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y))
        >>> op.numel
        4
        >>> op.matvec(torch.ones(op.numel, dtype=torch.float64)).shape
        torch.Size([4])
        >>> fd = HessianOperator(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y),
        ...                      hvp="finite_difference")
        >>> v = torch.ones(op.numel, dtype=torch.float64)
        >>> bool(((fd.matvec(v) - op.matvec(v)).norm() / op.matvec(v).norm()) < 1e-8)
        True
    """

    _finite_difference = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        batch: Any,
        params: Iterable[Tensor] | None = None,
        hvp: HvpMethod = "auto",
        mode: OperatorMode = "eval",
        *,
        seed: int = 0,
        chunk_size: int | None = None,
        fd_eps: float | None = None,
    ) -> None:
        super().__init__(model, batch, params, hvp, mode, seed, chunk_size)
        self._fd_eps = _check_fd_eps(fd_eps, self.dtype)
        self._loss_fn = loss_fn
        # functional_call needs a module whose forward is the loss: wrap the model (registering
        # it as a child does not modify it) and prefix the parameter names accordingly.
        self._wrapper = _LossModule(model, self._call_loss)
        self._wrapped_names = tuple(f"model.{name}" for name in self._names)

    def gradient(self) -> Tensor:
        """Return the flat gradient of the loss (same measurement context as the products)."""
        with self._measuring():
            loss = self._call_loss(self._model)
            if not loss.requires_grad:
                return torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        return self._flatten(grads)

    def loss(self) -> Tensor:
        """Return the (detached, scalar) loss in the measurement context."""
        with self._measuring(), torch.no_grad():
            return self._call_loss(self._model).detach()

    def __repr__(self) -> str:
        return (
            f"HessianOperator(numel={self.numel}, params={len(self._names)}, "
            f"hvp={self._requested_hvp!r} (using {self._method!r}), mode={self._mode!r})"
        )

    # ------------------------------------------------------------------ internals
    def _products(self, V: Tensor, method: str) -> Tensor:
        if method == "finite_difference":
            with self._measuring(math_attention=False):
                return _central_differences(self._params, self._gradients, V, self._fd_eps, lambda t: t)
        with self._measuring():
            if method == "double_backward":
                return self._double_backward(V)
            step = self._chunk_size or V.shape[1]
            chunks = [self._forward_over_reverse(V[:, i : i + step]) for i in range(0, V.shape[1], step)]
            return torch.cat(chunks, dim=1)

    def _gradients(self) -> Sequence[Tensor | None]:
        # First order only (no graph kept): what central differences need.
        loss = self._call_loss(self._model)
        if not loss.requires_grad:
            return [None] * len(self._params)
        return torch.autograd.grad(loss, self._params, allow_unused=True)

    def _double_backward(self, V: Tensor) -> Tensor:
        # The first-order graph is built once and reused for every column (retain_graph).
        loss = self._call_loss(self._model)
        out = torch.zeros_like(V)
        if not loss.requires_grad:
            return out
        grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        # Gradients that do not depend on any parameter contribute nothing to H v.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:
            return out
        outputs = [grads[i] for i in live]
        offsets = [0]
        for n in self._numels:
            offsets.append(offsets[-1] + n)
        m = V.shape[1]
        for j in range(m):
            v = self._unflatten(V[:, j])
            hv = torch.autograd.grad(
                outputs,
                self._params,
                grad_outputs=[v[i] for i in live],
                retain_graph=j < m - 1,
                allow_unused=True,
            )
            for i, h in enumerate(hv):  # straight into the output: no flat temporary vector
                if h is not None:
                    out[offsets[i] : offsets[i + 1], j] = h.reshape(-1)
            del hv
        return out

    def _forward_over_reverse(self, V: Tensor) -> Tensor:
        primals = tuple(p.detach() for p in self._params)
        wrapper, names, batch = self._wrapper, self._wrapped_names, self._batch

        def loss_of(*values: Tensor) -> Tensor:
            return functional_call(wrapper, dict(zip(names, values, strict=True)), (batch,))

        grad_fn = grad(loss_of, argnums=tuple(range(len(primals))))

        def hvp(*tangents: Tensor) -> tuple[Tensor, ...]:
            return jvp(grad_fn, primals, tangents)[1]

        if V.shape[1] == 1:
            return self._flatten(hvp(*self._unflatten(V[:, 0]))).unsqueeze(1)
        # randomness="same": every column sees the same dropout mask (one forward is traced).
        columns = vmap(hvp, randomness="same")(*self._unflatten_batched(V))
        return self._flatten_batched(columns)

    def _call_loss(self, model: nn.Module) -> Tensor:
        self._reseed()
        loss = self._loss_fn(model, self._batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {_shape_of(loss)}")
        return loss.reshape(())


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, call_loss: Callable[[nn.Module], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._call_loss = call_loss

    def forward(self, batch: Any) -> Tensor:  # batch is already bound in call_loss
        return self._call_loss(self.model)


def _select_params(model: nn.Module, params: Iterable[Tensor] | None) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """Resolve the measured parameters and their names, in a stable order."""
    if params is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("params=None selects no parameter: model has no parameter with requires_grad=True")
    else:
        name_of = {id(p): n for n, p in model.named_parameters()}
        named, seen = [], set()
        for i, p in enumerate(params):
            if id(p) not in name_of:
                raise ValueError(f"params[{i}] (shape {_shape_of(p)}) is not a parameter of model")
            if id(p) not in seen:
                seen.add(id(p))
                named.append((name_of[id(p)], p))
        if not named:
            raise ValueError(f"params must select at least one parameter, got {params!r}")
    for name, p in named:
        if not p.is_floating_point():
            raise ValueError(f"params: parameter {name!r} must be floating point, got {p.dtype}")
    return tuple(n for n, _ in named), tuple(p for _, p in named)


def _flatten(
    tensors: Sequence[Tensor | None], numels: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Concatenate tensors into one flat vector; ``None`` (an unused parameter) means zeros."""
    parts = [
        torch.zeros(n, dtype=dtype, device=device) if t is None else t.reshape(-1).to(dtype=dtype, device=device)
        for t, n in zip(tensors, numels, strict=True)
    ]
    return torch.cat(parts)


def _unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped (and typed, placed) like ``like``."""
    parts = vec.split([t.numel() for t in like])
    return [part.reshape(t.shape).to(dtype=t.dtype, device=t.device) for part, t in zip(parts, like, strict=True)]


def _restore_buffers(snapshot: Sequence[tuple[nn.Module, str, Tensor, Tensor]]) -> None:
    """Put back buffer objects and values; untouched buffers are left alone (no version bump)."""
    with torch.no_grad():
        for module, name, buf, saved in snapshot:
            if module._buffers.get(name) is not buf:
                module._buffers[name] = buf
            if not torch.equal(buf, saved):
                buf.copy_(saved)


def _check_fd_eps(fd_eps: float | None, dtype: torch.dtype) -> float:
    """The relative step of central differences: ``fd_eps``, or the default for ``dtype``."""
    if fd_eps is None:
        return finite_difference_eps(dtype)
    if isinstance(fd_eps, bool) or not isinstance(fd_eps, int | float) or not 0 < fd_eps < float("inf"):
        raise ValueError(f"fd_eps must be a positive number or None, got {fd_eps!r}")
    return float(fd_eps)


def _auto_order(device: torch.device) -> tuple[str, str]:
    """HVP methods in the order ``hvp="auto"`` tries them on ``device``."""
    if device.type == "cpu":
        return ("double_backward", "forward_over_reverse")
    return ("forward_over_reverse", "double_backward")


def _autocast_available(device_type: str) -> bool:
    check = getattr(torch.amp, "is_autocast_available", None)
    if check is not None:
        return bool(check(device_type))
    return device_type in ("cpu", "cuda")


def _shape_of(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
