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

Presets (`PRESETS`): "tiny" for CPU runs and tests; "125M" for the GPU check; and the paper's shapes with the
Llama-3 vocabulary (128,256 ids) untied (design notes, "Model and export"):
  "270M" = SmolLM2-135M shape, "600M" = SmolLM2-360M shape, "3B" = SmolLM3-3B shape.
Their parameter counts (tested on the meta device in tests/test_model.py) are 254.0M, 560.9M and 3.338B: the
paper's names round the untied-embedding models up. With SmolLM's own tied 49,152-id (SmolLM2) / 128,256-id
(SmolLM3) embeddings the same shapes give the public 134.5M, 361.8M and 3.075B.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import tst_ops

# Shapes, with sources. Fields left None in a ModelConfig are filled from here; vocab_size comes from the
# tokenizer unless the config sets it, and the preset's vocab_size is the reference used for parameter counts.
PRESETS: dict[str, dict] = {
    # CPU default: 1.84M parameters at a 4096-id vocabulary (0.79M non-embedding); trains in seconds on 2 cores
    # at seq 128.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
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
}


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

    def forward(self, x, cos, sin, cache: Optional[KVCache] = None, layer: int = 0, start_pos: int = 0):
        B, L, _ = x.shape  # (B, L, D)
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.wk(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.wv(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H_kv, L, hd)
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
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF input_layernorm
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF post_attention_layernorm
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, start_pos=0):  # (B, L, D)
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


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
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
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
    ):
        """tokens (B, L) ids or (B, L, s) bags. targets (B, L, s) or (B, L) next-(bag) ids, -100 = ignore.
        Returns the scalar loss when targets are given, else logits (B, L, V) in float32-or-compute dtype.
        `cache`/`start_pos`: incremental decoding (generation), positions start_pos..start_pos+L-1."""
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
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, i, start_pos)  # (B, L, D)
        h = self.norm(h)  # (B, L, D)
        if targets is None:
            return self.lm_head(h)  # (B, L, V)
        if targets.dim() == 2:
            targets = targets.unsqueeze(-1)  # (B, L, 1): ordinary next-token targets
        # Listing 3 (multi-hot CE over the next bag), fused with the LM head: (N, V) logits never materialised.
        return tst_ops.fused_linear_multi_hot_cross_entropy(
            h.flatten(0, 1),  # (B*L, D)
            self.lm_head.weight,  # (V, D), unsharded here under FSDP
            targets.flatten(0, 1),  # (B*L, s)
            weights=loss_weights,
            slot_counts=slot_counts,
            chunk_size=fused_chunk,
        )

    # -- accounting ------------------------------------------------------------------------------------------------
    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (works on the meta device). exclude_embedding drops BOTH the input embedding and the
        LM head matrix (the design notes' N_nonembedding)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel() + self.lm_head.weight.numel()
        return n

    def flops_per_position(self, seq_len: int) -> int:
        """Training FLOPs per latent position (design notes): 6 (N_nonembedding + d V) + 6 n_layers d L, the last
        term being causal attention (half of full attention's 12 n_layers d L)."""
        c = self.cfg
        return 6 * (self.num_params(exclude_embedding=True) + c.hidden_size * c.vocab_size) + 6 * c.num_layers * (
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
}
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
    """Our state dict -> LlamaForCausalLM's (same tensors, new names)."""
    return {hf_name(k): v for k, v in sd.items()}


def from_hf_state_dict(sd: dict) -> dict:
    """LlamaForCausalLM's state dict -> ours (ignores HF's non-persistent extras such as rotary inv_freq)."""
    inv = {v: k for k, v in _TOP.items()}
    rev = {hv: ov for ov, hv in HF_NAME_MAP.items()}
    out = {}
    for k, v in sd.items():
        if k in inv:
            out[inv[k]] = v
            continue
        parts = k.split(".", 3)  # model, layers, i, rest
        if len(parts) == 4 and parts[:2] == ["model", "layers"]:
            if parts[3] in rev:
                out[f"layers.{parts[2]}.{rev[parts[3]]}"] = v
                continue
        if k.endswith("rotary_emb.inv_freq"):
            continue
        raise KeyError(f"unexpected Hugging Face parameter {k!r}")
    return out
