"""Triton kernel for the per-chunk step of the fused multi-hot cross-entropy (CUDA; CPU only when interpreted).

Why this split: the fused loss (``fused.py``) spends its FLOPs in three matmuls per chunk of rows, which cuBLAS
already runs near peak; what an unfused PyTorch chunk wastes is memory traffic over the ``(C, V)`` logits (an
fp32 upcast copy, then separate passes for max, exp, sum, scale and scatter). This kernel replaces those with one
program per row that
  1. loads the row's s target logits (before anything is overwritten) and their coefficients ``a[n, i]``;
  2. streams the row in vocabulary blocks keeping an ONLINE log-sum-exp (running max ``m`` and running sum
     ``d`` rescaled by ``exp(m_old - m_new)``), in float32 registers whatever the storage dtype;
  3. writes the row loss ``c_n * lse - sum_i a[n, i] * z[n, t_i]`` (``c_n = sum_i a[n, i]``), and, when a
     gradient is needed, streams the row again writing ``dz = c_n * exp(z - lse) - sum_i a[n, i] [col == t_i]``
     IN PLACE over the logits buffer (bf16 or fp32), ready for the two gradient matmuls.
The one-hot part is a (BLOCK_V, S_PAD) compare in registers, so duplicated targets in a bag add their
coefficients exactly and deterministically (no atomics). This is the design of Liger Kernel's
FusedLinearCrossEntropy (chunked cuBLAS matmuls + an in-place softmax-gradient kernel), generalised to s targets.

This module imports ``triton`` at import time; ``fused.py`` imports it lazily, only for CUDA tensors (or when
``backend="triton"`` is asked for explicitly, e.g. under ``TRITON_INTERPRET=1`` on CPU in the tests).
Status: checked against the PyTorch path under the Triton interpreter on CPU; launch parameters (block size,
warps) are untuned until a GPU run (bench/gpu_check.py) measures them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mce_rows_kernel(
    z_ptr,  # (C, V) logits, overwritten with dz when NEED_GRAD
    z_stride,
    t_ptr,  # (C, S) int64 safe targets
    a_ptr,  # (C, S) float32 coefficients
    loss_ptr,  # (C,) float32 row losses
    V,
    S: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    k = tl.arange(0, S_PAD)
    kmask = k < S
    t = tl.load(t_ptr + row * S + k, mask=kmask, other=-1)  # (S_PAD,) int64, -1 = padding
    a = tl.load(a_ptr + row * S + k, mask=kmask, other=0.0).to(tl.float32)  # (S_PAD,)
    zt = tl.load(z_row + t, mask=kmask, other=0.0).to(tl.float32)  # (S_PAD,) target logits
    c = tl.sum(a, axis=0)  # scalar c_n
    zt_sum = tl.sum(a * zt, axis=0)  # scalar sum_i a_i z_{t_i}

    # pass 1: online log-sum-exp over vocabulary blocks
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    tl.store(loss_ptr + row, c * lse - zt_sum)

    # pass 2: gradient of the logits, in place
    if NEED_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            cmask = cols < V
            x = tl.load(z_row + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_V,)
            g = c * tl.exp(x - lse)  # (BLOCK_V,)
            hit = cols[:, None] == t[None, :]  # (BLOCK_V, S_PAD)
            g = g - tl.sum(tl.where(hit, a[None, :], 0.0), axis=1)  # (BLOCK_V,)
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=cmask)


def mce_rows_inplace(
    z: torch.Tensor, t: torch.Tensor, a: torch.Tensor, need_grad: bool, block_v: int | None = None
) -> torch.Tensor:
    """Row losses (C,) float32 of a logits chunk ``z`` (C, V); with ``need_grad`` z is overwritten by dz.

    ``t`` (C, s) safe int64 targets (ignored slots point anywhere valid with coefficient 0), ``a`` (C, s)
    coefficients from ``loss.slot_coefficients``. ``block_v``: vocabulary columns per block, a power of two
    (default ``min(8192, next_power_of_2(V))``); the tests pass small blocks so that a small vocabulary spans
    several blocks and the online log-sum-exp rescale runs.
    """
    if z.stride(1) != 1:
        raise ValueError("logits chunk must be contiguous along the vocabulary")
    C, V = z.shape
    S = t.shape[1]
    t = t.contiguous()
    a = a.to(torch.float32).contiguous()
    loss = torch.empty(C, dtype=torch.float32, device=z.device)
    if block_v is None:
        block_v = min(8192, triton.next_power_of_2(V))
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    _mce_rows_kernel[(C,)](
        z,
        z.stride(0),
        t,
        a,
        loss,
        V,
        S=S,
        S_PAD=triton.next_power_of_2(S),
        BLOCK_V=block_v,
        NEED_GRAD=need_grad,
        num_warps=8 if block_v >= 4096 else 4,
    )
    return loss
