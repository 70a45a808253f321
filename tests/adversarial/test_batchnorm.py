import pytest
import torch
from torch import nn

from lightning_gd.adversarial import add_auxiliary_bn, auxiliary_bn, has_auxiliary_bn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2),
                         nn.BatchNorm1d(2))  # fmt: skip


def _stats(model, prefix=""):
    return {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k and k.split(".")[-1].startswith(prefix)
    }


def test_clean_pass_leaves_aux_stats_and_adversarial_pass_leaves_main_stats():
    model = _model()
    assert add_auxiliary_bn(model) == 2 and has_auxiliary_bn(model)
    main0, aux0 = _stats(model, "running"), _stats(model, "aux_")
    model(torch.randn(8, 3, 6, 6))  # clean pass: main statistics move, auxiliary ones do not
    main1, aux1 = _stats(model, "running"), _stats(model, "aux_")
    assert all(not torch.equal(main0[k], main1[k]) for k in main0)
    assert all(torch.equal(aux0[k], aux1[k]) for k in aux0)
    with auxiliary_bn(model):
        model(torch.randn(8, 3, 6, 6) * 3 + 2)  # adversarial pass: the reverse
    main2, aux2 = _stats(model, "running"), _stats(model, "aux_")
    assert all(torch.equal(main1[k], main2[k]) for k in main1)
    assert all(not torch.equal(aux1[k], aux2[k]) for k in aux1)
    assert model[1].num_batches_tracked.item() == 1 and model[1].aux_num_batches_tracked.item() == 1


def test_eval_mode_uses_the_selected_statistics():
    model = _model()
    add_auxiliary_bn(model)
    model[1].aux_running_mean.fill_(5.0)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    clean = model(x)
    with auxiliary_bn(model):
        adv = model(x)
    assert not torch.allclose(clean, adv)
    torch.testing.assert_close(model(x), clean)


def test_separate_affine_parameters_get_their_own_gradients():
    model = _model()
    add_auxiliary_bn(model, separate_affine=True)
    bn = model[1]
    assert {"aux_weight", "aux_bias"} <= {n for n, _ in bn.named_parameters()}
    with auxiliary_bn(model):
        model(torch.randn(8, 3, 6, 6)).sum().backward()
    assert bn.aux_weight.grad is not None and bn.weight.grad is None
    model(torch.randn(8, 3, 6, 6)).sum().backward()
    assert bn.weight.grad is not None


def test_idempotent_restored_on_error_and_not_nestable():
    model = _model()
    add_auxiliary_bn(model)
    mean = model[1].running_mean
    model[1].aux_running_mean.fill_(7.0)
    add_auxiliary_bn(model)
    assert model[1].aux_running_mean[0].item() == 7.0
    with pytest.raises(ZeroDivisionError):
        with auxiliary_bn(model):
            assert model[1].running_mean[0].item() == 7.0
            1 / 0  # noqa: B018
    assert model[1].running_mean is mean
    with auxiliary_bn(model), pytest.raises(RuntimeError, match="cannot be nested"):
        with auxiliary_bn(model):
            pass


def test_state_dict_round_trip():
    a, b = _model(), _model()
    add_auxiliary_bn(a)
    add_auxiliary_bn(b)
    a[1].aux_running_var.fill_(3.0)
    b.load_state_dict(a.state_dict())
    assert b[1].aux_running_var[0].item() == 3.0
