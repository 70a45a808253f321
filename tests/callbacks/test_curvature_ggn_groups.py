"""Both curvature callbacks with curvature="ggn"/"fisher" and with parameter groups, in real Trainers (issue 21)."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.func import functional_call, jacrev

from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from tests.helpers.hessian import exact_hessian, unflatten
from tests.helpers.models import TinyClassifier, classification_loader
from tests.helpers.trainer import quiet_trainer


def _outputs(module, batch):
    x, y = batch
    return module(x), y


def _dense_ggn_and_fisher(module, batch):
    """``J^T H_L J`` and ``G^T G / n`` of the mean cross-entropy, from dense Jacobians (eval mode)."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in module.parameters()])
    x, y = batch
    module.eval()

    def logits(flat):
        return functional_call(module, unflatten(flat, names, shapes), (x,))

    out = logits(flat0).detach()
    n, C = out.shape
    J = jacrev(logits)(flat0).reshape(n * C, -1)
    p = out.softmax(dim=1)
    H_L = torch.block_diag(*[(torch.diag(pi) - torch.outer(pi, pi)) / n for pi in p])
    G = jacrev(lambda f: F.cross_entropy(logits(f), y, reduction="none"))(flat0)
    module.train()
    return J.T @ H_L @ J, G.T @ G / n


def _first_batch():
    x, y = next(iter(classification_loader()))
    return x.double(), y


def test_ggn_and_fisher_in_a_real_trainer_match_their_dense_formulas(tmp_path):
    class WithOutputs(TinyClassifier):
        def curvature_outputs(self, batch):  # the module-method way (no output_fn)
            return _outputs(self, batch)

    common = dict(every_n_steps=4, batch="fixed", max_overhead=None)
    sharp = SharpnessTracker(**common, curvature="ggn", output_fn=_outputs, loss="cross_entropy", k=2, smallest=True,
                             tol=1e-9, max_iter=200, plot=False)  # fmt: skip
    ggn = HessianTraceMonitor(**common, curvature="ggn", output_fn=_outputs, loss="cross_entropy", num_probes=300)
    fisher = HessianTraceMonitor(**common, curvature="fisher", loss=torch.nn.CrossEntropyLoss(), num_probes=300)
    hess = SharpnessTracker(**common, tol=1e-9, max_iter=200, plot=False)  # same Trainer: distinct keys and states
    seed_everything(0)
    model = WithOutputs(batchnorm=False, dropout=0.0)
    quiet_trainer(tmp_path, callbacks=[sharp, ggn, fisher, hess], max_steps=4, precision="64-true").fit(
        model, classification_loader()
    )
    G, Fi = _dense_ggn_and_fisher(model, _first_batch())
    eig = torch.linalg.eigvalsh(G)
    m = sharp.last_metrics
    assert m["sharpness_ggn/lambda_max"] == pytest.approx(eig[-1].item(), rel=1e-6)
    assert m["sharpness_ggn/eig_2"] == pytest.approx(eig[-2].item(), rel=1e-6)
    assert abs(m["sharpness_ggn/lambda_min"]) < 1e-9 * eig[-1].item()  # PSD, and singular here
    assert m["sharpness_ggn/threshold"] == pytest.approx(2 / 0.1)
    for cb, dense, key in ((ggn, G, "ggn"), (fisher, Fi, "fisher")):
        t = cb.last_metrics
        exact = torch.trace(dense).item()
        assert abs(t[f"{key}/trace"] - exact) < 4 * t[f"{key}/trace_stderr"] + 1e-9 * abs(exact)  # XTrace may be exact
    H = exact_hessian(model, _first_batch())
    assert hess.last_metrics["sharpness/lambda_max"] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-6)
    assert len({cb.state_key for cb in (sharp, ggn, fisher, hess)}) == 4


def test_groups_restrict_the_operator_to_their_parameters(tmp_path):
    seed_everything(0)
    model = TinyClassifier(batchnorm=False, dropout=0.0)
    groups = {"first": "net.0.*", "last": ["net.2.weight", "net.2.bias"]}
    sharp = SharpnessTracker(every_n_steps=4, batch="fixed", max_overhead=None, tol=1e-9, max_iter=200, plot=False,
                             groups=groups)  # fmt: skip
    trace = HessianTraceMonitor(every_n_steps=4, batch="fixed", max_overhead=None, num_probes=300, groups=groups)
    quiet_trainer(tmp_path, callbacks=[sharp, trace], max_steps=4, precision="64-true").fit(
        model, classification_loader()
    )
    H = exact_hessian(model, _first_batch())
    n_first = sum(p.numel() for p in model.net[0].parameters())
    blocks = {"first": H[:n_first, :n_first], "last": H[n_first:, n_first:]}
    m, t = sharp.last_metrics, trace.last_metrics
    for name, block in blocks.items():
        assert m[f"sharpness/{name}/lambda_max"] == pytest.approx(torch.linalg.eigvalsh(block)[-1].item(), rel=1e-6)
        assert m[f"sharpness/{name}/edge_of_stability"] == pytest.approx(m[f"sharpness/{name}/lambda_max"] * 0.1 / 2)
        exact = torch.trace(block).item()
        assert abs(t[f"hessian/{name}/trace"] - exact) < 4 * t["hessian/trace_stderr"] + 1e-9 * abs(exact)
    assert t["hessian/first/trace"] + t["hessian/last/trace"] == pytest.approx(t["hessian/trace"], rel=1e-9)
    assert m["sharpness/lambda_max"] >= max(m["sharpness/first/lambda_max"], m["sharpness/last/lambda_max"])


@pytest.mark.parametrize("cls", [HessianTraceMonitor, SharpnessTracker])
def test_a_pattern_that_matches_no_parameter_is_refused_naming_it_and_some_names(tmp_path, cls):
    cb = cls(groups={"attn": "*.attn.*"})
    with pytest.raises(MisconfigurationException, match=r"'\*\.attn\.\*' of group 'attn' matches no.*'net\.0\.weight'"):
        quiet_trainer(tmp_path, callbacks=[cb], max_steps=4, precision="64-true").fit(
            TinyClassifier(), classification_loader()
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"curvature": "gauss-newton"}, "`curvature` must be one of .*'gauss-newton'"),
        ({"curvature": "ggn"}, "curvature='ggn' needs `loss`.*cross_entropy"),
        ({"curvature": "ggn", "loss": "l1"}, "loss 'l1' is not supported.*cross_entropy.*mse.*bce_with_logits"),
        ({"curvature": "fisher", "loss": torch.nn.NLLLoss()}, "loss 'NLLLoss' is not supported"),
        ({"loss": "mse"}, "`output_fn` and `loss` are for curvature='ggn' or 'fisher'"),
        ({"curvature": "ggn", "loss": "mse", "loss_fn": lambda m, b: 0}, "not `loss_fn`"),
        ({"groups": {}}, "`groups` must be a non-empty mapping"),
        ({"groups": {"a/b": "x"}}, "without '/'"),
        ({"groups": {"a": []}}, r"`groups\['a'\]` must be a pattern"),
    ],
)
@pytest.mark.parametrize("cls", [HessianTraceMonitor, SharpnessTracker])
def test_bad_curvature_and_group_arguments(cls, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        cls(**kwargs)


def test_ggn_without_outputs_is_refused_at_setup(tmp_path):
    cb = SharpnessTracker(curvature="ggn", loss="cross_entropy")
    with pytest.raises(MisconfigurationException, match="pass `output_fn.*TinyClassifier.curvature_outputs"):
        quiet_trainer(tmp_path, callbacks=[cb], max_steps=4, precision="64-true").fit(
            TinyClassifier(), classification_loader()
        )
