import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lightning_gd.recipes.llama import PRESETS, Llama, LlamaConfig, _apply_rope, _rope_cache


def _tiny(**kw):
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_name("tiny", **{"block_size": 32, **kw}))


def test_forward_shape_and_tied_head():
    model = _tiny()
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256)
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("name", list(PRESETS))
def test_num_parameters_matches_the_built_model(name):
    cfg = LlamaConfig.from_name(name)
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_parameters() == cfg.num_parameters()


def test_preset_sizes_are_as_named():
    sizes = {n: LlamaConfig.from_name(n).num_parameters() / 1e6 for n in PRESETS}
    assert 0.5 < sizes["tiny"] < 1.0
    assert 115 < sizes["125m"] < 135
    assert 320 < sizes["350m"] < 370
    assert 1000 < sizes["1b"] < 1200


def test_flops_per_token_matches_flop_counter():
    cfg = LlamaConfig.from_name("tiny", block_size=32)
    model = Llama(cfg)
    B, T = 2, 32
    # The math SDPA backend decomposes attention into matmuls the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (B, T)))
    # The counter sees the forward pass: a third of the training FLOPs of the PaLM formula.
    assert counter.get_total_flops() == cfg.flops_per_token(T) * B * T // 3


def test_causal_future_tokens_do_not_change_past_logits():
    model = _tiny().eval()
    x = torch.randint(0, 256, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 7) % 256
    assert torch.allclose(model(x)[0, :12], model(y)[0, :12], atol=1e-6)
    assert not torch.allclose(model(x)[0, 12:], model(y)[0, 12:])


def test_rope_scores_depend_only_on_relative_position():
    D, T = 8, 16
    cos, sin = _rope_cache(T, D, 10_000.0)
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    qs = _apply_rope(q.expand(1, 1, T, D), cos.double(), sin.double())[0, 0]  # (T, D)
    ks = _apply_rope(k.expand(1, 1, T, D), cos.double(), sin.double())[0, 0]
    # <R_m q, R_n k> depends on m - n only, and rotations keep norms.
    assert torch.allclose(qs[5] @ ks[2], qs[9] @ ks[6])
    assert torch.allclose(qs[3] @ ks[3], q @ k)
    assert torch.allclose(qs.norm(dim=1), q.norm().expand(T))


def test_gqa_equals_multi_head_attention_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = Llama(LlamaConfig.from_name("tiny", block_size=16, n_head=4, n_kv_head=2))
    mha = Llama(LlamaConfig.from_name("tiny", block_size=16, n_head=4, n_kv_head=4))
    state = gqa.state_dict()
    D = gqa.config.head_size
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            # kv head g serves query heads 2g and 2g+1
            state[key] = value.view(2, D, -1).repeat_interleave(2, dim=0).reshape(4 * D, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, 256, (2, 16))
    assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_untied_head_and_sdpa_matches_explicit_attention():
    model = _tiny(tie_embeddings=False, n_kv_head=4).eval()
    assert model.lm_head.weight is not model.embed.weight
    attn = model.blocks[0].attn
    x = torch.randn(1, 10, 128)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    q = _apply_rope(attn.q_proj(x).view(1, 10, 4, 32).transpose(1, 2), cos, sin)
    k = _apply_rope(attn.k_proj(x).view(1, 10, 4, 32).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(1, 10, 4, 32).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / 32**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(10, 10, dtype=torch.bool), 1), float("-inf"))
    ref = attn.o_proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(1, 10, 128))
    assert torch.allclose(attn(x, cos, sin), ref, atol=1e-5)


def test_generate_is_seeded_and_leaves_global_rng_alone():
    model = _tiny().eval()
    prompt = torch.tensor([[100, 101]])
    state = torch.get_rng_state()
    a = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (1, 10) and torch.equal(a, b)
    greedy = model.generate(prompt, 3, temperature=0)
    assert greedy[0, 2] == model(prompt)[0, -1].argmax()


def test_bad_config_values():
    with pytest.raises(ValueError, match="n_kv_head"):
        LlamaConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        LlamaConfig(n_layer=0)
    with pytest.raises(ValueError, match="Unknown Llama preset `preset`='huge'; available: tiny, 125m"):
        LlamaConfig.from_name("huge")
    with pytest.raises(ValueError, match="n_layers"):
        LlamaConfig.from_name("tiny", n_layers=3)
    with pytest.raises(ValueError, match="block_size=32"):
        _tiny()(torch.zeros(1, 33, dtype=torch.long))
