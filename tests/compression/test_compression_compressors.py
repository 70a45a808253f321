"""Exact properties, wire sizes and argument validation of the compressors."""

import math

import pytest
import torch

from lightning_gd.compression import QSGD, CompressedTensor, RandomK, Sign, TopK


def _randn(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------- top-k
@pytest.mark.parametrize("n,density", [(1000, 0.05), (37, 0.1), (10, 1.0), (5, 0.01)])
def test_topk_keeps_exactly_the_k_largest_magnitudes(n: int, density: float) -> None:
    x = _randn(n)
    comp = TopK(density)
    c = comp.compress(x)
    out = comp.decompress(c)
    k = max(1, round(density * n))
    expected_support = set(torch.argsort(x.abs(), descending=True)[:k].tolist())
    assert set(out.nonzero().flatten().tolist()) == expected_support
    support = torch.tensor(sorted(expected_support))
    assert torch.equal(out[support], x[support])  # kept values are exact
    assert [t.dtype for t in c.payload] == [torch.float32, torch.int32]
    assert c.nbytes == comp.payload_bytes(n, torch.float32) == 8 * k


def test_topk_payload_bytes_follow_dtype() -> None:
    comp = TopK(0.1)
    c = comp.compress(_randn(200, dtype=torch.float16))
    assert c.nbytes == comp.payload_bytes(200, torch.float16) == 20 * (2 + 4)
    assert comp.decompress(c).dtype == torch.float16


def test_topk_sampled_selects_the_exact_topk() -> None:
    x = _randn(200_000, seed=1) ** 3  # heavy tails
    exact, sampled = TopK(0.001), TopK(0.001, sampled=True, sample_threshold=10_000)
    assert torch.equal(exact.decompress(exact.compress(x)), sampled.decompress(sampled.compress(x)))
    assert sampled.sample_fallbacks == 0  # the DGC path was taken


def test_topk_sampled_falls_back_when_the_threshold_is_too_high() -> None:
    # A one-element sample lands inside the top half (threshold too high) about half the time.
    x = _randn(20_000, seed=2)
    exact = TopK(0.5)
    sampled = TopK(0.5, sampled=True, sample_threshold=10, sample_fraction=1e-9)
    for _ in range(8):
        assert torch.equal(exact.decompress(exact.compress(x)), sampled.decompress(sampled.compress(x)))
    assert 0 < sampled.sample_fallbacks < 8


# ---------------------------------------------------------------------- random-k
def test_randomk_same_seed_and_step_give_same_indices() -> None:
    a, b, other = RandomK(0.1, seed=11), RandomK(0.1, seed=11), RandomK(0.1, seed=12)
    xa, xb = _randn(500, seed=1), _randn(500, seed=2)  # ranks hold different data
    for _ in range(3):
        ca, cb, co = a.compress(xa, key=4), b.compress(xb, key=4), other.compress(xa, key=4)
        assert torch.equal(ca.ctx["indices"], cb.ctx["indices"])
        assert not torch.equal(ca.ctx["indices"], co.ctx["indices"])
    # the indices are a function of (seed, step, key): the next step and another key differ
    assert not torch.equal(a.indices(500, key=4, step=0), a.indices(500, key=4, step=1))
    assert not torch.equal(a.indices(500, key=4, step=0), a.indices(500, key=5, step=0))
    assert torch.equal(a.indices(500, key=4, step=2), ca.ctx["indices"])


def test_randomk_decompress_and_bytes() -> None:
    x = _randn(300)
    comp = RandomK(0.2, seed=0)
    c = comp.compress(x, key="w")
    out = comp.decompress(c)
    idx = c.ctx["indices"]
    assert idx.numel() == 60 and idx.unique().numel() == 60
    assert torch.equal(out[idx], x[idx])  # not rescaled by default (error-feedback friendly)
    assert out.count_nonzero() == 60
    assert len(c.payload) == 1 and c.nbytes == comp.payload_bytes(300) == 60 * 4


def test_randomk_unbiased_option_is_unbiased() -> None:
    x = _randn(40)
    comp = RandomK(0.25, seed=3, unbiased=True)
    mean = torch.stack([comp.decompress(comp.compress(x)) for _ in range(4000)]).mean(0)
    # per coordinate std of the estimate: |x_i| sqrt((d/k - 1) / N)
    tol = 5 * x.abs() * math.sqrt(3 / 4000) + 1e-6
    assert ((mean - x).abs() <= tol).all()


def test_randomk_state_dict_resumes_the_index_stream() -> None:
    a = RandomK(0.1, seed=5)
    x = _randn(100)
    for _ in range(3):
        a.compress(x, key=0)
    b = RandomK(0.1, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"counters": {"0": 3}, "seed": 5}
    assert torch.equal(a.compress(x, key=0).ctx["indices"], b.compress(x, key=0).ctx["indices"])


# ---------------------------------------------------------------------- sign
@pytest.mark.parametrize("n", [1, 13, 64, 1001])
def test_sign_scale_is_mean_abs_and_bits_are_packed(n: int) -> None:
    x = _randn(n, seed=n)
    x[0] = 0.0  # zero is sent as +
    comp = Sign()
    c = comp.compress(x)
    scale, bits = c.payload
    assert torch.allclose(scale, x.abs().mean().reshape(1))
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(n / 8)
    assert c.nbytes == comp.payload_bytes(n) == math.ceil(n / 8) + 4
    expected = torch.where(x >= 0, 1.0, -1.0) * x.abs().mean()
    assert torch.equal(comp.decompress(c), expected)


def test_sign_keeps_low_precision_dtype_and_zero_input() -> None:
    comp = Sign()
    assert comp.decompress(comp.compress(_randn(9, dtype=torch.bfloat16))).dtype == torch.bfloat16
    assert torch.equal(comp.decompress(comp.compress(torch.zeros(5))), torch.zeros(5))


# ---------------------------------------------------------------------- QSGD
@pytest.mark.parametrize("levels,bits", [(1, 2), (3, 4), (7, 4), (8, 8), (127, 8), (128, 16), (40_000, 32)])
def test_qsgd_codes_bytes_and_lattice(levels: int, bits: int) -> None:
    n = 101
    x = _randn(n, seed=levels)
    comp = QSGD(levels, seed=0)
    c = comp.compress(x)
    norm = x.norm()
    assert comp.code_bits == bits
    assert c.nbytes == comp.payload_bytes(n) == 4 + math.ceil(n * bits / 8)
    assert torch.allclose(c.payload[0], norm.reshape(1))
    out = comp.decompress(c)
    level = out.abs() * levels / norm  # l_i, an integer in [0, s] next to |x_i| s / ||x||
    assert torch.allclose(level, level.round(), atol=1e-3)
    r = x.abs() * levels / norm
    assert ((level.round() - r.floor() >= 0) & (level.round() - r.floor() <= 1)).all()
    nz = out != 0
    assert torch.equal(out[nz].sign(), x[nz].sign())


def test_qsgd_is_unbiased_in_expectation() -> None:
    x = _randn(50, seed=7)
    comp = QSGD(2, seed=0)
    draws = torch.stack([comp.decompress(comp.compress(x)) for _ in range(3000)])
    # Var[Q(x)_i] <= ||x||^2 / (4 s^2): the deviation of the mean is a few of its std
    tol = 5 * (x.norm() / (2 * 2)) / math.sqrt(3000)
    assert (draws.mean(0) - x).abs().max() <= tol


def test_qsgd_randomness_is_seeded_and_resumable() -> None:
    x = _randn(64)
    a, b = QSGD(3, seed=1), QSGD(3, seed=1)
    assert torch.equal(a.decompress(a.compress(x)), b.decompress(b.compress(x)))
    b.salt = 1  # another rank draws other noise
    a2 = QSGD(3)
    a2.load_state_dict(a.state_dict())
    ca, cb, c2 = a.compress(x), b.compress(x), a2.compress(x)
    assert torch.equal(ca.payload[1], c2.payload[1])
    assert not torch.equal(ca.payload[1], cb.payload[1])
    assert torch.equal(a.decompress(a.compress(torch.zeros(7))), torch.zeros(7))


# ---------------------------------------------------------------------- validation and misc
@pytest.mark.parametrize(
    "factory,pattern",
    [
        (lambda: TopK(0.0), r"density.*0\.0"),
        (lambda: TopK(1.5), r"density.*1\.5"),
        (lambda: TopK(-0.1), r"density.*-0\.1"),
        (lambda: RandomK(0), r"density.*\b0\b"),
        (lambda: RandomK(2.0), r"density.*2\.0"),
        (lambda: QSGD(0), r"levels.*\b0\b"),
        (lambda: QSGD(-3), r"levels.*-3"),
        (lambda: QSGD(2.5), r"levels.*2\.5"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_raise_value_error_naming_them(factory, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        factory()


def test_compressed_tensor_reports_shape_and_bytes() -> None:
    comp = TopK(0.5)
    c = comp.compress(_randn(12).reshape(3, 4))
    assert isinstance(c, CompressedTensor) and c.numel == 12 and c.shape == (3, 4)
    assert comp.decompress(c).shape == (3, 4)
    assert c.nbytes == 6 * 8
