"""A LLaMA-style decoder-only transformer.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models": pre-normalisation with
RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021, RoFormer), a SwiGLU MLP
(Shazeer 2020) and grouped-query attention (Ainslie et al. 2023, GQA) through
``F.scaled_dot_product_attention``. FLOPs per token follow Chowdhery et al. 2022 (PaLM, appendix B).

Shapes in comments: B batch, T sequence, C embedding, H query heads, G key/value heads, D head size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Llama", "LlamaConfig"]


@dataclass
class LlamaConfig:
    """Architecture of a :class:`Llama` model.

    Args:
        vocab_size: Number of tokens (256 for the byte-level corpora of this package).
        block_size: Longest sequence the rotary tables are built for.
        n_layer: Number of transformer blocks.
        n_head: Number of query heads H.
        n_kv_head: Number of key/value heads G (H must be a multiple of G; G < H is GQA, G = 1 is MQA).
        n_embd: Embedding width C (a multiple of ``n_head``; the head size is C / H and must be even).
        intermediate_size: Hidden width of the SwiGLU MLP; ``None`` takes 8C/3 rounded up to ``multiple_of``.
        multiple_of: Rounding of the default ``intermediate_size``.
        rope_base: Base of the rotary frequencies.
        norm_eps: Epsilon of RMSNorm.
        dropout: Dropout on attention outputs and MLP outputs (LLaMA uses none).
        tie_embeddings: Share the token embedding with the output head.
        init_std: Standard deviation of the normal initialisation.

    Example::

        >>> cfg = LlamaConfig.from_name("125m")
        >>> round(cfg.num_parameters() / 1e6, 1)  # million parameters
        124.7
    """

    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 128
    intermediate_size: int | None = None
    multiple_of: int = 32
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig: `{name}` must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"LlamaConfig: `n_embd`={self.n_embd} is not a multiple of `n_head`={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig: `n_head`={self.n_head} is not a multiple of `n_kv_head`={self.n_kv_head}")
        if self.head_size % 2:
            raise ValueError(f"LlamaConfig: the head size n_embd/n_head={self.head_size} must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LlamaConfig: `dropout` must be in [0, 1), got {self.dropout}")
        if self.intermediate_size is None:
            hidden = int(8 * self.n_embd / 3)
            self.intermediate_size = self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named preset (see :data:`PRESETS`), with any field overridden.

        Raises:
            ValueError: for an unknown preset name or an unknown field.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown Llama preset `preset`={name!r}; available: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"Unknown LlamaConfig field(s) {unknown}; valid fields: {sorted(fields)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Exact parameter count of :class:`Llama` built from this config.

        Args:
            non_embedding: Leave out the token embedding (and the output head when it is tied to it).
        """
        C, V, L = self.n_embd, self.vocab_size, self.n_layer
        kv = self.n_kv_head * self.head_size
        attn = C * C + 2 * C * kv + C * C  # q, k, v, o projections
        mlp = 3 * C * self.intermediate_size  # gate, up, down
        block = attn + mlp + 2 * C  # two RMSNorm gains
        body = L * block + C  # final norm
        head = 0 if self.tie_embeddings else V * C
        return body + head + (0 if non_embedding else V * C)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward and backward): 6 N + 12 L C T (PaLM, appendix B).

        N counts the weights that take part in matrix multiplications, the output head included (tied or
        not); the second term is attention's score and value products at sequence length T, without
        discounting the causal mask. Forward alone is a third of it.
        """
        T = self.block_size if seq_len is None else seq_len
        C, L = self.n_embd, self.n_layer
        matmul_params = self.num_parameters(non_embedding=True) - (L * 2 * C + C)  # norms are no matmuls
        if self.tie_embeddings:
            matmul_params += self.vocab_size * C
        return 6 * matmul_params + 12 * L * C * T


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.8M parameters, byte-level: trains on a 2-core CPU in minutes.
    "tiny": dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128),
    # ~125M: GPT-2-small width and depth with GQA and a LLaMA tokenizer-sized vocabulary.
    "125m": dict(
        vocab_size=32_000, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
        intermediate_size=2048, tie_embeddings=False,
    ),
    # ~336M.
    "350m": dict(
        vocab_size=32_000, block_size=2048, n_layer=24, n_head=16, n_kv_head=4, n_embd=1024,
        intermediate_size=2816, tie_embeddings=False,
    ),
    # TinyLlama-1.1B's shape.
    "1b": dict(
        vocab_size=32_000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
        intermediate_size=5632, tie_embeddings=False,
    ),
}  # fmt: skip


def _rope_cache(T: int, D: int, base: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape (T, D/2) for rotary embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))  # (D/2,)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_2i, x_2i+1) of x (B, heads, T, D) by the position angles; real arithmetic so
    that forward-mode AD and double backward both work."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, h, T, D/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, h, T, D/2, 2)
    return out.flatten(-2)


class _Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, cfg.n_kv_head, cfg.head_size
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_size, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_size, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_size, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, G, T, D)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if self.n_kv_head != self.n_head:
            # Explicit repeat rather than enable_gqa: it works with every SDPA backend and with
            # forward-mode AD, which the curvature tools use.
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class _SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        assert cfg.intermediate_size is not None
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)


class _Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = _Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = _SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Llama(nn.Module):
    """LLaMA-style decoder: token embedding, ``n_layer`` pre-norm blocks, final RMSNorm, output head.

    Args:
        config: The architecture.
        activation_checkpointing: Recompute each block's activations in the backward pass instead of storing
            them (``torch.utils.checkpoint``, non-reentrant): less memory for about one more forward pass.

    Example::

        >>> model = Llama(LlamaConfig.from_name("tiny"))
        >>> model(torch.randint(0, 256, (2, 64))).shape  # logits
        torch.Size([2, 64, 256])
    """

    def __init__(self, config: LlamaConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = _rope_cache(config.block_size, config.head_size, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's depth scaling of the residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, vocab_size) for token ids ``idx`` (B, T)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.lm_head(self.norm(x))  # (B, T, V)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt ``idx`` (B, T); returns (B, T + new).

        ``temperature == 0`` decodes greedily. Sampling draws only from ``generator`` when one is given.
        """
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1, :]  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits.float(), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
