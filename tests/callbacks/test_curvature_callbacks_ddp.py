from tests.helpers.ddp import run_ddp_script

_SCRIPT = """
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer, seed_everything
from lightning_gd.callbacks import HessianTraceMonitor, MetricPlotter, SharpnessTracker
from tests.helpers.ddp import write_result
from tests.helpers.hessian import exact_hessian
from tests.helpers.models import TinyClassifier, classification_loader

seed_everything(0)
model = TinyClassifier(dropout=0.2)
trace = HessianTraceMonitor(max_overhead=None, every_n_steps=4, num_probes=400, batch="fixed", per_layer=True)
# XTrace and Hutch++ split too: each rank sketches its own batch's Hessian with half the products.
xtrace = HessianTraceMonitor(max_overhead=None, every_n_steps=4, num_probes=80, batch="fixed", method="xtrace",
                             groups={"first": "net.0.*"})
hpp = HessianTraceMonitor(max_overhead=None, every_n_steps=4, num_probes=60, batch="fixed", method="hutch++")
sharp = SharpnessTracker(max_overhead=None, every_n_steps=2, smallest=True, batch="fixed", tol=1e-8, max_iter=200,
                         density_every_n_steps=4)
# Over its 1% budget after the first check: rank 0's clock must decide for both ranks (or they deadlock).
budget = SharpnessTracker(every_n_steps=1, max_iter=30, max_overhead=0.01, plot=False)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, precision="64-true", logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[trace, xtrace, hpp, sharp, budget, MetricPlotter(every_n_steps=1)], default_root_dir=".")
trainer.fit(model, classification_loader(n=128))
# The exact Hessian of the global batch: the mean of the ranks' fixed-batch Hessians at the final weights.
x, y = sharp._fixed[0]
H = exact_hessian(model, (x.double(), y))
dist.all_reduce(H)
H /= trainer.world_size
eig = torch.linalg.eigvalsh(H)

# Under compressed DDP (top-k with error feedback), finite-difference products, forced, must never pass through the
# comm hook: its error-feedback memory would change and training with them would end elsewhere than without.
from lightning_gd.strategies import CompressedDDPStrategy


def compressed(callbacks):
    seed_everything(0)
    net = TinyClassifier(dropout=0.0)
    Trainer(accelerator="cpu", devices=2, strategy=CompressedDDPStrategy("topk", density=0.1), max_steps=4,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=callbacks, default_root_dir=".").fit(net, classification_loader(n=128))
    return torch.cat([p.detach().flatten() for p in net.parameters()]).tolist()


fd = SharpnessTracker(max_overhead=None, every_n_steps=1, hvp="finite_difference", plot=False)
fd_trace = HessianTraceMonitor(max_overhead=None, every_n_steps=2, num_probes=4, hvp="finite_difference")
topk = {"plain": compressed([]), "measured": compressed([fd, fd_trace]), "fd_hvp": fd._hvp_in_use,
        "fd_lambda_max": fd.last_metrics["sharpness/lambda_max"],
        "fd_step_change": fd.last_metrics["sharpness/fd_step_change"]}

# A kink (tests.helpers.models.KinkedRegressor): the step check fails on both ranks at the same checks (each rank
# holds half the batch, only rank 0 the kinked sample: the decision comes from the rank-averaged products), so the
# two skip together instead of one waiting in a collective the other never joins.
from tests.helpers.models import KinkedRegressor, kinked_loader

seed_everything(0)
kink_sharp = SharpnessTracker(max_overhead=None, every_n_steps=1, hvp="finite_difference", plot=False, max_iter=20)
kink_trace = HessianTraceMonitor(max_overhead=None, every_n_steps=1, num_probes=4, hvp="finite_difference")
Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[kink_sharp, kink_trace],
        default_root_dir=".").fit(KinkedRegressor(), kinked_loader(n=64))
kinked = {name: [list(map(float, e)) for e in cb.history.get(name, [])]
          for cb, names in ((kink_sharp, ("sharpness/fd_step_change", "sharpness/lambda_max")),
                            (kink_trace, ("hessian/fd_step_change", "hessian/trace")))
          for name in names}
write_result({
    "topk": topk, "kinked": kinked,
    "trace": trace.last_metrics, "sharp": sharp.last_metrics, "exact_trace": torch.trace(H).item(),
    "xtrace": xtrace.last_metrics, "hpp": hpp.last_metrics,
    "exact_first": torch.trace(H[:144, :144]).item(),
    "exact_max": eig[-1].item(), "exact_min": eig[0].item(), "first_x": x[0].tolist(),
    "weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
    "history_steps": [s for s, _ in sharp.history["sharpness/lambda_max"]],
    "budget_steps": [s for s, _ in budget.history["sharpness/lambda_max"]],
}, trainer.global_rank)
"""


def test_curvature_callbacks_on_two_process_ddp(tmp_path):
    r0, r1 = run_ddp_script(_SCRIPT, tmp_path, launcher="external")
    assert r0["first_x"] != r1["first_x"]  # each rank measured its own data
    assert r0["weights"] == r1["weights"]
    for key in ("trace", "sharp", "xtrace", "hpp"):
        assert r0[key] == r1[key]  # every rank logs the same numbers
    assert r0["history_steps"] == [2, 4]
    assert r0["budget_steps"] == r1["budget_steps"]
    assert r0["budget_steps"][0] == 1 and len(r0["budget_steps"]) < 4  # skipped checks, the same on both ranks
    s = r0["sharp"]
    assert abs(s["sharpness/lambda_max"] - r0["exact_max"]) < 1e-6 * abs(r0["exact_max"])
    assert abs(s["sharpness/lambda_min"] - r0["exact_min"]) < 1e-6 * abs(r0["exact_min"])
    t = r0["trace"]
    assert abs(t["hessian/trace"] - r0["exact_trace"]) < 3 * t["hessian/trace_stderr"]
    assert t["hessian/num_hvps"] == 200  # the 400 probes are split over the two ranks
    for key, products in (("xtrace", 40), ("hpp", 30)):
        est = r0[key]
        assert est["hessian/num_hvps"] == products  # split: each rank sketches its own Hessian
        assert abs(est["hessian/trace"] - r0["exact_trace"]) < 4 * est["hessian/trace_stderr"]
    # The group's block trace from the same probes (no stderr of its own: the total's bounds its noise here).
    xt = r0["xtrace"]
    assert abs(xt["hessian/first/trace"] - r0["exact_first"]) < 4 * xt["hessian/trace_stderr"]
    assert (tmp_path / "sharpness.png").is_file() and (tmp_path / "spectral_density_step4.png").is_file()
    topk = r0["topk"]
    assert topk["measured"] == topk["plain"] and topk["fd_hvp"] == "finite_difference"
    assert topk["fd_lambda_max"] > 0 and r1["topk"]["measured"] == topk["measured"]
    assert topk["fd_step_change"] < 1e-2  # a smooth model: the step check passes
    kinked = r0["kinked"]
    assert kinked == r1["kinked"]  # the same decisions and changes on both ranks
    for name in ("sharpness", "hessian"):
        assert [s for s, _ in kinked[f"{name}/fd_step_change"]] == [1, 2, 3]
        assert all(v > 0.2 for _, v in kinked[f"{name}/fd_step_change"]), kinked
    assert kinked["sharpness/lambda_max"] == [] and kinked["hessian/trace"] == []
