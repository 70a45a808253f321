"""Pure-PyTorch adversarial training pieces (no Lightning import).

* :func:`sign_attack`: one-step sign-gradient attack (FGSM with a random start, optionally towards a random
  target label as in ConAdv's reference), the budget in pixel units through :class:`Normalization`.
* :func:`add_auxiliary_bn` / :func:`auxiliary_bn`: separate BatchNorm statistics (and optionally affine
  parameters) for adversarial inputs, on any model's BatchNorm layers (AdvProp, Xie et al. 2020).

:class:`~lightning_gd.strategies.ConAdvStrategy` builds concurrent adversarial learning (Liu et al. 2022) on them.
"""

from lightning_gd.adversarial.attack import AttackLoss, AttackResult, sign_attack
from lightning_gd.adversarial.batchnorm import add_auxiliary_bn, auxiliary_bn, has_auxiliary_bn
from lightning_gd.adversarial.normalization import Normalization

__all__ = [
    "AttackLoss",
    "AttackResult",
    "Normalization",
    "add_auxiliary_bn",
    "auxiliary_bn",
    "has_auxiliary_bn",
    "sign_attack",
]
