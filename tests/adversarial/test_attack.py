import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gd.adversarial import Normalization, sign_attack

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.mark.parametrize("targeted", [True, False])
@pytest.mark.parametrize("random_start", [0.0, 1.0])
def test_perturbation_stays_within_epsilon_in_pixel_space(targeted, random_start):
    model, norm, eps = _conv_model(), Normalization(mean=MEAN, std=STD), 9 / 255
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(16, 3, 6, 6, generator=gen)
    pixels[0] = 0.0  # at the bounds: the clamp to [0, 1] must hold too
    pixels[1] = 1.0
    x, y = norm.normalize(pixels), torch.randint(0, 5, (16,), generator=gen)
    adv = sign_attack(model, x, y, epsilon=eps, normalization=norm, targeted=targeted, random_start=random_start,
                      generator=gen)  # fmt: skip
    delta = norm.to_pixels(adv.inputs) - pixels
    assert delta.abs().max() <= eps + 1e-6
    assert delta.abs().max() > 0.9 * eps  # the step is used, not lost in the mapping
    adv_pixels = norm.to_pixels(adv.inputs)
    assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6
    # In normalized units the budget is eps / std per channel: larger than eps where std < 1.
    assert (adv.inputs - x).abs().amax(dim=(0, 2, 3)).max() > eps * 1.5
    assert adv.random_start == (random_start == 1.0)


def test_untargeted_step_is_fgsm_and_raises_the_loss():
    model, eps = _conv_model(), 0.05
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    adv = sign_attack(model, x, y, epsilon=eps, targeted=False, random_start=0.0)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    torch.testing.assert_close(adv.inputs, x + eps * g.sign())  # no normalization: pixels are the inputs
    assert F.cross_entropy(model(adv.inputs), y) > F.cross_entropy(model(x), y)


def test_targeted_labels_differ_from_the_true_ones_and_lower_the_target_loss():
    model = _conv_model()
    x, y = torch.randn(64, 3, 6, 6), torch.randint(0, 5, (64,))
    adv = sign_attack(model, x, y, epsilon=0.05, targeted=True, random_start=0.0, generator=torch.Generator())
    assert (adv.attack_targets != y).all()
    assert len(adv.attack_targets.unique()) > 2
    t = adv.attack_targets
    assert F.cross_entropy(model(adv.inputs), t) < F.cross_entropy(model(x), t)


def test_attack_never_writes_parameter_grad_and_is_seeded():
    model = _conv_model()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    a = sign_attack(model, x, y, epsilon=0.1, random_start=0.5, generator=torch.Generator().manual_seed(3))
    b = sign_attack(model, x, y, epsilon=0.1, random_start=0.5, generator=torch.Generator().manual_seed(3))
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(a.inputs, b.inputs, rtol=0, atol=0)
    assert not a.inputs.requires_grad


def test_normalization_round_trip_and_scalar_channels():
    norm = Normalization(mean=0.5, std=0.25, pixel_range=(0, 255))
    p = torch.rand(2, 1, 3, 3) * 255
    torch.testing.assert_close(norm.to_pixels(norm.normalize(p)), p)
    assert norm.clamp(torch.tensor([-1.0, 300.0])).tolist() == [0.0, 255.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epsilon=-0.1), "`epsilon` must be a finite number >= 0"),
        (dict(epsilon=0.1, step_size=-1.0), "`step_size` must be a finite number >= 0"),
        (dict(epsilon=0.1, random_start=1.5), r"`random_start` must be in \[0, 1\]"),
    ],
)
def test_bad_budget(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sign_attack(nn.Linear(2, 2), torch.randn(3, 2), torch.tensor([0, 1, 0]), **kwargs)


def test_bad_targets_and_normalization():
    with pytest.raises(ValueError, match="integer class labels of shape"):
        sign_attack(nn.Linear(2, 2), torch.randn(3, 2), torch.rand(3, 2), epsilon=0.1)
    with pytest.raises(ValueError, match="`std` must be > 0"):
        Normalization(std=(0.2, 0.0))
    with pytest.raises(ValueError, match="`pixel_range` must be"):
        Normalization(pixel_range=(1.0, 0.0))
