"""Step functions ``h_{t+1} = step(h_t, x_t)`` of torch's recurrent layers, for :func:`lyapunov_spectrum`.

The state of a layer is the concatenation of every layer's hidden state (``nn.RNN``, ``nn.GRU``), and for
``nn.LSTM`` of every layer's ``h`` then every layer's ``c``: ``[h_1, ..., h_L, c_1, ..., c_L]``. The steps use
the module's own parameters (so a loss on the exponents reaches them) and follow torch's equations exactly;
dropout between layers is not applied (the dynamics of the deterministic network).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gd.dynamics.lyapunov import StepFn

__all__ = ["RecurrentDynamics", "recurrent_dynamics", "recurrent_step"]

_RNN_LAYERS = (nn.RNN, nn.GRU, nn.LSTM)
_CELLS = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)


@dataclass(frozen=True)
class RecurrentDynamics:
    """A recurrent map and the sizes needed to run it: what :class:`~lightning_gd.callbacks.GradientFlossing` floss.

    Attributes:
        step: ``step(h, x) -> h_next`` on ``(B, state_size)`` states and ``(B, input_size)`` inputs.
        state_size: ``N``, the size of the state (``2 * L * hidden`` for an ``L``-layer LSTM).
        input_size: Features of one input ``x_t``.
        sample_inputs: Optional ``sample_inputs(T, B, generator) -> (T, B, input_size)`` drawing inputs from the
            task's input distribution (e.g. random bits); ``None`` lets the caller choose (Gaussian in the callback).
    """

    step: StepFn
    state_size: int
    input_size: int
    sample_inputs: Callable[[int, int, torch.Generator], Tensor] | None = None


def _rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
              nonlinearity: str) -> Tensor:  # fmt: skip
    pre = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)  # (B, H)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def _gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    gi_r, gi_z, gi_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)  # 3 x (B, H)
    gh_r, gh_z, gh_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    return (1 - z) * n + z * h


def _lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
               b_hh: Tensor | None, w_hr: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    i, f, g, o = (F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)  # 4 x (B, H)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    if w_hr is not None:
        h_next = F.linear(h_next, w_hr)  # (B, P): LSTM with projections
    return h_next, c_next


def _layer_weights(module: nn.Module, layer: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    suffix = f"_l{layer}" if isinstance(module, _RNN_LAYERS) else ""
    bias = module.bias
    return (
        getattr(module, f"weight_ih{suffix}"),
        getattr(module, f"weight_hh{suffix}"),
        getattr(module, f"bias_ih{suffix}") if bias else None,
        getattr(module, f"bias_hh{suffix}") if bias else None,
    )


def recurrent_dynamics(module: nn.Module) -> RecurrentDynamics:
    """The step function and sizes of an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (any number of layers) or cell.

    Args:
        module: A unidirectional ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` (``proj_size`` allowed), or an
            ``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell``. The step reads the module's parameters at call
            time, so it follows training.

    Returns:
        A :class:`RecurrentDynamics`; the state packs every layer's ``h`` (then every layer's ``c`` for an LSTM).

    Raises:
        ValueError: for a bidirectional layer or an unsupported module.

    Example::

        >>> lstm = nn.LSTM(4, 32, num_layers=2)
        >>> dyn = recurrent_dynamics(lstm)
        >>> dyn.state_size  # 2 layers x (h, c) x 32
        128
        >>> dyn.step(torch.zeros(5, dyn.state_size), torch.randn(5, 4)).shape
        torch.Size([5, 128])
    """
    if isinstance(module, _RNN_LAYERS):
        if module.bidirectional:
            raise ValueError(f"a bidirectional {type(module).__name__} is no forward-in-time map; got {module}")
        layers = module.num_layers
    elif isinstance(module, _CELLS):
        layers = 1
    else:
        raise ValueError(
            f"`module` must be an nn.RNN, nn.GRU, nn.LSTM or one of their cells, got {type(module).__name__}"
        )
    H = module.hidden_size
    is_lstm = isinstance(module, nn.LSTM | nn.LSTMCell)
    P = getattr(module, "proj_size", 0) or H  # size of the LSTM's h (its projection when proj_size > 0)
    hidden = P if is_lstm else H
    nonlinearity = getattr(module, "nonlinearity", "tanh")

    def step(state: Tensor, x: Tensor) -> Tensor:  # state (B, N), x (B, D)
        hs = list(state[:, : layers * hidden].split(hidden, dim=-1))  # L x (B, hidden)
        cs = list(state[:, layers * hidden :].split(H, dim=-1)) if is_lstm else []  # L x (B, H)
        inp = x
        out_h: list[Tensor] = []
        out_c: list[Tensor] = []
        for layer in range(layers):
            w_ih, w_hh, b_ih, b_hh = _layer_weights(module, layer)
            if is_lstm:
                suffix = f"_l{layer}" if isinstance(module, nn.LSTM) else ""
                w_hr = getattr(module, f"weight_hr{suffix}", None)
                h_new, c_new = _lstm_cell(inp, hs[layer], cs[layer], w_ih, w_hh, b_ih, b_hh, w_hr)
                out_c.append(c_new)
            elif isinstance(module, nn.GRU | nn.GRUCell):
                h_new = _gru_cell(inp, hs[layer], w_ih, w_hh, b_ih, b_hh)
            else:
                h_new = _rnn_cell(inp, hs[layer], w_ih, w_hh, b_ih, b_hh, nonlinearity)
            out_h.append(h_new)
            inp = h_new
        return torch.cat(out_h + out_c, dim=-1)  # (B, N)

    state_size = layers * hidden + (layers * H if is_lstm else 0)
    return RecurrentDynamics(step=step, state_size=state_size, input_size=module.input_size)


def recurrent_step(module: nn.Module) -> StepFn:
    """Shortcut for ``recurrent_dynamics(module).step``.

    Example::

        >>> from lightning_gd.dynamics import lyapunov_spectrum
        >>> lam = lyapunov_spectrum(recurrent_step(nn.GRU(3, 16)), torch.zeros(16), torch.randn(100, 3), k=4)
        >>> lam.shape
        torch.Size([4])
    """
    return recurrent_dynamics(module).step
