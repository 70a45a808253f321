"""SharpnessTracker's preconditioned sharpness describes the update Adam applies: several optimizers, manual
optimization, gradient clipping, parameters without Adam moments (issue 21)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, seed_everything
from torch import nn
from torch.func import functional_call

from lightning_gd.callbacks import SharpnessTracker
from lightning_gd.curvature.preconditioned import adam_preconditioner, adam_threshold, combine_preconditioners
from tests.helpers.hessian import dense_hessian_of, exact_hessian
from tests.helpers.models import classification_loader
from tests.helpers.trainer import quiet_trainer


class _GAN(LightningModule):
    """A two-optimizer GAN-style module with manual optimization: generator ``gen``, discriminator ``disc``.

    The generator's gradient is clipped by hand in ``training_step`` (``clip``), as users of manual optimization do.
    """

    def __init__(self, disc_optimizer: str = "adam", clip: float | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 8))
        self.disc = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1))
        self.disc_optimizer, self.clip = disc_optimizer, clip
        self.raw_norm, self.clip_factor = None, None

    def losses(self, batch):
        x, _ = batch
        z = torch.linspace(-1.0, 1.0, x.shape[0] * 4, dtype=x.dtype).reshape(-1, 4)  # fixed noise: a deterministic loss
        fake = self.gen(z)
        ones, zeros = torch.ones(x.shape[0], 1, dtype=x.dtype), torch.zeros(x.shape[0], 1, dtype=x.dtype)
        d_loss = F.binary_cross_entropy_with_logits(self.disc(x), ones) + F.binary_cross_entropy_with_logits(
            self.disc(fake.detach()), zeros
        )
        g_loss = F.binary_cross_entropy_with_logits(self.disc(fake), ones)
        return d_loss, g_loss

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        d_loss, _ = self.losses(batch)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        _, g_loss = self.losses(batch)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        if self.clip is not None:
            grads = [p.grad for p in self.gen.parameters()]
            self.raw_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
            torch.nn.utils.clip_grad_norm_(self.gen.parameters(), self.clip)
            # What clipping did (torch divides by norm + 1e-6): the ratio of the norms.
            clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in self.gen.parameters()])).item()
            self.clip_factor = clipped / self.raw_norm
        opt_g.step()

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
        if self.disc_optimizer == "adam":
            opt_d = torch.optim.AdamW(self.disc.parameters(), lr=5e-3, betas=(0.9, 0.99))
        else:
            opt_d = torch.optim.SGD(self.disc.parameters(), lr=0.05)
        return opt_g, opt_d


def _gan_loss(module, batch):
    d_loss, g_loss = module.losses(batch)
    return d_loss + g_loss


def _dense_hessian(module, batch):
    return dense_hessian_of(module, lambda params: _gan_loss(_Functional(module, params), batch))


class _Functional:
    """The module's ``losses`` with its parameters swapped (``functional_call`` per submodule)."""

    def __init__(self, module, params):
        self._m, self._p = module, params

    def losses(self, batch):
        gen = lambda z: functional_call(self._m.gen, _sub(self._p, "gen."), (z,))  # noqa: E731
        disc = lambda h: functional_call(self._m.disc, _sub(self._p, "disc."), (h,))  # noqa: E731
        return _GAN.losses(_Proxy(gen, disc), batch)


class _Proxy:
    def __init__(self, gen, disc):
        self.gen, self.disc = gen, disc


def _sub(params, prefix):
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _data():
    x, y = next(iter(classification_loader(n=64, in_dim=8, batch_size=64)))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.double(), y), batch_size=16)


def test_two_adam_optimizers_with_manual_optimization_and_clipping_match_the_dense_update(tmp_path):
    # The GAN's generator (Adam, lr 2e-3, beta1 0.5, its gradient clipped by hand) and discriminator (AdamW, lr 5e-3,
    # beta1 0.9): every check is logged (before: skipped, "no Adam second moments yet"), and the number is
    # lambda_max(D^-1 H) with D_i = (P_i / c_i) * threshold_i / threshold_gen, against the generator's threshold.
    seed_everything(0)
    model = _GAN(clip=0.05).double()
    sharp = SharpnessTracker(every_n_steps=4, loss_fn=_gan_loss, batch="fixed", tol=1e-9, max_iter=200,
                             max_overhead=None, plot=False)  # fmt: skip
    trainer = quiet_trainer(tmp_path, callbacks=[sharp], max_steps=8, precision="64-true")
    trainer.fit(model, _data())
    assert [s for s, _ in sharp.history["sharpness/preconditioned_lambda_max"]] == [4, 8]  # two steps per batch
    opt_g, opt_d = trainer.optimizers
    assert model.clip_factor < 1.0  # the hand clipping bit
    m = sharp.last_metrics
    assert m["sharpness/clip_factor_0"] == pytest.approx(model.clip_factor, rel=1e-9)  # seen through the optimizer
    assert m["sharpness/clip_factor_1"] == 1.0 and m["sharpness/clip_factor"] == m["sharpness/clip_factor_0"]
    diags, thresholds = [], []
    for opt, c in ((opt_g, model.clip_factor), (opt_d, 1.0)):
        (beta1, beta2), eps, lr = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"], opt.param_groups[0]["lr"]
        for p in opt.param_groups[0]["params"]:
            st = opt.state[p]
            diags.append(adam_preconditioner(st["exp_avg_sq"], float(st["step"]), beta1, beta2, eps, c).flatten())
            thresholds.append(adam_threshold(beta1, lr))
    D, ref = combine_preconditioners(diags, thresholds)  # generator parameters come first in named_parameters()
    H = _dense_hessian(model, sharp._fixed[0])
    s = D.rsqrt()
    exact = torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1].item()
    assert ref == pytest.approx(adam_threshold(0.5, 2e-3))
    assert m["sharpness/preconditioned_lambda_max"] == pytest.approx(exact, rel=1e-6)
    assert m["sharpness/edge_of_stability"] == pytest.approx(exact / ref, rel=1e-6)


def test_parameters_without_adam_moments_fall_back_to_the_raw_sharpness_said_once(tmp_path):
    # Adam generator, SGD discriminator: the whole model has no preconditioned sharpness: raw lambda_max against
    # 2/lr at every check, said once; per group the Adam-trained generator is preconditioned, the discriminator raw.
    seed_everything(0)
    model = _GAN(disc_optimizer="sgd").double()
    sharp = SharpnessTracker(
        every_n_steps=2,
        loss_fn=_gan_loss,
        batch="fixed",
        tol=1e-9,
        max_iter=200,
        max_overhead=None,
        plot=False,
        groups={"gen": "gen.*", "disc": ["disc.0.*", "disc.2.*"]},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(tmp_path, callbacks=[sharp], max_steps=6, precision="64-true")
        trainer.fit(model, _data())
    notes = [str(w.message) for w in caught if "no Adam moments" in str(w.message)]
    assert len(notes) == 1 and "'disc.0.weight'" in notes[0] and "groups" in notes[0]
    steps = [s for s, _ in sharp.history["sharpness/lambda_max"]]
    assert steps == [2, 4, 6] and "sharpness/preconditioned_lambda_max" not in sharp.history
    assert [s for s, _ in sharp.history["sharpness/gen/preconditioned_lambda_max"]] == steps
    assert [s for s, _ in sharp.history["sharpness/disc/lambda_max"]] == steps
    m = sharp.last_metrics
    H = _dense_hessian(model, sharp._fixed[0])
    n_gen = sum(p.numel() for p in model.gen.parameters())
    assert m["sharpness/lambda_max"] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-6)
    assert m["sharpness/threshold"] == pytest.approx(2 / 0.05)  # the largest lr of the owners (SGD 0.05 > 2e-3)
    H_disc = H[n_gen:, n_gen:]
    assert m["sharpness/disc/lambda_max"] == pytest.approx(torch.linalg.eigvalsh(H_disc)[-1].item(), rel=1e-6)
    assert m["sharpness/disc/threshold"] == pytest.approx(2 / 0.05)
    opt_g = trainer.optimizers[0]
    (beta1, beta2), eps = opt_g.param_groups[0]["betas"], opt_g.param_groups[0]["eps"]
    P = torch.cat([adam_preconditioner(opt_g.state[p]["exp_avg_sq"], float(opt_g.state[p]["step"]), beta1, beta2,
                                       eps).flatten() for p in model.gen.parameters()])  # fmt: skip
    s = P.rsqrt()
    exact = torch.linalg.eigvalsh(s[:, None] * H[:n_gen, :n_gen] * s[None, :])[-1].item()
    assert m["sharpness/gen/preconditioned_lambda_max"] == pytest.approx(exact, rel=1e-6)
    assert m["sharpness/gen/threshold"] == pytest.approx(adam_threshold(0.5, 2e-3))


class _Quadratic(LightningModule):
    """``0.5 * sum(h_i w_i^2)``: one sharp coordinate (h = 50) that Adam keeps at its edge of stability, and seven
    flat, far ones (h = 0.01, w = 30) whose gradient sets the norm, so that norm clipping scales every step by about
    the same factor c."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0] + [30.0] * 7, dtype=torch.float64))
        self.register_buffer("h", torch.tensor([50.0] + [0.01] * 7, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        return 0.5 * (self.h * self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, betas=(0.9, 0.9), eps=1e-12)


class _UnclippedNorm(Callback):
    """Lightning clips after ``on_before_optimizer_step``: the factor it applies, computed independently."""

    def __init__(self, clip: float | None) -> None:
        self.clip, self.factor = clip, 1.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.clip is not None:  # torch's clip_grad_norm_ multiplies by max_norm / (norm + 1e-6), at most 1
            self.factor = min(1.0, self.clip / (pl_module.w.grad.norm().item() + 1e-6))


@pytest.mark.parametrize("clip", [None, 0.05])
def test_adam_hovers_at_its_edge_on_a_quadratic_with_and_without_clipping(tmp_path, clip):
    # Adam on a quadratic oscillates at lambda_max(P^-1 H) ~ 38/lr (Cohen et al. 2022): the tracked edge is ~1 with
    # clipping too, where the moments of the clipped gradient alone would say ~1/c ~ 12.
    every = 25
    sharp = SharpnessTracker(every_n_steps=every, batch="current", tol=1e-10, max_iter=20, max_overhead=None,
                             plot=False)  # fmt: skip
    norm = _UnclippedNorm(clip)

    class _Record(Callback):
        factors: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % every == 0:
                self.factors.append(norm.factor)

    record = _Record()
    loader = torch.utils.data.DataLoader(torch.zeros(1000, 1), batch_size=1)
    quiet_trainer(tmp_path, callbacks=[norm, sharp, record], max_steps=500, gradient_clip_val=clip).fit(
        _Quadratic(), loader
    )
    edges = [v for s, v in sharp.history["sharpness/edge_of_stability"] if s >= 300]
    factors = [v for _, v in sharp.history["sharpness/clip_factor"]]
    assert factors == pytest.approx(record.factors, rel=1e-9)  # the factor Lightning's clipping applied, every check
    mean_edge = sum(edges) / len(edges)
    assert 0.75 < mean_edge < 1.05, edges
    if clip is not None:
        assert max(factors[-8:]) < 0.1  # clipping active throughout: uncorrected, the edge would read > 8
        uncorrected = [e / c for e, c in zip(edges, factors[-len(edges) :], strict=True)]
        assert min(uncorrected) > 8


def test_no_optimizer_lr_zero_and_an_optimizer_without_moments(tmp_path):
    # An SGD module with preconditioned="auto": raw, and no clip hooks attached; lr = 0 (a frozen group) never
    # divides by zero.
    model = nn.Linear(3, 1)

    class _M(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    sharp = SharpnessTracker(every_n_steps=1, max_overhead=None, plot=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=4)
    quiet_trainer(tmp_path, callbacks=[sharp], max_steps=2).fit(_M(), loader)
    assert sharp._clip._handles == [] and sharp.last_metrics["sharpness/edge_of_stability"] < 1e-200


def test_coordinates_adam_never_moved_are_left_out_and_a_gradient_mask_is_no_clipping(tmp_path):
    # A hook zeroes the first layer's bias gradient before every step (as top-k compression zeroes most
    # coordinates): Adam's v = 0 there, and P = (1 - beta1^t) eps would put 1/eps on the diagonal. The coordinates
    # are left out, said once, their share logged; the mask is not read as gradient clipping.
    from tests.helpers.models import TinyClassifier

    class _Masked(TinyClassifier):
        def on_before_optimizer_step(self, optimizer):
            self.net[0].bias.grad.zero_()

    seed_everything(0)
    model = _Masked(batchnorm=False, dropout=0.0, optimizer="adam", lr=0.01)
    sharp = SharpnessTracker(every_n_steps=3, batch="fixed", preconditioned=True, tol=1e-9, max_iter=200,
                             max_overhead=None, plot=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(tmp_path, callbacks=[sharp], max_steps=6, precision="64-true")
        trainer.fit(model, classification_loader())
    notes = [str(w.message) for w in caught if "no gradient in Adam's second moment" in str(w.message)]
    n = sum(p.numel() for p in model.parameters())
    assert len(notes) == 1 and f"{16 / n:.1%}" in notes[0]
    m = sharp.last_metrics
    assert m["sharpness/unmoved_fraction"] == pytest.approx(16 / n)
    assert m["sharpness/clip_factor"] == 1.0  # the masked gradient is not clipping
    opt = trainer.optimizers[0]
    (beta1, beta2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    P = torch.cat([adam_preconditioner(opt.state[p]["exp_avg_sq"], float(opt.state[p]["step"]), beta1, beta2,
                                       eps).flatten() for p in model.parameters()])  # fmt: skip
    keep = torch.ones(n, dtype=torch.bool)  # net.0.bias (16 entries) comes right after net.0.weight
    offset = model.net[0].weight.numel()
    keep[offset : offset + 16] = False
    H = exact_hessian(model, sharp._fixed[0])
    s = P[keep].rsqrt()
    exact = torch.linalg.eigvalsh(s[:, None] * H[keep][:, keep] * s[None, :])[-1].item()
    assert m["sharpness/preconditioned_lambda_max"] == pytest.approx(exact, rel=1e-6)
    s_all = P.rsqrt()
    kept_in = torch.linalg.eigvalsh(s_all[:, None] * H * s_all[None, :])[-1].item()
    assert kept_in > 1e4 * exact  # what the tracker reported before: dominated by the 1/eps entries


_DDP_SCRIPT = """
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning_gd.callbacks import SharpnessTracker
from tests.helpers.ddp import write_result
from tests.helpers.models import TinyClassifier, classification_loader


def fit(callbacks):
    seed_everything(0)
    model = TinyClassifier(dropout=0.0, optimizer="adam", lr=0.01)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, gradient_clip_val=0.05,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, default_root_dir=".")
    trainer.fit(model, classification_loader(n=128, shuffle=True))
    return trainer, [p.detach().flatten().tolist() for p in model.parameters()]


_, plain = fit([])
sharp = SharpnessTracker(every_n_steps=2, max_overhead=None, preconditioned=True, plot=False, max_iter=20)
trainer, measured = fit([sharp])
write_result({"same_weights": plain == measured, "history": sharp.history}, trainer.global_rank)
"""


def test_clipping_factor_under_ddp_is_the_same_on_every_rank_and_training_is_untouched(tmp_path):
    from tests.helpers.ddp import run_ddp_script

    r0, r1 = run_ddp_script(_DDP_SCRIPT, tmp_path, launcher="external")
    assert r0["same_weights"] and r1["same_weights"]  # the recording hooks only read gradients
    assert r0["history"] == r1["history"]  # averaged gradients: the same factor and number on every rank
    factors = [v for _, v in r0["history"]["sharpness/clip_factor"]]
    assert len(factors) == 2 and all(0 < c < 1 for c in factors)
