"""The Mixture-of-Experts feed-forward block: Hugging Face `Qwen3MoeSparseMoeBlock`, parameter for parameter.

Why a sibling of model.py: routing, grouped dispatch and the load-balancing loss are a screen of concepts of
their own; model.py only chooses, per layer, this block or the dense SwiGLU, like Qwen3-MoE's decoder layer.

What it computes (transformers/models/qwen3_moe/modeling_qwen3_moe.py, checked with transformers 5.24):
- a linear router (no bias) gives logits (N, E); the softmax is taken in float32; the top-k probabilities are
  renormalised to sum to 1 (Qwen3's `norm_topk_prob = True`) and cast back to the compute dtype;
- each chosen expert is a SwiGLU `down(silu(gate x) * up x)`; the token's output is the weighted sum over its k
  experts; no shared expert;
- dropless: every token reaches all k of its experts, however unbalanced the routing (no capacity factor).

How it computes it: grouped by expert. The N*k (token, expert) assignments are sorted by expert, and
`torch._grouped_mm` runs every expert's contiguous group in one call per projection where it exists and takes the
shapes: on CPU (torch >= 2.9 has a CPU implementation; rows must be 16-byte aligned: D and I multiples of 4 in
float32, 8 in bf16) and on CUDA in bf16 on compute capability >= 9.0 with D and I multiples of 16 (the CUDA path
is untested here: no GPU was available). Otherwise a Python loop does one matmul per expert group. Either way
every expert runs, even on zero rows, so every expert weight gets a (zero) gradient on every rank: FSDP2's
reduce-scatter needs the same parameters on all ranks. `naive_moe` in tests/test_moe.py is the per-token
reference both paths are tested against.

Parameters (per MoE layer), with their Hugging Face names:
  router.weight (E, D)  -> mlp.gate.weight                     (transformers 5 in memory: the same)
  w13 (E, 2I, D)        -> mlp.experts.{j}.gate_proj.weight     = w13[j, :I]   (experts.gate_up_proj)
                           mlp.experts.{j}.up_proj.weight       = w13[j, I:]
  w2 (E, D, I)          -> mlp.experts.{j}.down_proj.weight     = w2[j]        (experts.down_proj)
The 3-D tensors are transformers 5's `Qwen3MoeExperts` parameters exactly (gate and up fused, gate first), so
one grouped matmul computes both; FSDP2 shards them along the expert dimension (dim 0). The per-expert names are
the on-disk layout of the published Qwen3-MoE checkpoints (what `tst export` writes).

The load-balancing loss (Switch Transformer, eq. 4-6, with top-k) is a GLOBAL-batch quantity, like the LM loss:
  aux = E / k * sum_e f_e P_e,   f_e = C_e / N (fraction of the N tokens that chose expert e; sums to k),
                                 P_e = S_e / N (mean router probability of e over the N tokens; sums to 1),
averaged over the MoE layers. Normalised so that perfectly uniform routing gives exactly 1 whatever E and k
(Hugging Face's `load_balancing_loss_func` gives k times this, and pools the layers before the product).
C (counts, no gradient) and S (probability sums, differentiable) are sums over tokens: `moe_losses` takes the
counts C all-reduced over ranks and the global N from the caller, and returns this shard's additive share
E/k * sum_e (C_e/N)(S_e^local/N), so the shares of all ranks add up to the aux loss of the global batch. The
optional router z-loss (ST-MoE) is mean_tokens logsumexp(logits)^2, additive the same way.

Gradient accumulation (more than one micro-batch per rank): the shares add up to the global batch's aux loss only
if every micro-batch's share uses the counts C of the WHOLE step, over all ranks and all micro-batches, and those
are not known when the first micro-batch's backward runs. C carries no gradient but depends on the weights through
every layer below, so there is no cheap way around a forward: the loop (train_step) runs a no-grad routing
pre-pass over the rank's micro-batches (embedding and layers only, no LM head or loss), all-reduces its counts and
passes them to every micro-batch's forward (`router_counts`). Then the aux loss and its gradient equal those of
one forward over the global batch, whatever the worker count and micro-batch size (tests/test_moe.py). The cost
is one forward of the layers per step (up to ~1/3 more compute), so it is a config key, `train.moe_aux_prepass`,
default on: the issue's contract is a worker-count-independent loss (an elastic run changes the micro-batches
per rank when it resizes), and the pre-pass costs nothing where it is not needed, since with one micro-batch per
rank (the default, and recipes/10b-a1b.yaml, which avoids accumulation for FSDP2's sake anyway) the step's counts
are the all-reduce of the one forward's. Off: each micro-step (the m-th micro-batch of every rank) uses its own
fractions (as Hugging Face's `load_balancing_loss_func`, which sees one forward's tokens), and the aux loss is
the token-weighted mean of the micro-steps'.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def route(x: torch.Tensor, router_weight: torch.Tensor, k: int):
    """x (N, D) -> (logits (N, E) in x.dtype, probs (N, E) float32, top-k weights (N, k) in x.dtype renormalised
    to sum to 1, top-k expert ids (N, k) int64). As Qwen3MoeTopKRouter with norm_topk_prob=True."""
    logits = F.linear(x, router_weight)  # (N, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
    top_w, top_i = torch.topk(probs, k, dim=-1)  # (N, k)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return logits, probs, top_w.to(x.dtype), top_i


def use_grouped_mm(x: torch.Tensor, w13: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes this case (see the module docstring); else the per-expert loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    E, I2, D = w13.shape
    I = I2 // 2
    if x.is_cuda:
        return (x.dtype == torch.bfloat16 and D % 16 == 0 and I % 16 == 0
                and torch.cuda.get_device_capability(x.device) >= (9, 0))
    return x.device.type == "cpu" and (D * x.element_size()) % 16 == 0 and (I * x.element_size()) % 16 == 0


def expert_forward(x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, grouped_mm: bool | None = None) -> torch.Tensor:
    """Dropless grouped dispatch. x (N, D), top_w / top_i (N, k), w13 (E, 2I, D), w2 (E, D, I) -> (N, D).

    Sort the N*k assignments by expert, run each expert on its contiguous group, scale by the routing weight,
    and add the rows back to their tokens (index_add). grouped_mm: None = `use_grouped_mm`; False = the loop."""
    N, k = top_i.shape
    E = w13.shape[0]
    flat = top_i.reshape(-1)  # (N*k,) expert of each assignment, token-major
    order = torch.argsort(flat, stable=True)  # (N*k,) assignments sorted by expert
    token = order // k  # (N*k,) token of each sorted assignment
    counts = torch.bincount(flat, minlength=E)  # (E,)
    xs = x[token]  # (N*k, D) grouped by expert
    if grouped_mm if grouped_mm is not None else use_grouped_mm(x, w13):
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each group
        gate, up = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)  # (N*k, I) each
        ys = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)  # (N*k, D)
    else:
        outs = []
        for e, xe in enumerate(xs.split(counts.tolist())):  # one matmul per expert group (empty ones too)
            gate, up = (xe @ w13[e].t()).chunk(2, dim=-1)  # (n_e, I) each
            outs.append((F.silu(gate) * up) @ w2[e].t())  # (n_e, D)
        ys = torch.cat(outs)  # (N*k, D)
    ys = ys * top_w.reshape(-1)[order, None]  # (N*k, D) weighted by the renormalised router probability
    return torch.zeros_like(x).index_add(0, token, ys.to(x.dtype))  # (N, D)


class MoEFeedForward(nn.Module):
    """Qwen3MoeSparseMoeBlock: router + E SwiGLU experts, top-k token choice, dropless.

    forward returns (y (B, L, D), stats) where stats = (counts (E,) float32 assignments per expert, no gradient;
    prob_sum (E,) float32 router probabilities summed over tokens, differentiable; z_sum () float32 sum over
    tokens of logsumexp(logits)^2). Statistics are sums, so the caller can add them over ranks and micro-batches."""

    def __init__(self, cfg):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.k = E, cfg.experts_per_token
        self.router = nn.Linear(D, E, bias=False)  # HF mlp.gate
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D))  # gate_proj then up_proj of every expert (gate_up_proj)
        self.w2 = nn.Parameter(torch.empty(E, D, I))  # down_proj

    @torch.no_grad()
    def init_weights(self, std: float):
        E, I2, D = self.w13.shape  # gate then up, drawn as two separate (E, I, D) tensors, then down
        gate, up = (torch.empty(E, I2 // 2, D, device=self.w13.device, dtype=self.w13.dtype).normal_(0.0, std)
                    for _ in range(2))
        self.w13.copy_(torch.cat([gate, up], dim=1))
        nn.init.normal_(self.w2, mean=0.0, std=std)

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        xf = x.reshape(B * L, D)  # (N, D)
        logits, probs, top_w, top_i = route(xf, self.router.weight, self.k)  # (N, E), (N, E), (N, k), (N, k)
        y = expert_forward(xf, top_w, top_i, self.w13, self.w2)  # (N, D)
        counts = torch.bincount(top_i.reshape(-1), minlength=self.num_experts).float()  # (E,)
        prob_sum = probs.sum(0)  # (E,)
        z_sum = torch.logsumexp(logits.float(), dim=-1).pow(2).sum()  # ()
        return y.view(B, L, D), (counts, prob_sum, z_sum)


def moe_losses(stats: list, num_experts: int, k: int, counts=None, num_tokens=None):
    """This shard's additive shares of the load-balancing loss and the router z-loss, averaged over MoE layers.

    stats: per MoE layer (counts (E,), prob_sum (E,), z_sum ()), from this forward.
    counts: (n_moe, E) assignment counts to use for the fractions f (all-reduced over ranks by the caller);
        None: this forward's own. num_tokens: the global token count N of the whole batch that the shares add up
        to (the caller's); None: this forward's (counts.sum / k of the first layer).
    Returns (aux (), z ()), both float32 and differentiable through the router probabilities / logits."""
    local = torch.stack([c for c, _, _ in stats])  # (n_moe, E)
    C = local if counts is None else counts.to(local)
    n_tokens_mb = C[0].sum() / k  # tokens behind the fractions f
    N = n_tokens_mb if num_tokens is None else torch.as_tensor(num_tokens, dtype=torch.float32, device=local.device)
    S = torch.stack([p for _, p, _ in stats])  # (n_moe, E)
    f = C / n_tokens_mb  # (n_moe, E), sums to k per layer
    aux = (num_experts / k) * (f * S / N).sum(-1).mean()
    z = torch.stack([z for _, _, z in stats]).mean() / N
    return aux, z
