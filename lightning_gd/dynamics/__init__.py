"""Pure-PyTorch tools for the dynamics of recurrent maps: Lyapunov spectra and step functions.

* :func:`lyapunov_spectrum`: the ``k`` leading Lyapunov exponents of ``h_{t+1} = step(h_t, x_t)`` by the QR
  method with exact Jacobian-vector products, differentiable (the loss of gradient flossing, Engelken 2023).
* :func:`recurrent_dynamics` / :func:`recurrent_step`: step functions of ``nn.RNN``, ``nn.GRU``, ``nn.LSTM``
  and their cells (:class:`RecurrentDynamics`).
* :func:`flossing_loss` / :func:`flossing_spectrum`: gradient flossing's loss and trajectories (Engelken 2023).
* :func:`noise_std`, :func:`add_gaussian_`, :func:`uniform_ball_`: annealed noise (Neelakantan et al. 2015,
  Zhou et al. 2019) and the perturbed-GD ball kick (Jin et al. 2017).

Nothing here imports Lightning; :class:`~lightning_gd.callbacks.GradientFlossing` and
:class:`~lightning_gd.callbacks.NoiseAnnealing` schedule these functions.
"""

from lightning_gd.dynamics.flossing import flossing_loss, flossing_spectrum, sample_trajectories
from lightning_gd.dynamics.lyapunov import StepFn, lyapunov_spectrum
from lightning_gd.dynamics.noise import DeviceGenerators, NoiseSchedule, add_gaussian_, noise_std, uniform_ball_
from lightning_gd.dynamics.steps import RecurrentDynamics, recurrent_dynamics, recurrent_step

__all__ = [
    "DeviceGenerators",
    "NoiseSchedule",
    "RecurrentDynamics",
    "StepFn",
    "add_gaussian_",
    "flossing_loss",
    "flossing_spectrum",
    "lyapunov_spectrum",
    "noise_std",
    "recurrent_dynamics",
    "recurrent_step",
    "sample_trajectories",
    "uniform_ball_",
]
