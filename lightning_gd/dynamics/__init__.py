"""Pure-PyTorch tools for the dynamics of recurrent maps: Lyapunov spectra and step functions.

* :func:`lyapunov_spectrum`: the ``k`` leading Lyapunov exponents of ``h_{t+1} = step(h_t, x_t)`` by the QR
  method with exact Jacobian-vector products, differentiable (the loss of gradient flossing, Engelken 2023).
* :func:`recurrent_dynamics` / :func:`recurrent_step`: step functions of ``nn.RNN``, ``nn.GRU``, ``nn.LSTM``
  and their cells (:class:`RecurrentDynamics`).

Nothing here imports Lightning; :class:`~lightning_gd.callbacks.GradientFlossing` builds on these functions.
"""

from lightning_gd.dynamics.lyapunov import StepFn, lyapunov_spectrum
from lightning_gd.dynamics.steps import RecurrentDynamics, recurrent_dynamics, recurrent_step

__all__ = ["RecurrentDynamics", "StepFn", "lyapunov_spectrum", "recurrent_dynamics", "recurrent_step"]
