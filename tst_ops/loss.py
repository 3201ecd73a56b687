"""The multi-hot cross-entropy (MCE) of TST: the reference implementation over materialised logits.

Why a reference: it is the readable definition that the fused, chunked loss (``fused.py``) and the Triton
kernel are tested against, and the efficient unfused baseline of ``bench/ops.py`` (one ``log_softmax`` over the
logits and one gather, as the design notes ask).

Paper fact (tst-paper.md, "Output side" and Listing 3): latent position ``j`` predicts every token of the next
bag from ONE softmax over the vocabulary; the loss is

    loss = sum_i w_i * CE_i / sum_i w_i,    CE_i = mean over non-ignored positions of -log p(target[..., i])

with uniform weights by default, or ``w_i = 1/i`` (1-based, "power") which the paper finds better for s >= 8.
A token occurring k times in a bag therefore receives k/s of the target mass (uniform weights).

Decisions (the paper is silent; tested in tests/test_tst_ops.py):
- A slot with no valid target (possible with ``s*L + 1`` windows or document masking) drops out of both sums,
  where Listing 3's ``F.cross_entropy`` would return NaN; with no valid target at all the loss is 0 (with a
  zero gradient), never NaN.
- ``slot_counts`` (design notes, "The loss over a distributed batch"): the GLOBAL number of valid targets per
  slot. The function then returns this shard's additive contribution
  ``sum_i w_i * S_i / slot_counts[i] / sum_{i: slot_counts[i] > 0} w_i`` with ``S_i`` the sum of slot-i token
  cross-entropies on this shard, so that summing the contributions of every rank and micro-batch gives the loss
  of the whole global batch (values and gradients).
- Low-precision logits (bf16/fp16) are upcast to float32 for the softmax (float64 stays float64); the loss is
  returned in that float dtype.
"""

from __future__ import annotations

import torch


def slot_weights(weights, s: int, device=None) -> torch.Tensor:
    """The ``(s,)`` float64 slot weights: "uniform" (1), "power" (1/i, 1-based) or a tensor/sequence of s values."""
    if isinstance(weights, str):
        if weights == "uniform":
            return torch.ones(s, dtype=torch.float64, device=device)
        if weights == "power":
            return 1.0 / torch.arange(1, s + 1, dtype=torch.float64, device=device)
        raise ValueError(f"weights must be 'uniform', 'power' or a tensor of {s} weights, got {weights!r}")
    w = torch.as_tensor(weights, dtype=torch.float64, device=device).reshape(-1)
    if w.numel() != s:
        raise ValueError(f"expected {s} slot weights, got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("slot weights must be finite and >= 0")
    return w


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_coefficients(
    targets: torch.Tensor,
    weights="uniform",
    ignore_index: int = -100,
    slot_counts: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target coefficients ``a`` (N, s) with ``loss = sum_{n,i} a[n,i] * CE(n, targets[n,i])``.

    ``a[n, i] = valid[n, i] * w_i / (count_i * sum_{k: count_k > 0} w_k)`` where ``count`` is the local valid
    count or ``slot_counts``; 0 wherever the denominator vanishes. Also returns the targets with ignored slots
    replaced by 0 (safe to gather). No host synchronisation. Shared by the fused loss and the Triton path.
    """
    t = targets.reshape(-1, targets.shape[-1])  # (N, s)
    s = t.shape[-1]
    valid = t != ignore_index  # (N, s)
    w = slot_weights(weights, s, device=t.device)  # (s,) float64
    if slot_counts is None:
        counts = valid.sum(0).to(torch.float64)  # (s,)
    else:
        counts = torch.as_tensor(slot_counts, device=t.device).to(torch.float64).reshape(-1)
        if counts.numel() != s:
            raise ValueError(f"slot_counts must have {s} entries, got {counts.numel()}")
    present = counts > 0  # (s,)
    w_eff = torch.where(present, w, torch.zeros_like(w))  # (s,)
    w_sum = w_eff.sum()
    scale = torch.where(
        present & (w_sum > 0), w_eff / (counts.clamp_min(1e-300) * w_sum.clamp_min(1e-300)), torch.zeros_like(w)
    )  # (s,)
    a = valid.to(torch.float64) * scale  # (N, s)
    safe = torch.where(valid, t, torch.zeros_like(t)).to(torch.int64)  # (N, s)
    return a.to(dtype), safe


def multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights="uniform",
    ignore_index: int = -100,
    slot_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's MCE: ``sum_i w_i * CE_i / sum_i w_i`` over logits ``(..., V)`` and targets ``(..., s)``.

    ``CE_i`` is the mean cross-entropy of slot i over its non-ignored positions; slots without a valid target
    drop out. With ``slot_counts`` (global per-slot valid counts) the value is this shard's additive
    contribution (module docstring). With ``s = 1`` it equals ``F.cross_entropy``.
    """
    if logits.shape[:-1] != targets.shape[:-1]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    V = logits.shape[-1]
    s = targets.shape[-1]
    fdt = _float_dtype(logits.dtype)
    z = logits.reshape(-1, V)  # (N, V)
    t = targets.reshape(-1, s)  # (N, s)
    valid = t != ignore_index  # (N, s)
    safe = torch.where(valid, t, torch.zeros_like(t)).to(torch.int64)  # (N, s)
    logp = torch.log_softmax(z.to(fdt), dim=-1)  # (N, V): one softmax shared by all slots
    nll = -logp.gather(1, safe)  # (N, s)
    nll = torch.where(valid, nll, torch.zeros_like(nll))  # (N, s)
    per_slot = nll.sum(0)  # (s,) sum of slot-i cross-entropies
    w = slot_weights(weights, s, device=z.device).to(fdt)  # (s,)
    if slot_counts is None:
        counts = valid.sum(0).to(fdt)  # (s,) local valid counts
    else:
        counts = torch.as_tensor(slot_counts, device=z.device).to(fdt).reshape(-1)
        if counts.numel() != s:
            raise ValueError(f"slot_counts must have {s} entries, got {counts.numel()}")
    present = counts > 0  # (s,)
    ce = torch.where(present, per_slot / counts.clamp_min(1), torch.zeros_like(per_slot))  # (s,) CE_i
    w_eff = torch.where(present, w, torch.zeros_like(w))  # (s,)
    w_sum = w_eff.sum()
    return (w_eff * ce).sum() / w_sum.clamp_min(torch.finfo(fdt).tiny)
