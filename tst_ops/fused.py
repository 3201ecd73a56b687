"""Fused LM head + multi-hot cross-entropy that never holds the ``(N, V)`` logits.

Why: with the Llama-3 vocabulary (V = 128,256) the logits of one micro-batch dwarf every activation of a small
model; materialising them, their ``log_softmax`` and their gradient costs 3 * N * V floats. The fused loss keeps
one chunk of rows at a time, so memory grows with the chunk, not with N * V.

Math (the loss of ``loss.py``, tst-paper.md Listing 3). ``slot_coefficients`` turns weights, ignores and
per-slot counts into one coefficient per target, ``a[n, i] = w_i / (count_i * sum_k w_k)`` (0 when ignored), so

    loss = sum_n [ c_n * lse_n - sum_i a[n, i] * z[n, t[n, i]] ],          c_n = sum_i a[n, i]
    dloss/dz[n, :] = c_n * softmax(z[n, :]) - sum_i a[n, i] * onehot(t[n, i])

(duplicates in a bag simply add their coefficients: k/s of the mass). Per row we need the log-sum-exp, the s
target logits, and then the gradient of the logits, from which ``grad_hidden = dz @ W`` and
``grad_W = dz^T @ hidden``.

Design (why this one):
- Chunks of rows with the full vocabulary, and the gradients computed in the forward pass ("grads in forward",
  as Liger Kernel's FusedLinearCrossEntropy does): each chunk costs exactly the three matmuls that the unfused
  forward + backward cost (logits, grad_hidden, grad_W), and the chunk's logits buffer is reused in place for
  ``exp``, the softmax and the gradient, so no second pass over the logits and no recomputation. Backward
  only scales the stored ``grad_hidden`` (N, D) and ``grad_W`` (V, D) by the incoming scalar gradient; both are
  small next to N * V. When no input needs a gradient (evaluation) only the loss is computed.
- The CPU/torch path computes the row log-sum-exp in one sweep of the chunk (max, exp in place, sum): since a
  chunk holds whole rows there is nothing to merge across vocabulary chunks. The CUDA path runs, per chunk, a
  Triton kernel (``triton_kernels.py``) that streams each row in vocabulary blocks with an ONLINE log-sum-exp
  (running max and rescaled sum), then writes the gradient of the logits in place over the bf16/fp32 logits
  buffer; the matmuls stay on cuBLAS. Vocabulary-chunking the matmuls themselves would need a second matmul
  pass over the vocabulary (4 instead of 3 matmuls, +33 % FLOPs) for no memory benefit at these sizes.
- Precision: the chunk's logits come from a matmul in the inputs' dtype (as the unfused reference's do); the
  softmax and the loss are computed in float32 (float64 for float64 inputs); the gradient of the logits is cast
  back to the inputs' dtype for the two gradient matmuls (as autograd does for the reference); ``grad_W`` is
  accumulated over chunks in float32 for bf16/fp16 inputs.
- Automatic chunk size: the chunk's logits are about as large as ``hidden`` (``ceil(N * D / V)`` rows, the
  Liger rule), but at least 64 MiB of float32 logits and at least 32 rows, rounded up to a power of two and
  capped at N. The floor exists because on CPU small chunks starve the matmuls: the ``grad_W`` update
  ``dz^T @ h`` has the chunk as its inner dimension and re-reads/writes the whole (V, D) accumulator per chunk
  (at N=8192, D=1024, V=32768 the Liger rule gives 256 rows, 64 MiB gives 512). 64 MiB of logits is still
  1/16 of the reference's (N, V) logits there, and the fixed floor keeps memory independent of N once
  ``N * D / V`` rows are below it.
"""

from __future__ import annotations

import math

import torch

from .loss import slot_coefficients

_MIN_CHUNK_BYTES = 64 * 2**20


def auto_chunk_size(n_rows: int, hidden_dim: int, vocab_size: int) -> int:
    """Rows per chunk (module docstring): ~``N * D / V``, >= 64 MiB of float32 logits and >= 32 rows, pow2, <= N."""
    rows = max(math.ceil(n_rows * hidden_dim / vocab_size), _MIN_CHUNK_BYTES // (4 * vocab_size), 32)
    rows = 1 << (rows - 1).bit_length()
    return max(1, min(n_rows, rows))


def _triton_usable(t: torch.Tensor) -> bool:
    if not t.is_cuda or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _chunk_torch(z: torch.Tensor, a: torch.Tensor, t: torch.Tensor, need_grad: bool, fdt: torch.dtype):
    """Loss of a chunk and (in place, when ``need_grad``) the gradient of its logits; pure PyTorch.

    z (C, V) logits in the compute dtype; a (C, s) coefficients; t (C, s) safe targets.
    Returns (loss scalar in fdt, dz (C, V) in fdt or None).
    """
    if z.dtype != fdt:
        z = z.to(fdt)  # (C, V) float32 copy of bf16 logits
    zt = z.gather(1, t)  # (C, s) target logits
    m = z.amax(1, keepdim=True)  # (C, 1)
    z.sub_(m).exp_()  # (C, V) exp(z - m), in place
    se = z.sum(1, keepdim=True)  # (C, 1)
    lse = m + se.log()  # (C, 1)
    loss = (a * (lse - zt)).sum()
    if not need_grad:
        return loss, None
    c = a.sum(1, keepdim=True)  # (C, 1)
    z.mul_(c / se)  # (C, V) c_n * softmax
    z.scatter_add_(1, t, -a)  # (C, V) - sum_i a_i onehot(t_i)  (duplicates add up)
    return loss, z


class _FusedLinearMCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, coef, safe, chunk_size, backend):
        # hidden (N, D), weight (V, D), coef (N, s) float, safe (N, s) int64
        N, D = hidden.shape
        V = weight.shape[0]
        fdt = coef.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        low = hidden.dtype in (torch.bfloat16, torch.float16)
        loss = torch.zeros((), dtype=fdt, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, D)
        grad_w = (
            torch.zeros(V, D, dtype=torch.float32 if low else weight.dtype, device=weight.device)
            if need_w
            else None
        )  # (V, D) accumulator
        if backend == "triton":
            from . import triton_kernels
        for start in range(0, N, chunk_size):
            end = min(N, start + chunk_size)
            h = hidden[start:end]  # (C, D)
            z = h @ weight.t()  # (C, V) compute dtype
            a = coef[start:end]  # (C, s)
            t = safe[start:end]  # (C, s)
            if backend == "triton":
                rows = triton_kernels.mce_rows_inplace(z, t, a, need_grad)  # (C,) fp32; z <- dz
                loss += rows.sum().to(fdt)
                dz = z if need_grad else None
            else:
                chunk_loss, dz = _chunk_torch(z, a, t, need_grad, fdt)
                loss += chunk_loss
            if not need_grad:
                continue
            dz = dz.to(hidden.dtype)  # (C, V) gradient of the logits, compute dtype
            if need_h:
                torch.mm(dz, weight, out=grad_h[start:end])  # (C, D)
            if need_w:
                if low:
                    grad_w += (dz.t() @ h).to(torch.float32)  # (V, D) float32 accumulation
                else:
                    grad_w.addmm_(dz.t(), h)  # (V, D)
            del dz, z
        if need_w and low:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def fused_linear_multi_hot_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    weights="uniform",
    ignore_index: int = -100,
    slot_counts: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``multi_hot_cross_entropy(hidden @ lm_head_weight.T, targets, ...)`` without the ``(N, V)`` logits.

    hidden ``(..., D)``, lm_head_weight ``(V, D)``, targets ``(..., s)`` (s = 1 for the recovery phase).
    Same value and gradients (for ``hidden`` and ``lm_head_weight``) as the reference; ``slot_counts`` as there.
    ``chunk_size``: rows per chunk (default :func:`auto_chunk_size`). ``backend``: "torch", "triton" (the
    Triton kernel; on CPU tensors only under ``TRITON_INTERPRET=1``), or None = Triton on CUDA when available.
    Returns a float32 scalar (float64 for float64 inputs).
    """
    if hidden.shape[:-1] != targets.shape[:-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} does not match hidden {tuple(hidden.shape)}")
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != lm_head_weight dtype {lm_head_weight.dtype}")
    D = hidden.shape[-1]
    V = lm_head_weight.shape[0]
    h = hidden.reshape(-1, D)  # (N, D)
    fdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    coef, safe = slot_coefficients(targets, weights, ignore_index, slot_counts, dtype=fdt)  # (N, s) x2
    N = h.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(N, D, V)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if backend is None:
        backend = "triton" if _triton_usable(h) else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch', 'triton' or None, got {backend!r}")
    if backend == "triton" and fdt == torch.float64:
        raise ValueError("the Triton backend computes in float32; use backend='torch' for float64")
    if N == 0:
        return (h.sum() * 0.0 + lm_head_weight.sum() * 0.0).to(fdt)
    return _FusedLinearMCE.apply(h, lm_head_weight, coef, safe.contiguous(), chunk_size, backend)
