"""The decoder: a Llama-style transformer that is Hugging Face `LlamaForCausalLM`, parameter for parameter.

Why this file exists and looks the way it does:
- The paper's promise is that the inference-time model is an ordinary pretrained LM. So the architecture mirrors
  `transformers.LlamaForCausalLM` exactly (RMSNorm with its epsilon, rotate-half rotary embeddings with base
  `rope_theta`, SwiGLU MLP, grouped-query attention, no biases, no QK-norm, untied embedding and LM head), and
  export is nothing but a renaming of the state dict (`to_hf_state_dict` / `from_hf_state_dict` below).
- Token Superposition Training changes only the two ends of the network (paper Listings 2 and 3):
  a `(B, L, s)` bag of ids is embedded as the float32 mean of its s embeddings (`tst_ops.bag_embedding`), latent
  position j keeps rotary position j, and the loss is the multi-hot cross-entropy against the next bag.
  Nothing in between knows about bags.
- The loss is computed INSIDE `forward` (fused LM head + multi-hot CE from `tst_ops`), so that under FSDP the
  head weight is unsharded when it is read and the `(N, V)` logits are never materialised.
- One file, no distributed or framework code (FSDP wrapping lives in the training loop). Imports only torch and
  tst_ops, so the Ray-free loop and the GPU check run with PyTorch alone.

Parameter names follow Meta's Llama reference (tok_embeddings, layers.{i}.attention.wq, feed_forward.w1, ...);
`HF_NAME_MAP` gives the Hugging Face name of each.

Mixture-of-Experts (`model.num_experts > 0`): the model is then Hugging Face `Qwen3MoeForCausalLM` parameter for
parameter instead: every `model.moe_every`-th layer's MLP is the MoE block of `pipeline/model/moe.py` (router, top-k
softmax renormalised, SwiGLU experts, no shared expert, dropless), and attention has Qwen3's QK-norm (an RMSNorm
over each head's query and key, before RoPE). QK-norm is a flag of its own (`model.qk_norm`): on for the MoE
presets because Qwen3-MoE (and OLMoE) have it and export must be a renaming; off for the dense presets because
they are Llamas, which have none. A bag's averaged embedding is routed like a token. In training mode with targets,
forward adds the load-balancing loss (and the optional z-loss) to the returned loss and leaves the parts in
`self.moe_last` (see `forward`). FLOPs count active parameters only (`num_active_params`).

Presets (`PRESETS`): "tiny" for CPU runs and tests; "125M" for the GPU check; and the paper's shapes with the
Llama-3 vocabulary (128,256 ids) untied (design notes, "Model and export"):
  "270M" = SmolLM2-135M shape, "600M" = SmolLM2-360M shape, "3B" = SmolLM3-3B shape.
Their parameter counts (tested on the meta device in tests/test_model.py) are 254.0M, 560.9M and 3.338B: the
paper's names round the untied-embedding models up. With SmolLM's own tied 49,152-id (SmolLM2) / 128,256-id
(SmolLM3) embeddings the same shapes give the public 134.5M, 361.8M and 3.075B.
MoE presets: "tiny-moe" (CPU; the tiny shape with 8 experts of 192, top 2, so its active parameters and FLOPs per
position are tiny's: +0.3% for routers and QK-norms) and "10B-A1B" (the paper's MoE scale; shape and counts at the
preset below, tested in tests/test_moe.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import tst_ops

# Shapes, with sources. Fields left None in a ModelConfig are filled from here; vocab_size comes from the
# tokenizer unless the config sets it, and the preset's vocab_size is the reference used for parameter counts.
# Dense presets: no experts, no QK-norm (plain Llama). Every preset sets every key, so a resolved config is complete.
_DENSE = dict(num_experts=0, experts_per_token=0, moe_intermediate_size=0, moe_every=1, router_aux_loss_coef=0.0,
              router_z_loss_coef=0.0, qk_norm=False)

PRESETS: dict[str, dict] = {
    # CPU default: 1.84M parameters at a 4096-id vocabulary (0.79M non-embedding); trains in seconds on 2 cores
    # at seq 128.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
    ),
    # The crossover study's CPU sizes (issue 19, pipeline/study/crossover.py): tiny widened and deepened, head dim
    # 64 from 5M up, all at the 4096-id vocabulary of the CPU corpus. "5M" is the hidden-256 model of
    # docs/results.md (tiny with hidden_size=256 intermediate_size=768): 5,245,184 parameters (3.15M
    # non-embedding). "13M": 13,472,640 (10.33M non-embedding). "29M" (the optional fourth size): 29,368,832
    # (25.17M non-embedding). tests/test_model.py pins the counts.
    "5M": dict(
        vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
    ),
    "13M": dict(
        vocab_size=4096, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1152,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
    ),
    "29M": dict(
        vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
    ),
    # GPU check: a GPT-2-small-sized Llama. 75.5M non-embedding; with a 32,768-id vocab untied 125.85M in all
    # (with GPT-2's 50,257 ids: 152.7M).
    "125M": dict(
        vocab_size=32768, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
    ),
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json: LlamaForCausalLM, hidden 576, 30 layers, 9 heads,
    # 3 KV heads, intermediate 1536, rope_theta 100000, rms_norm_eps 1e-5), Llama-3 vocab untied.
    "270M": dict(
        vocab_size=128256, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
        rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    # SmolLM2-360M (HuggingFaceTB/SmolLM2-360M config.json: hidden 960, 32 layers, 15 heads, 5 KV heads,
    # intermediate 2560, rope_theta 100000, rms_norm_eps 1e-5), Llama-3 vocab untied.
    "600M": dict(
        vocab_size=128256, hidden_size=960, num_layers=32, num_heads=15, num_kv_heads=5, intermediate_size=2560,
        rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    # SmolLM3-3B (HuggingFaceTB/SmolLM3-3B config.json: hidden 2048, 36 layers, 16 heads, 4 KV heads,
    # intermediate 11008, vocab 128256, rope_theta 5e6, rms_norm_eps 1e-6). SmolLM3 itself skips RoPE in every
    # 4th layer (NoPE) and ties its embeddings; this preset keeps the shape but is a plain Llama (RoPE in every
    # layer, untied), as the paper's Llama-3/Qwen3-shaped models are.
    "3B": dict(
        vocab_size=128256, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=4, intermediate_size=11008,
        rope_theta=5000000.0, rms_norm_eps=1e-6, max_position_embeddings=65536,
    ),
    # tiny with its MLP split into 8 SwiGLU experts of 192, top-2: the active MLP (2 x 3 x 128 x 192) equals tiny's
    # dense MLP (3 x 128 x 384), so active FLOPs per position are tiny's (+ router 128 x 8 and QK-norm per layer).
    # Load-balancing coefficient 0.01 as OLMoE (our aux is 1 at uniform routing; HF's is k at uniform, so Qwen3's
    # 0.001 on HF's loss is 0.008 on ours at k = 8).
    "tiny-moe": dict(
        vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
        num_experts=8, experts_per_token=2, moe_intermediate_size=192, moe_every=1, router_aux_loss_coef=0.01,
        router_z_loss_coef=0.0, qk_norm=True,
    ),
    # The paper's 10B-A1B: OLMoE-1B-7B's trunk (allenai/OLMoE-1B-7B-0924: hidden 2048, 16 layers, 16 heads of 128)
    # with Qwen3-30B-A3B's experts and attention (Qwen/Qwen3-30B-A3B config.json: 128 experts of
    # moe_intermediate_size 768, top-8, norm_topk_prob, 4 KV heads, QK-norm, rope_theta 1e6, rms_norm_eps 1e-6),
    # every layer MoE, Llama-3 vocabulary untied. Total 10.36B parameters; active per token 1.30B with both
    # embedding matrices, 1.04B counting the LM head but not the input embedding (a lookup): "A1B".
    # intermediate_size is Qwen3-30B-A3B's, used only by layers that moe_every leaves dense.
    "10B-A1B": dict(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4, intermediate_size=6144,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
        num_experts=128, experts_per_token=8, moe_intermediate_size=768, moe_every=1, router_aux_loss_coef=0.01,
        router_z_loss_coef=0.0, qk_norm=True,
    ),
}
PRESETS = {name: {**_DENSE, **shape} for name, shape in PRESETS.items()}


def is_moe_layer(cfg, i: int) -> bool:
    """Qwen3-MoE's rule (`decoder_sparse_step`): layer i is MoE when (i + 1) % moe_every == 0."""
    return cfg.num_experts > 0 and (i + 1) % cfg.moe_every == 0


def resolve_model_config(cfg, vocab_size: Optional[int] = None):
    """Fill every None field of a `ModelConfig` from its preset. vocab_size: the config's if set, else the
    tokenizer's (`vocab_size` argument), else the preset's reference vocabulary. Returns a new ModelConfig."""
    if cfg.preset not in PRESETS:
        from pipeline.config import ConfigError  # stdlib-only module

        raise ConfigError(f"model.preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    preset = PRESETS[cfg.preset]
    filled = {k: (getattr(cfg, k) if getattr(cfg, k) is not None else v) for k, v in preset.items()}
    if cfg.vocab_size is None and vocab_size is not None:
        filled["vocab_size"] = int(vocab_size)
    out = dataclasses.replace(cfg, **filled)
    if out.hidden_size % out.num_heads or out.num_heads % out.num_kv_heads:
        from pipeline.config import ConfigError

        raise ConfigError(
            f"model: hidden_size ({out.hidden_size}) must be divisible by num_heads ({out.num_heads}) and "
            f"num_heads by num_kv_heads ({out.num_kv_heads})"
        )
    if (out.hidden_size // out.num_heads) % 2:
        from pipeline.config import ConfigError

        raise ConfigError(f"model: head dim hidden_size/num_heads = {out.hidden_size // out.num_heads} must be even")
    if out.num_experts:
        from pipeline.config import ConfigError

        if not 1 <= out.experts_per_token <= out.num_experts or out.moe_intermediate_size < 1 or out.moe_every < 1:
            raise ConfigError(
                f"model: an MoE needs 1 <= experts_per_token ({out.experts_per_token}) <= num_experts "
                f"({out.num_experts}), moe_intermediate_size >= 1 ({out.moe_intermediate_size}) and moe_every >= 1 "
                f"({out.moe_every})")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Building blocks (each matches its LlamaXxx counterpart in transformers/models/llama/modeling_llama.py)
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., D)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # normalised in float32 as HF does
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (L, head_dim) for integer positions (L,), computed as HF's LlamaRotaryEmbedding does
    (float32, inverse frequencies theta^(-2i/d), the half-frequency table repeated: rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):  # (..., hd): [x1, x2] -> [-x2, x1]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):  # x (B, H, L, hd); cos/sin (L, hd)
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Preallocated keys/values for generation: per layer (B, H_kv, max_len, hd). `forward(..., cache=,
    start_pos=)` writes positions start_pos..start_pos+T-1 and attends over 0..start_pos+T-1."""

    def __init__(self, cfg, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        hd = cfg.hidden_size // cfg.num_heads
        shape = (batch_size, cfg.num_kv_heads, max_len, hd)
        self.max_len = max_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        d = cfg.hidden_size
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=False)  # HF q_proj
        self.wk = nn.Linear(d, self.n_kv * self.head_dim, bias=False)  # HF k_proj
        self.wv = nn.Linear(d, self.n_kv * self.head_dim, bias=False)  # HF v_proj
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)  # HF o_proj
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's dimension, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # HF q_norm
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # HF k_norm
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, cache: Optional[KVCache] = None, layer: int = 0, start_pos: int = 0):
        B, L, _ = x.shape  # (B, L, D)
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.wk(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.wv(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H_kv, L, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:
            end = start_pos + L
            cache.k[layer][:, :, start_pos:end] = k
            cache.v[layer][:, :, start_pos:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]  # (B, H_kv, end, hd)
            # query i (absolute start_pos+i) sees keys 0..start_pos+i
            mask = torch.ones(L, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)  # (L, end)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        y = y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)  # (B, L, H*hd)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); HF gate_proj = w1, up_proj = w3, down_proj = w2."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x):  # (B, L, D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Returns (h (B, L, D), router statistics of an MoE layer or None): the statistics leave the block as an
    output, so that FSDP2's backward hooks see them."""

    def __init__(self, cfg, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF input_layernorm
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF post_attention_layernorm
        self.is_moe = is_moe_layer(cfg, layer)
        if self.is_moe:
            from pipeline.model.moe import MoEFeedForward

            self.feed_forward = MoEFeedForward(cfg)
        else:
            self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, start_pos=0):  # (B, L, D)
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start_pos)
        if self.is_moe:
            y, stats = self.feed_forward(self.ffn_norm(x))
            return x + y, stats
        return x + self.feed_forward(self.ffn_norm(x)), None


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if any(getattr(cfg, f) is None for f in PRESETS["tiny"]):
            raise ValueError("Transformer needs a resolved ModelConfig: call resolve_model_config(cfg, vocab_size)")
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # HF model.embed_tokens
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied

    @torch.no_grad()
    def init_weights(self, std: Optional[float] = None):
        """Deterministic given torch.manual_seed: every matrix N(0, std) in module order, norms 1. Works in place
        after `to_empty` from the meta device."""
        std = self.cfg.init_std if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif hasattr(m, "init_weights") and m is not self:  # MoE experts: 3-D weights, N(0, std) too
                m.init_weights(std)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        loss_weights="uniform",
        slot_counts: Optional[torch.Tensor] = None,
        fused_chunk: Optional[int] = None,
        cache: Optional[KVCache] = None,
        start_pos: int = 0,
        router_counts_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        router_tokens: Optional[float] = None,
        router_counts: Optional[torch.Tensor] = None,
        router_counts_only: bool = False,
    ):
        """tokens (B, L) ids or (B, L, s) bags. targets (B, L, s) or (B, L) next-(bag) ids, -100 = ignore.
        Returns the scalar loss when targets are given, else logits (B, L, V) in float32-or-compute dtype.
        `cache`/`start_pos`: incremental decoding (generation), positions start_pos..start_pos+L-1.

        MoE, training mode, with targets: the returned loss is LM + router_aux_loss_coef * aux + router_z_loss_coef
        * z, and `self.moe_last` holds {"lm", "aux", "z"} (detached shares) and "counts" ((n_moe, E) assignment
        counts used for the fractions). Like `slot_counts` for the LM loss, the caller makes the aux loss a
        global-batch quantity: `router_counts_reduce` maps this forward's (n_moe, E) counts to their sum over ranks
        (an all-reduce; called once, after the last layer) and `router_tokens` is the global number of routed
        positions in the step; then the shares of every rank and micro-batch add up (pipeline/model/moe.py).
        `router_counts` ((n_moe, E), no reduce then) gives the step's counts over ALL ranks and micro-batches
        instead, from a routing pre-pass: `router_counts_only=True` (under torch.no_grad) runs the embedding and the
        layers only and returns this forward's (n_moe, E) counts: no final norm, LM head or loss."""
        if tokens.dim() == 3:  # Listing 2: mean of the s slot embeddings in float32, cast back
            h = tst_ops.bag_embedding(tokens, self.tok_embeddings.weight)  # (B, L, D)
        elif tokens.dim() == 2:
            h = self.tok_embeddings(tokens)  # (B, L, D)
        else:
            raise ValueError(f"tokens must be (B, L) or (B, L, s), got shape {tuple(tokens.shape)}")
        L = tokens.shape[1]
        # latent position j gets rotary position j (bags too)
        positions = torch.arange(start_pos, start_pos + L, device=tokens.device)  # (L,)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.cfg.rope_theta, h.dtype)  # (L, hd)
        router_stats = []  # per MoE layer: (counts (E,), prob_sum (E,), z_sum ())
        for i, layer in enumerate(self.layers):
            h, stats = layer(h, cos, sin, cache, i, start_pos)  # (B, L, D)
            if stats is not None:
                router_stats.append(stats)
        if router_counts_only:
            return torch.stack([c for c, _, _ in router_stats])  # (n_moe, E)
        h = self.norm(h)  # (B, L, D)
        if targets is None:
            return self.lm_head(h)  # (B, L, V)
        if targets.dim() == 2:
            targets = targets.unsqueeze(-1)  # (B, L, 1): ordinary next-token targets
        # Listing 3 (multi-hot CE over the next bag), fused with the LM head: (N, V) logits never materialised.
        lm = tst_ops.fused_linear_multi_hot_cross_entropy(
            h.flatten(0, 1),  # (B*L, D)
            self.lm_head.weight,  # (V, D), unsharded here under FSDP
            targets.flatten(0, 1),  # (B*L, s)
            weights=loss_weights,
            slot_counts=slot_counts,
            chunk_size=fused_chunk,
        )
        if not (router_stats and self.training):
            return lm  # dense, or evaluation: the next-(bag) loss alone
        from pipeline.model.moe import moe_losses

        counts = torch.stack([c for c, _, _ in router_stats])  # (n_moe, E) this forward's assignments
        if router_counts is not None:
            counts = router_counts  # (n_moe, E) the step's, summed over ranks and micro-batches (pre-pass)
        elif router_counts_reduce is not None:
            counts = router_counts_reduce(counts)  # (n_moe, E) summed over ranks
        aux, z = moe_losses(router_stats, self.cfg.num_experts, self.cfg.experts_per_token, counts, router_tokens)
        self.moe_last = {"lm": lm.detach(), "aux": aux.detach(), "z": z.detach(), "counts": counts.detach()}
        loss = lm + self.cfg.router_aux_loss_coef * aux.to(lm.dtype)
        if self.cfg.router_z_loss_coef:
            loss = loss + self.cfg.router_z_loss_coef * z.to(lm.dtype)
        return loss

    # -- accounting ------------------------------------------------------------------------------------------------
    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (works on the meta device). exclude_embedding drops BOTH the input embedding and the
        LM head matrix (the design notes' N_nonembedding)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel() + self.lm_head.weight.numel()
        return n

    def num_active_params(self, exclude_embedding: bool = False) -> int:
        """Parameters that one token uses: all but the (E - k) experts it was not routed to in each MoE layer
        (equals num_params for a dense model). exclude_embedding as in num_params."""
        n = self.num_params(exclude_embedding)
        c = self.cfg
        for layer in self.layers:
            if layer.is_moe:
                ff = layer.feed_forward
                per_expert = ff.w13[0].numel() + ff.w2[0].numel()
                n -= (c.num_experts - c.experts_per_token) * per_expert
        return n

    def flops_per_position(self, seq_len: int) -> int:
        """Training FLOPs per latent position (design notes): 6 (N_nonembedding + d V) + 6 n_layers d L, the last
        term being causal attention (half of full attention's 12 n_layers d L). N_nonembedding counts ACTIVE
        parameters only (an MoE layer: router + k experts), so FLOPs and MFU of MoE and dense models compare."""
        c = self.cfg
        return 6 * (self.num_active_params(exclude_embedding=True) + c.hidden_size * c.vocab_size) + 6 * c.num_layers * (
            c.hidden_size * seq_len
        )

    # -- generation --------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """prompt (B, T) ids -> (B, T + n) ids, n <= max_new_tokens (stops early when every row hit eos_id).
        temperature 0 is greedy (argmax, ties to the lowest id as torch.argmax). KV-cached."""
        B, T = prompt.shape
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self(prompt, cache=cache, start_pos=0)[:, -1]  # (B, V)
        out = [prompt]
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt[:, None])
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = self(nxt[:, None], cache=cache, start_pos=T + i)[:, -1]  # (B, V)
        return torch.cat(out, dim=1)


def reference_vocab(preset: str, data_vocab: int) -> int:
    """The preset's reference vocabulary when it covers the tokenizer's ids, else the tokenizer's: the model of a
    preset then has the preset's documented size (e.g. "125M" with GPT-2's 50,257 ids), whatever smaller
    vocabulary the data was tokenized with (bench/gpu_check.py, the speedup study's GPU setting)."""
    return max(PRESETS[preset]["vocab_size"], int(data_vocab))


def model_summary(model_cfg, vocab_size: int, seq_len: int) -> dict:
    """Shape, parameter counts and training FLOPs per latent position of a `ModelConfig` (built on the meta
    device: no memory, no time)."""
    mcfg = resolve_model_config(model_cfg, model_cfg.vocab_size or vocab_size)
    with torch.device("meta"):
        m = Transformer(mcfg)
    return {"preset": model_cfg.preset, "hidden_size": mcfg.hidden_size, "num_layers": mcfg.num_layers,
            "num_heads": mcfg.num_heads, "num_kv_heads": mcfg.num_kv_heads,
            "intermediate_size": mcfg.intermediate_size, "vocab_size": mcfg.vocab_size,
            "params": int(m.num_params()), "params_non_embedding": int(m.num_params(exclude_embedding=True)),
            "flops_per_position": int(m.flops_per_position(seq_len))}


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) float -> ids (B,). temperature <= 0: greedy. top_k / top_p filter before sampling."""
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (always keeps the top token)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face names: export is this renaming and nothing else
# ---------------------------------------------------------------------------------------------------------------

HF_NAME_MAP = {  # ours (per-layer part after "layers.{i}.") -> HF LlamaForCausalLM
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # QK-norm (Qwen3)
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.router.weight": "mlp.gate.weight",  # MoE router (Qwen3MoeTopKRouter)
}
# MoE expert tensors (E, ., .) <-> one matrix per expert j: mlp.experts.{j}.<name>.weight, the on-disk layout of
# the published Qwen3-MoE checkpoints (transformers 4.x loads it as is; 5.x merges it into gate_up_proj/down_proj).
# w13 (E, 2I, D) holds gate_proj (rows :I) then up_proj (rows I:), as transformers 5's gate_up_proj.
HF_EXPERT_MAP = {"feed_forward.w13": ("gate_proj", "up_proj"), "feed_forward.w2": ("down_proj",)}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in HF_NAME_MAP:
        return f"model.layers.{parts[1]}.{HF_NAME_MAP[parts[2]]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def to_hf_state_dict(sd: dict) -> dict:
    """Our state dict -> LlamaForCausalLM's / Qwen3MoeForCausalLM's (same tensors, new names; an MoE layer's
    (E, ., .) expert tensors become E per-expert matrices, views of the same storage)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".", 2)
        if parts[0] == "layers" and len(parts) == 3 and parts[2] in HF_EXPERT_MAP:
            names = HF_EXPERT_MAP[parts[2]]
            for j in range(v.shape[0]):
                for name, m in zip(names, v[j].chunk(len(names), dim=0)):  # w13[j] -> gate, up
                    out[f"model.layers.{parts[1]}.mlp.experts.{j}.{name}.weight"] = m
        else:
            out[hf_name(k)] = v
    return out


def from_hf_state_dict(sd: dict) -> dict:
    """LlamaForCausalLM's state dict -> ours (ignores HF's non-persistent extras such as rotary inv_freq)."""
    inv = {v: k for k, v in _TOP.items()}
    rev = {hv: ov for ov, hv in HF_NAME_MAP.items()}
    rev_expert = {hv: (ov, pos) for ov, hvs in HF_EXPERT_MAP.items() for pos, hv in enumerate(hvs)}
    out, experts = {}, {}  # experts: (layer, our name) -> {j: {position: (., .) matrix}}
    for k, v in sd.items():
        if k in inv:
            out[inv[k]] = v
            continue
        parts = k.split(".", 3)  # model, layers, i, rest
        if len(parts) == 4 and parts[:2] == ["model", "layers"]:
            i, rest = parts[2], parts[3]
            if rest in rev:
                out[f"layers.{i}.{rev[rest]}"] = v
                continue
            sub = rest.split(".")
            if len(sub) == 5 and sub[:2] == ["mlp", "experts"] and sub[3] in rev_expert and sub[4] == "weight":
                ours, pos = rev_expert[sub[3]]  # per-expert (disk) layout
                experts.setdefault((i, ours), {}).setdefault(int(sub[2]), {})[pos] = v
                continue
            if rest == "mlp.experts.gate_up_proj":  # transformers 5 in memory: (E, 2I, D), our w13
                out[f"layers.{i}.feed_forward.w13"] = v
                continue
            if rest == "mlp.experts.down_proj":  # (E, D, I)
                out[f"layers.{i}.feed_forward.w2"] = v
                continue
        if k.endswith("rotary_emb.inv_freq"):
            continue
        raise KeyError(f"unexpected Hugging Face parameter {k!r}")
    for (i, name), mats in experts.items():  # (E, ., .); gate and up concatenated along rows for w13
        out[f"layers.{i}.{name}"] = torch.stack([torch.cat([mats[j][p] for p in sorted(mats[j])])
                                                 for j in range(len(mats))])
    return out
