"""Checking the fused loss and the bag embedding against independent references, with stated tolerances.

What a new machine (a GPU, a Triton version, a PyTorch release) must pass before its figures mean anything; run by
``bench/gpu_check.py``'s correctness section on CUDA and, with the tiny shapes (the defaults here), on CPU:

- ``check_fused_loss``: :func:`tst_ops.fused_linear_multi_hot_cross_entropy` (each backend: the Triton kernel on
  CUDA or under ``TRITON_INTERPRET=1``, and the chunked torch path) against a float64 reference
  (:func:`tst_ops.multi_hot_cross_entropy` on float64 logits, autograd gradients): the loss and both gradients,
  for each bag size and dtype, on fresh random inputs (the seed is recorded) with a vocabulary that is a multiple
  of no block, several chunks with a partial last one, some ignored targets and duplicated tokens inside bags.
  The unfused reference's own error in the same dtype is recorded beside the fused one, for scale.
- ``check_bag_embedding``: :func:`tst_ops.bag_embedding` in bf16 against float32 on the same weights.

The functions are looked up on the ``tst_ops`` module at call time, so a test can replace one with a broken
version and see the check fail. Imports nothing but torch, the standard library and ``tst_ops``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

import tst_ops

# Tolerances. Errors: loss |a - b| / |ref|; gradients max|a - b| / max|ref| (per tensor), against the float64
# reference on the same (bf16- or fp32-valued) inputs.
# fp32: the fused path differs from float64 by float32 rounding of the logits matmul and softmax only.
# bf16: the logits come from a bf16 matmul and the logit gradient is rounded to bf16 before the two gradient
# matmuls, exactly as autograd does for the unfused bf16 reference; the max-normalised gradient error is then a few
# bf16 ulps (2^-8 = 3.9e-3) and grows with s and V. So a bf16 gradient passes when its error is within
# `grad` OR within `grad_vs_unfused` times the unfused bf16 reference's own error on the same inputs (and always
# below `grad_cap`): "no worse than computing it unfused in bf16".
TOL = {
    "float32": {"loss": 1e-5, "grad": 1e-4},
    "bfloat16": {"loss": 1e-2, "grad": 3e-2, "grad_vs_unfused": 2.0, "grad_cap": 0.1},
    "bag_embedding_bf16": 2.0 ** -8,  # relative, elementwise: one bf16 rounding of the float32 mean
}


def grad_ok(err: float, unfused_err: float, tol: dict) -> bool:
    if err <= tol["grad"]:
        return True
    return "grad_vs_unfused" in tol and err <= min(tol["grad_cap"], tol["grad_vs_unfused"] * unfused_err)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def triton_status(device: torch.device) -> dict:
    """Whether the fused loss's Triton backend can run on `device`, and why not."""
    import importlib.util

    st: dict[str, Any] = {"available": False}
    try:
        import triton

        st["triton_version"] = getattr(triton, "__version__", "?")
    except ImportError as e:
        st["reason"] = f"triton not importable ({e})"
        return st
    if importlib.util.find_spec("tst_ops.triton_kernels") is None:
        st["reason"] = "tst_ops/triton_kernels.py is missing (the fused loss would fail on CUDA)"
        return st
    if device.type != "cuda":
        st["reason"] = f"unavailable on {device.type}"
        return st
    st["available"] = True
    return st


def random_case(rows: int, dim: int, vocab: int, s: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Hidden states, a head with logits ~ N(0, 2^2) (a realistic spread), and (rows, s) targets with ~5 % ignored
    slots and, for s > 1, a duplicated token in the first eighth of the bags."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * (2.0 / math.sqrt(dim))
    targets = torch.randint(0, vocab, (rows, s), generator=g)
    targets[torch.rand(rows, s, generator=g) < 0.05] = -100
    if s > 1:
        targets[: rows // 8, 1] = targets[: rows // 8, 0]
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def loss_and_grads(fn, hidden: torch.Tensor, weight: torch.Tensor):
    """fn(h, w)'s value and its gradients for h and w (fresh leaves)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _errors(got, ref) -> dict:
    return {"loss": abs(float(got[0]) - float(ref[0])) / abs(float(ref[0])),
            "grad_hidden": rel_err(got[1], ref[1]), "grad_weight": rel_err(got[2], ref[2])}


def check_fused_loss(device: torch.device, backends: list[str], *, rows: int = 100, dim: int = 32,
                     vocab: int = 1003, chunk: int = 40, s_values=(1, 6, 16),
                     dtypes=("bfloat16", "float32")) -> list[dict]:
    """One case per (dtype, s, backend): its errors against float64, the tolerances and whether it passed (a
    backend that raises is a failed case, with the error)."""
    cases = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        for s in s_values:
            seed = int(time.time_ns() % 2**31)  # fresh random inputs every run; the seed is recorded
            hidden, weight, targets = random_case(rows, dim, vocab, s, dtype, device, seed)
            ref = loss_and_grads(lambda h, w: tst_ops.multi_hot_cross_entropy(h @ w.t(), targets),
                                 hidden.double(), weight.double())
            unfused = loss_and_grads(lambda h, w: tst_ops.multi_hot_cross_entropy(h @ w.t(), targets), hidden, weight)
            unfused_err = _errors(unfused, ref)
            for backend in backends:
                case = {"dtype": dname, "s": s, "backend": backend, "rows": rows, "dim": dim, "vocab": vocab,
                        "chunk": chunk, "seed": seed, "unfused_same_dtype_err": unfused_err}
                try:
                    got = loss_and_grads(lambda h, w: tst_ops.fused_linear_multi_hot_cross_entropy(
                        h, w, targets, chunk_size=chunk, backend=backend), hidden, weight)
                    err, tol = _errors(got, ref), TOL[dname]
                    case.update(err=err, tol=tol, passed=bool(
                        err["loss"] <= tol["loss"]
                        and grad_ok(err["grad_hidden"], unfused_err["grad_hidden"], tol)
                        and grad_ok(err["grad_weight"], unfused_err["grad_weight"], tol)))
                except Exception as e:  # noqa: BLE001 - a failing backend is a failed check, not a crash
                    case.update(passed=False, error=f"{type(e).__name__}: {e}")
                cases.append(case)
    return cases


def check_bag_embedding(device: torch.device, *, shape=(2, 16), vocab: int = 1003, dim: int = 64,
                        s_values=(1, 6, 16)) -> list[dict]:
    """bf16 bag embedding (float32 accumulation, cast back) against float32 on the same bf16-valued weights; at
    s = 1 it must equal the plain embedding lookup exactly."""
    out = []
    for s in s_values:
        g = torch.Generator(device="cpu").manual_seed(1000 + s)
        w = (torch.randn(vocab, dim, generator=g) * 0.02).to(device, torch.bfloat16)
        bags = torch.randint(0, vocab, (*shape, s), generator=g).to(device)
        ref = tst_ops.bag_embedding(bags, w.float())
        got = tst_ops.bag_embedding(bags, w)
        rel = ((got.float() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
        bitwise = bool(torch.equal(got, ref.to(torch.bfloat16)))
        passed = got.dtype == torch.bfloat16 and (bitwise or rel <= TOL["bag_embedding_bf16"])
        if s == 1:
            passed &= bool(torch.equal(got, torch.nn.functional.embedding(bags[..., 0], w)))
        out.append({"s": s, "max_rel_err": rel, "equals_rounded_fp32": bitwise, "tol": TOL["bag_embedding_bf16"],
                    "passed": bool(passed)})
    return out


def check_correctness(device: torch.device, *, rows: int = 100, dim: int = 32, vocab: int = 1003, chunk: int = 40,
                      s_values=(1, 6, 16), dtypes=("bfloat16", "float32"), emb_shape=(2, 16), emb_vocab: int = 1003,
                      emb_dim: int = 64) -> dict:
    """Both checks on `device` (TF32 off: fp32 means fp32). Backends: on CUDA the Triton kernel (the default
    there) and the chunked torch path; on CPU the torch path, plus the Triton kernel under its interpreter when
    TRITON_INTERPRET=1 is set and triton is installed. The defaults are the CPU smoke shapes."""
    tri = triton_status(device)
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and "triton_version" in tri
    backends = (["triton"] if device.type == "cuda" or interpreted else []) + ["torch"]
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cases = check_fused_loss(device, backends, rows=rows, dim=dim, vocab=vocab, chunk=chunk, s_values=s_values,
                                 dtypes=dtypes)
        emb = check_bag_embedding(device, shape=emb_shape, vocab=emb_vocab, dim=emb_dim, s_values=s_values)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    ok = all(c["passed"] for c in cases) and all(e["passed"] for e in emb)
    return {"passed": bool(ok), "triton": tri, "backends": backends, "triton_interpreted": interpreted,
            "fused_loss": cases, "bag_embedding": emb,
            "note": None if tri["available"] else f"triton: {tri.get('reason')}; the chunked torch path was checked"}
