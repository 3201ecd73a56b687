#!/usr/bin/env python
"""The GPU path, checked and measured: one script that proves and times everything that needs a GPU.

Run on one NVIDIA GPU with nothing but Python 3.11+, PyTorch (>= 2.11) and Triton (no Ray, MLflow, yaml,
tokenizers, numpy or network needed at run time); it finishes in under 5 minutes on one H200 (``--max-minutes``,
default 4.5, skips whatever would run late and records it as skipped). It uses the project's own code paths:
``tst_ops`` (fused linear + multi-hot CE, bag embedding), ``pipeline.model.transformer`` presets, and the Ray-free training
loop ``pipeline.train.loop.Trainer`` with FSDP2 (one rank), bf16 mixed precision and ``torch.compile`` from
``pipeline.train.parallel``; figures come from the loop's own metrics (``pipeline.train.metrics``) and the comparison from
``pipeline.compare``.

    # once, on a CPU machine with the project installed: the corpus tokenized into a token store (about 15 MB for
    # the 24 MB build_corpus folder with GPT-2 ids; carry the printed store folder, under 64 MiB, to the GPU machine)
    python -c "from pipeline.data.corpus import build_corpus; build_corpus('outputs/gpu_check/corpus', target_mb=90)"
    tst data prepare --no-ray data.source=outputs/gpu_check/corpus data.tokenizer=gpt2 data.store=outputs/gpu_check/stores
    # on the GPU machine (bench/gpu_check.sh is the same command):
    python bench/gpu_check.py --data outputs/gpu_check/stores/<id> --out outputs/gpu_check/h200
    # CPU smoke (what tests/test_gpu_check.py runs): every section, tiny shapes, a few steps
    python bench/gpu_check.py --tiny --data STORE --out DIR

Sections (``--only a,b`` / ``--skip a,b``), in order; each records its wall-clock seconds:
  env          device, versions, whether the Triton kernel is importable.
  correctness  fused linear + multi-hot CE (Triton on CUDA, and the chunked torch path) against a float64
               reference (``multi_hot_cross_entropy`` on float64 logits, autograd gradients): loss and both
               gradients, s in {1, 6, 16}, bf16 and fp32, fresh random inputs, a vocabulary that is a multiple of
               no block (50,257), several chunks with a partial last one, some ignored targets. ``bag_embedding``
               in bf16 against float32. Tolerances are in ``TOL`` below; the unfused bf16 reference's own error is
               recorded beside the fused one for scale.
  matmul       an 8192^3 bf16 matmul (CUDA events, median): the "measured peak" that MFU is also reported against.
  kernels      N = 16384 positions, D = 2048, V = 131072, s in {1, 6, 16}, bf16: fused vs the efficient unfused
               reference (materialised logits, one log_softmax, a gather): forward + backward time (median of 5
               after 2 warm-ups, CUDA events) and peak memory (``torch.cuda.max_memory_allocated`` over the
               inputs). Per-configuration function: ``measure_loss_config``.
  train        the "125M" preset (then "270M" if time allows) in bf16, FSDP2 on one rank, eager and
               ``torch.compile``: steps/s, latent positions/s, raw tokens/s per phase (superposition should read
               s times the raw tokens of recovery per second), TFLOP/s with the design notes' FLOP count and MFU
               against the datasheet dense bf16 peak (H200: 989 TFLOP/s) and, labelled ``mfu_vs_measured_matmul``,
               against the matmul section. Warm-up / compile intervals are excluded (see ``_steady``).
  compare      an equal-FLOPs run pair on the real text of the token store, baseline (r = 0) vs TST (s = 6, r = 0.3), same
               T, batch, L, seed and WSD schedule: validation curves, final validation next-token losses, the
               equal-step difference and the iso-loss figures (``pipeline.compare.compute_comparison``).
  kernels_compiled  the kernels' reference under ``torch.compile`` (one compile per s), last because it is the
               first thing to drop when time runs short.

Priorities under the budget: correctness, matmul, kernels, the 125M training configurations, compare; then, only
with time left (compare's reserve kept free), the 270M configurations and the compiled kernel reference.
Outputs: ``<out>/gpu_check.json`` (every figure, the settings, skipped/failed sections with reasons) and a short
table printed last. Exit status 0 when every check that ran passed and no section errored, else 1.

The tiny mode (``--tiny``) runs every section on the CPU with small shapes and a few steps (float32; the Triton
kernel is recorded as unavailable and the chunked torch path is checked instead; ``torch.compile`` is skipped
unless ``--tiny-compile``, since CPU inductor compiles take minutes on small machines).

Budget (H200, estimated from FLOPs, to be replaced by the measured figures of the first run): the 125M preset
with the GPT-2 vocabulary (152.7M parameters, 7.1e8 FLOPs per latent position at L = 512) runs 8192 positions per
step in ~15 ms at 40 % MFU, so the 600-step comparison pair costs ~20-40 s plus compilation; training throughput
~30 s per configuration; kernels ~20 s (+ ~30 s for the compiled reference); correctness ~20 s (Triton JIT).

Checkpoints are not written in this script (``_CheckTrainer.save`` reports the metrics only): the loop's DCP
checkpointing is disk I/O, tested on CPU, and would pollute the throughput intervals.

The data (``--data``): a token store written by ``tst data prepare`` (the same shards + index every training run
reads), opened with ``pipeline.data.reader`` -- PyTorch and the standard library only; the store's index gives the
vocabulary, EOS id and sizes, and every shard is checked against its sha256 at its first read.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SECTIONS = ("env", "correctness", "matmul", "kernels", "train", "compare", "kernels_compiled")

# Tolerances of the correctness checks. Errors: loss |a - b| / |ref|; gradients max|a - b| / max|ref| (per tensor),
# against the float64 reference on the same (bf16- or fp32-valued) inputs.
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

# Shapes and lengths of each mode. "gpu" is what the H200 run uses; "tiny" is the CPU smoke test.
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": dict(
        max_minutes=4.5,
        corr_rows=1000, corr_dim=256, corr_vocab=50257, corr_chunk=384, corr_s=(1, 6, 16),
        corr_dtypes=("bfloat16", "float32"), emb_shape=(8, 512), emb_vocab=50257, emb_dim=1024,
        mm_n=8192, mm_reps=10,
        kern_n=16384, kern_d=2048, kern_v=131072, kern_s=(1, 6, 16), kern_reps=5, kern_warmup=2,
        # train: T = 2 * tp_steps_per_phase, r = 0.5, s = 6; intervals of tp_log_every steps
        tp_presets=("125M", "270M"), tp_optional=("270M",), tp_seq=1024, tp_batch=32, tp_steps_per_phase=25,
        tp_log_every=5, tp_bag=6, tp_compile=(False, True), tp_lr=3e-4,
        # compare: T steps of cmp_batch x cmp_seq latent positions; TST reads (r*s + 1 - r) x the baseline's tokens
        cmp_preset="125M", cmp_seq=512, cmp_batch=8, cmp_steps=600, cmp_eval_every=25, cmp_warmup=60,
        cmp_lr=1e-3, cmp_val_windows=120, cmp_bag=6, cmp_r=0.3,  # val windows: a multiple of the batch
        # seconds kept free for the compare section while the optional train configurations run
        compare_reserve_s=75.0,
        est_s={"correctness": 20, "matmul": 3, "kernels": 25, "kernels_compiled": 45, "train_eager": 20,
               "train_compiled": 60, "train_optional": 60, "compare": 60},
    ),
    "tiny": dict(
        max_minutes=3.0, threads=1,
        corr_rows=100, corr_dim=32, corr_vocab=1003, corr_chunk=40, corr_s=(1, 6, 16),
        corr_dtypes=("bfloat16", "float32"), emb_shape=(2, 16), emb_vocab=1003, emb_dim=64,
        mm_n=256, mm_reps=3,
        kern_n=256, kern_d=64, kern_v=1003, kern_s=(1, 6, 16), kern_reps=3, kern_warmup=1,
        tp_presets=("tiny",), tp_optional=(), tp_seq=32, tp_batch=4, tp_steps_per_phase=6,
        tp_log_every=2, tp_bag=6, tp_compile=(False, True), tp_lr=3e-4,
        cmp_preset="tiny", cmp_seq=32, cmp_batch=4, cmp_steps=20, cmp_eval_every=5, cmp_warmup=2,
        cmp_lr=3e-3, cmp_val_windows=8, cmp_bag=6, cmp_r=0.3,
        compare_reserve_s=0.0,
        est_s={"correctness": 1, "matmul": 1, "kernels": 1, "kernels_compiled": 60, "train_eager": 3,
               "train_compiled": 60, "train_optional": 5, "compare": 5},
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the whole script; sections ask before they start."""

    def __init__(self, max_s: float):
        self.t0 = time.perf_counter()
        self.max_s = max_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.max_s - self.elapsed()

    def allows(self, est_s: float, reserve_s: float = 0.0) -> bool:
        return self.left() - reserve_s >= est_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> list[float]:
    """Milliseconds of each of `reps` calls after `warmup` calls: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            out.append(float(a.elapsed_time(b)))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[dict]:
    """Peak allocated bytes of one call, and the part above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    _free(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": int(peak), "above_inputs_bytes": int(peak - base)}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _triton_status(device: torch.device) -> dict:
    """Whether the fused loss's Triton backend can run here, and why not."""
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


# ---------------------------------------------------------------------------------------------------------------
# The data: a token store (pipeline.data), read with torch only
# ---------------------------------------------------------------------------------------------------------------
def load_store(path: str) -> dict:
    """Open a token store (`tst data prepare`) with torch and the standard library only (pipeline.data.reader):
    {"uri", "header"} where the header is what the report records of the data."""
    from pipeline.data.reader import TokenStore

    st = TokenStore(path)
    if not st.complete:
        raise SystemExit(f"{path} is a token store still being written; finish `tst data prepare` first")
    idx = st.index
    return {"uri": path, "header": {
        "format": idx["format"], "version": idx["version"], "store": os.path.basename(os.path.normpath(path)),
        "dtype": idx["dtype"], "vocab_size": int(idx["tokenizer"]["vocab_size"]), "eos_id": int(idx["tokenizer"]["eos_id"]),
        "tokenizer_sha256": idx["tokenizer"]["sha256"], "source": idx["source"]["spec"],
        "train_tokens": st.tokens("train"), "val_tokens": st.tokens("val"), "train_documents": st.documents("train"),
        "val_documents": st.documents("val")}}


def make_source(data: dict, *, total_steps: int, switch_fraction: float, bag_size: int, seq_len: int,
                global_batch_size: int, val_windows: int):
    """The project's own window source over the store: the reader every rank of a training run uses."""
    from pipeline.data.plan import StreamPlan
    from pipeline.data.batch import StoreSource

    plan = StreamPlan(total_steps=total_steps, switch_fraction=switch_fraction, bag_size=bag_size,
                      seq_len=seq_len, global_batch_size=global_batch_size, val_windows=val_windows)
    return StoreSource(data["uri"], plan)


# ---------------------------------------------------------------------------------------------------------------
# Section: env
# ---------------------------------------------------------------------------------------------------------------
def section_env(ctx: dict) -> dict:
    dev = ctx["device"]
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(dev),
        "mode": ctx["mode"],
        "triton": _triton_status(dev),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu_name=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count())
        from pipeline.train.metrics import peak_flops_for

        out["datasheet_bf16_peak_tflops"] = (peak_flops_for(p.name) or float("nan")) / 1e12
    try:
        import subprocess

        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - git is optional on the GPU machine
        out["git_commit"] = None
    for mod in ("ray", "mlflow", "yaml", "tokenizers", "numpy"):
        out.setdefault("imported_optional_modules", {})[mod] = mod in sys.modules
    return out


# ---------------------------------------------------------------------------------------------------------------
# Section: correctness
# ---------------------------------------------------------------------------------------------------------------
def _random_case(rows: int, dim: int, vocab: int, s: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g)  # logits ~ N(0, 2^2): a realistic spread
    weight = torch.randn(vocab, dim, generator=g) * (2.0 / math.sqrt(dim))
    targets = torch.randint(0, vocab, (rows, s), generator=g)
    targets[torch.rand(rows, s, generator=g) < 0.05] = -100  # some ignored slots
    # a few duplicated tokens inside bags (k/s of the mass)
    if s > 1:
        targets[: rows // 8, 1] = targets[: rows // 8, 0]
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def _loss_and_grads(fn, hidden: torch.Tensor, weight: torch.Tensor):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def section_correctness(ctx: dict) -> dict:
    from tst_ops import bag_embedding, fused_linear_multi_hot_cross_entropy, multi_hot_cross_entropy

    p, dev = ctx["p"], ctx["device"]
    tri = _triton_status(dev)
    # On CUDA the Triton kernel (the default there) and the chunked torch path; on CPU the torch path, plus the
    # Triton kernel under its interpreter when TRITON_INTERPRET=1 is set and triton is installed.
    interpreted = dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and "triton_version" in tri
    backends = (["triton"] if dev.type == "cuda" or interpreted else []) + ["torch"]
    cases, ok = [], True
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    try:
        for dname in p["corr_dtypes"]:
            dtype = getattr(torch, dname)
            for s in p["corr_s"]:
                seed = int(time.time_ns() % 2**31)  # fresh random inputs every run; the seed is recorded
                hidden, weight, targets = _random_case(p["corr_rows"], p["corr_dim"], p["corr_vocab"], s, dtype, dev, seed)
                ref = _loss_and_grads(lambda h, w: multi_hot_cross_entropy(h @ w.t(), targets),
                                      hidden.double(), weight.double())
                unfused = _loss_and_grads(lambda h, w: multi_hot_cross_entropy(h @ w.t(), targets), hidden, weight)
                unfused_err = {"loss": abs(float(unfused[0]) - float(ref[0])) / abs(float(ref[0])),
                               "grad_hidden": _rel(unfused[1], ref[1]), "grad_weight": _rel(unfused[2], ref[2])}
                for backend in backends:
                    case = {"dtype": dname, "s": s, "backend": backend, "rows": p["corr_rows"], "dim": p["corr_dim"],
                            "vocab": p["corr_vocab"], "chunk": p["corr_chunk"], "seed": seed,
                            "unfused_same_dtype_err": unfused_err}
                    try:
                        got = _loss_and_grads(
                            lambda h, w: fused_linear_multi_hot_cross_entropy(
                                h, w, targets, chunk_size=p["corr_chunk"], backend=backend), hidden, weight)
                        err = {"loss": abs(float(got[0]) - float(ref[0])) / abs(float(ref[0])),
                               "grad_hidden": _rel(got[1], ref[1]), "grad_weight": _rel(got[2], ref[2])}
                        tol = TOL[dname]
                        case.update(err=err, tol=tol, passed=bool(
                            err["loss"] <= tol["loss"]
                            and grad_ok(err["grad_hidden"], unfused_err["grad_hidden"], tol)
                            and grad_ok(err["grad_weight"], unfused_err["grad_weight"], tol)))
                    except Exception as e:  # noqa: BLE001 - a failing backend is a failed check, not a crash
                        case.update(passed=False, error=f"{type(e).__name__}: {e}")
                    ok &= case["passed"]
                    cases.append(case)
        emb = []
        for s in p["corr_s"]:
            g = torch.Generator(device="cpu").manual_seed(1000 + s)
            w = (torch.randn(p["emb_vocab"], p["emb_dim"], generator=g) * 0.02).to(dev, torch.bfloat16)
            bags = torch.randint(0, p["emb_vocab"], (*p["emb_shape"], s), generator=g).to(dev)
            ref = bag_embedding(bags, w.float())  # float32 on the same bf16-valued weights
            got = bag_embedding(bags, w)  # bf16 weights: float32 accumulation, cast back
            rel = ((got.float() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
            bitwise = bool(torch.equal(got, ref.to(torch.bfloat16)))
            passed = got.dtype == torch.bfloat16 and (bitwise or rel <= TOL["bag_embedding_bf16"])
            if s == 1:
                passed &= bool(torch.equal(got, torch.nn.functional.embedding(bags[..., 0], w)))
            emb.append({"s": s, "max_rel_err": rel, "equals_rounded_fp32": bitwise, "tol": TOL["bag_embedding_bf16"],
                        "passed": bool(passed)})
            ok &= bool(passed)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return {"passed": bool(ok), "triton": tri, "backends": backends, "triton_interpreted": interpreted,
            "fused_loss": cases, "bag_embedding": emb,
            "note": None if tri["available"] else f"triton: {tri.get('reason')}; the chunked torch path was checked"}


# ---------------------------------------------------------------------------------------------------------------
# Section: matmul
# ---------------------------------------------------------------------------------------------------------------
def section_matmul(ctx: dict) -> dict:
    p, dev = ctx["p"], ctx["device"]
    n = p["mm_n"]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b, out=c), dev, p["mm_reps"], warmup=3)
    med = statistics.median(ms)
    flops = 2.0 * n ** 3
    ctx["matmul_flops_per_s"] = flops / (med / 1e3)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms_median": med, "ms_all": ms,
            "tflops_per_s": flops / (med / 1e3) / 1e12}


# ---------------------------------------------------------------------------------------------------------------
# Section: kernels
# ---------------------------------------------------------------------------------------------------------------
def _bench_ops():
    """bench/ops.py (the kernel benchmark of the tst_ops engineer): its inputs and path definitions are reused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tst_bench_ops", REPO / "bench" / "ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure_loss_config(n: int, d: int, v: int, s: int, dtype: torch.dtype, device: torch.device, path: str,
                        reps: int = 5, warmup: int = 2, seed: int = 0) -> dict:
    """Forward + backward of one loss path on (N, D) hidden states, a (V, D) head and (N, s) targets.

    What is measured comes from bench/ops.py (``make_inputs``, ``make_step``: "fused" =
    tst_ops.fused_linear_multi_hot_cross_entropy, Triton on CUDA when available; "reference" = materialised
    logits + tst_ops.multi_hot_cross_entropy, one log_softmax and a gather; "reference_compiled" = the same under
    torch.compile; gradients of hidden and W by torch.autograd.grad, nothing kept). How: CUDA events (median of
    `reps` after the first call and `warmup - 1` more) and torch.cuda.max_memory_allocated above the inputs.
    """
    ops = _bench_ops()
    h, w, t = ops.make_inputs(n, d, v, s, device=device, dtype=dtype, seed=seed)
    step_fn = ops.make_step(path)

    def step():
        return step_fn(h, w, t)

    t_first = time.perf_counter()
    step()  # first call (compile / Triton JIT / autotune) outside the timing
    _sync(device)
    first_s = time.perf_counter() - t_first
    ms = time_ms(step, device, reps, max(0, warmup - 1))
    mem = peak_memory(step, device)
    med = statistics.median(ms)
    out = {"path": path, "ms_median": med, "ms_all": ms, "first_call_s": first_s,
           "matmul_tflops_per_s": 6.0 * n * d * v / (med / 1e3) / 1e12, "measured_with": "bench/ops.py make_step"}
    if mem:
        out.update(mem)
    del h, w, t, step_fn
    _free(device)
    return out


def _ratios(row: dict, other: str, suffix: str) -> None:
    f, r = row["fused"], row[other]
    row[f"fused_over_{suffix}_time"] = f["ms_median"] / r["ms_median"]
    if "above_inputs_bytes" in f and "above_inputs_bytes" in r:
        row[f"fused_over_{suffix}_peak_memory"] = f["above_inputs_bytes"] / r["above_inputs_bytes"]


def section_kernels(ctx: dict) -> dict:
    """Fused vs the eager unfused reference (the compiled reference is the late section `kernels_compiled`)."""
    p, dev = ctx["p"], ctx["device"]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n, d, v = p["kern_n"], p["kern_d"], p["kern_v"]
    tri = _triton_status(dev)
    configs = []
    for s in p["kern_s"]:
        row: dict[str, Any] = {"s": s, "n": n, "d": d, "v": v, "dtype": str(dtype).replace("torch.", "")}
        for path in ("fused", "reference"):
            row[path] = measure_loss_config(n, d, v, s, dtype, dev, path, p["kern_reps"], p["kern_warmup"])
        _ratios(row, "reference", "reference")
        configs.append(row)
    ctx["kernel_rows"] = configs
    return {"fused_backend": "triton" if tri["available"] else "torch (chunked)", "configs": configs,
            "timing": "CUDA events, median" if dev.type == "cuda" else "wall-clock, median",
            "memory": "torch.cuda.max_memory_allocated above the inputs" if dev.type == "cuda"
            else "not measured on CPU"}


def section_kernels_compiled(ctx: dict) -> dict:
    """The unfused reference under torch.compile (one compile per s), run last: only if time is left."""
    p, dev, budget, args = ctx["p"], ctx["device"], ctx["budget"], ctx["args"]
    if dev.type != "cuda" and not args.tiny_compile:
        return {"configs": [], "skipped": ["CPU inductor compiles are skipped in --tiny (pass --tiny-compile)"]}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n, d, v = p["kern_n"], p["kern_d"], p["kern_v"]
    fused = {r["s"]: r["fused"] for r in ctx.get("kernel_rows", [])}
    configs, skipped = [], []
    for i, s in enumerate(p["kern_s"]):
        if not budget.allows(p["est_s"]["kernels_compiled"] if i == 0 else p["est_s"]["kernels_compiled"] / 2):
            skipped.append(f"s={s}: over budget ({budget.left():.0f} s left)")
            continue
        row: dict[str, Any] = {"s": s, "n": n, "d": d, "v": v, "dtype": str(dtype).replace("torch.", "")}
        row["reference_compiled"] = measure_loss_config(n, d, v, s, dtype, dev, "reference_compiled",
                                                        p["kern_reps"], p["kern_warmup"])
        if s in fused:
            row["fused"] = fused[s]
            _ratios(row, "reference_compiled", "compiled_reference")
        configs.append(row)
    torch._dynamo.reset()
    return {"configs": configs, "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------------
# Training runs through the project's Ray-free loop
# ---------------------------------------------------------------------------------------------------------------
def _ensure_process_group(device: torch.device) -> None:
    """A one-rank process group, so that pipeline.train.loop.Trainer applies FSDP2 (+ bf16 MixedPrecisionPolicy)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _model_vocab(preset: str, data_vocab: int) -> int:
    """The preset's reference vocabulary when it covers the tokenizer's ids, else the tokenizer's."""
    from pipeline.model.transformer import PRESETS

    return max(PRESETS[preset]["vocab_size"], data_vocab)


def train_run(ctx: dict, *, name: str, preset: str, seq_len: int, batch: int, steps: int, switch_fraction: float,
              bag_size: int, compile: bool, log_every: int, eval_every: int, lr: float, warmup: int,
              val_windows: int, seed: int = 0) -> dict:
    """One run of pipeline.train.loop.Trainer (checkpoint writes skipped); returns its metric records and summary."""
    from pipeline.config import Config, validate
    from pipeline.train.loop import LocalReporter, Trainer
    from pipeline.train.metrics import MetricsSink

    class _CheckTrainer(Trainer):
        def save(self, metrics):  # no DCP write: report the metrics only (module docstring)
            self.reporter.report(metrics, None, self.state.step)

    dev, data = ctx["device"], ctx["data"]
    _ensure_process_group(dev)
    vocab = _model_vocab(preset, data["header"]["vocab_size"])
    cfg = Config()
    cfg.model.preset, cfg.model.vocab_size = preset, vocab
    cfg.data.seq_len, cfg.data.bag_size, cfg.data.val_windows = seq_len, bag_size, val_windows
    t = cfg.train
    t.steps, t.switch_fraction, t.global_batch_size, t.micro_batch_size = steps, switch_fraction, batch, None
    t.lr, t.warmup_steps, t.decay_fraction, t.seed = lr, warmup, 0.1, seed
    t.dtype = "bfloat16" if dev.type == "cuda" else "float32"
    t.compile, t.log_every, t.eval_every, t.checkpoint_every = compile, log_every, eval_every, 10**9
    t.threads = ctx["p"].get("threads")  # CPU only (the tiny mode): 1 thread, no oversubscription
    cfg.scaling.num_workers = 1
    validate(cfg)
    source = make_source(data, total_steps=steps, switch_fraction=switch_fraction, bag_size=bag_size,
                         seq_len=seq_len, global_batch_size=batch, val_windows=val_windows)
    run_dir = os.path.join(ctx["tmp"], name)
    sink = MetricsSink(run_dir, steps, console=ctx["args"].verbose)
    reporter = LocalReporter(run_dir, sink, resume=False)
    if dev.type == "cuda":
        _free(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedule warnings of the short throughput runs
        trainer = _CheckTrainer(cfg, source, reporter, vocab_size=vocab, device=dev)
        n_params = sum(p_.numel() for p_ in trainer.model.parameters())
        summary = trainer.run()
    wall = time.perf_counter() - t0
    out = {
        "name": name, "preset": preset, "vocab_size": vocab, "params": int(n_params),
        "flops_per_position": int(trainer.flops_per_position), "seq_len": seq_len, "global_batch_size": batch,
        "steps": steps, "switch_step": trainer.switch_step, "bag_size": bag_size, "switch_fraction": switch_fraction,
        "compile": compile, "dtype": t.dtype, "fsdp": trainer.distributed, "world_size": trainer.world_size,
        "source": type(source).__name__, "wall_s": wall, "records": [r for r in sink.history if "step" in r],
        "summary": summary,
    }
    if dev.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    del trainer, source, reporter, sink
    if compile:
        torch._dynamo.reset()
    _free(dev)
    return out


def _steady(records: list[dict], phase: str) -> list[dict]:
    """The log intervals of a phase that measure steady training: not the first interval of the phase (warm-up,
    compilation, allocator growth) and not an interval that ends with an evaluation (its time includes it)."""
    rows = [r for r in records if r.get("phase") == phase and r.get("kind") != "final"]
    return [r for r in rows[1:] if "val_loss" not in r]


def _phase_figures(run: dict, phase: str, matmul_flops: Optional[float]) -> dict:
    rows = _steady(run["records"], phase)
    if not rows:
        return {"intervals": 0}
    med = lambda k: statistics.median(float(r[k]) for r in rows)  # noqa: E731
    out = {
        "intervals": len(rows),
        "steps_per_s": 1.0 / med("step_time_s"),
        "step_time_s": med("step_time_s"),
        "positions_per_s": med("positions_per_s"),
        "tokens_per_s": med("tokens_per_s"),
        "tflops_per_s": med("tflops_per_s"),
        "data_wait_frac": med("data_wait_frac"),
        "bag_size": rows[0].get("bag_size"),
    }
    out["mfu_datasheet"] = med("mfu") if all(r.get("mfu") is not None for r in rows) else None
    out["mfu_vs_measured_matmul"] = out["tflops_per_s"] * 1e12 / matmul_flops if matmul_flops else None
    return out


def section_train(ctx: dict) -> dict:
    p, budget = ctx["p"], ctx["budget"]
    args = ctx["args"]
    matmul = ctx.get("matmul_flops_per_s")
    results, skipped = [], []
    compiles = [c for c in p["tp_compile"] if not c or ctx["device"].type == "cuda" or args.tiny_compile]
    if len(compiles) < len(p["tp_compile"]):
        skipped.append("compile=True: CPU inductor compile is skipped in --tiny (pass --tiny-compile)")
    ctx["compile_ok"] = None
    for preset in p["tp_presets"]:
        optional = preset in p["tp_optional"]
        for comp in compiles:
            est = p["est_s"]["train_optional" if optional else ("train_compiled" if comp else "train_eager")]
            # priority: the first preset (eager, compiled) > compare > optional presets (reserve compare's time)
            reserve = ctx["reserve_after"]("train") if optional else 0.0
            if not budget.allows(est, reserve):
                skipped.append(f"{preset} compile={comp}: over budget ({budget.left():.0f} s left)")
                continue
            n = p["tp_steps_per_phase"]
            try:
                run = train_run(ctx, name=f"train_{preset}_{'compiled' if comp else 'eager'}", preset=preset,
                                seq_len=p["tp_seq"], batch=p["tp_batch"], steps=2 * n, switch_fraction=0.5,
                                bag_size=p["tp_bag"], compile=comp, log_every=p["tp_log_every"],
                                eval_every=10**9, lr=p["tp_lr"], warmup=2,
                                # the loop evaluates at the switch and at the end; a batch-sized eval keeps the
                                # compiled blocks' shapes (no extra recompile for a partial micro-batch)
                                val_windows=p["tp_batch"])
            except Exception as e:  # noqa: BLE001 - recorded; the next configuration still runs
                results.append({"preset": preset, "compile": comp, "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()})
                if comp:
                    ctx["compile_ok"] = False
                continue
            if comp and preset == p["tp_presets"][0]:
                ctx["compile_ok"] = run["summary"]["status"] == "finished"
            sup = _phase_figures(run, "superposition", matmul)
            rec = _phase_figures(run, "recovery", matmul)
            ratio = (sup["tokens_per_s"] / rec["tokens_per_s"]) if sup.get("tokens_per_s") and rec.get(
                "tokens_per_s") else None
            results.append({k: run[k] for k in run if k not in ("records",)} | {
                "superposition": sup, "recovery": rec, "raw_token_rate_ratio": ratio,
                "status": run["summary"]["status"],
                "intervals": [{k: r.get(k) for k in ("step", "phase", "step_time_s", "tokens_per_s", "positions_per_s",
                                                     "mfu", "val_loss")} for r in run["records"]],
            })
    return {"runs": results, "skipped": skipped,
            "peak_datasheet_tflops": (ctx["env"] or {}).get("datasheet_bf16_peak_tflops"),
            "measured_matmul_tflops": matmul / 1e12 if matmul else None,
            "flop_count": "6 (N_nonembedding + d V) + 6 n_layers d L per latent position (design notes)"}


# ---------------------------------------------------------------------------------------------------------------
# Section: compare
# ---------------------------------------------------------------------------------------------------------------
def _curves(run: dict, name: str, r: float, s: int):
    from pipeline.report.runs import RunCurves

    metrics: dict[str, list] = {}
    for rec in run["records"]:
        for k in ("val_loss", "elapsed_s", "flops", "raw_tokens"):
            if rec.get(k) is not None:
                metrics.setdefault(k, []).append((int(rec["step"]), float(rec[k])))
    params = {"train.steps": run["steps"], "train.switch_fraction": r, "data.bag_size": s,
              "train.global_batch_size": run["global_batch_size"], "data.seq_len": run["seq_len"]}
    return RunCurves(name=name, source="folder", metrics=metrics, params=params,
                     phases=[(int(x["step"]), x["phase"]) for x in run["records"] if "phase" in x])


def section_compare(ctx: dict) -> dict:
    from pipeline.report.curves import compute_comparison

    p, args = ctx["p"], ctx["args"]
    steps = args.compare_steps or p["cmp_steps"]
    comp = bool(ctx.get("compile_ok")) and not args.compare_eager
    common = dict(preset=p["cmp_preset"], seq_len=p["cmp_seq"], batch=p["cmp_batch"], steps=steps, compile=comp,
                  log_every=p["cmp_eval_every"], eval_every=p["cmp_eval_every"], lr=p["cmp_lr"],
                  warmup=p["cmp_warmup"], val_windows=p["cmp_val_windows"], seed=0)
    s, r = p["cmp_bag"], p["cmp_r"]
    base = train_run(ctx, name="compare_baseline", switch_fraction=0.0, bag_size=1, **common)
    tst = train_run(ctx, name="compare_tst", switch_fraction=r, bag_size=s, **common)
    res = compute_comparison(_curves(tst, "tst", r, s), [_curves(base, "baseline", 0.0, 1)])

    def summary(run):
        recs = run["records"]
        return {
            "final_val_loss": run["summary"]["final_val_loss"], "status": run["summary"]["status"],
            "raw_tokens": run["summary"]["raw_tokens"], "epochs": run["summary"]["epochs"],
            "wall_s": run["wall_s"], "switch_step": run["switch_step"],
            "val_curve": [(r_["step"], r_["val_loss"]) for r_ in recs if r_.get("val_loss") is not None],
            "train_curve": [(r_["step"], r_["train_loss"], r_["phase"]) for r_ in recs if "train_loss" in r_],
        }

    b, t_ = summary(base), summary(tst)
    bv, tv = dict(b["val_curve"]), dict(t_["val_curve"])
    same = sorted(set(bv) & set(tv))
    return {
        "settings": {k: v for k, v in common.items()} | {
            "tst_bag_size": s, "tst_switch_fraction": r, "params": tst["params"], "vocab_size": tst["vocab_size"],
            "flops_per_position": tst["flops_per_position"], "positions_per_step": p["cmp_batch"] * p["cmp_seq"],
            "flops_per_run": float(tst["flops_per_position"]) * p["cmp_batch"] * p["cmp_seq"] * steps,
            "decay_fraction": 0.1, "schedule": "warmup-stable-decay", "data": ctx["data"]["header"].get("source"),
            "corpus_train_tokens": ctx["data"]["header"]["train_tokens"]},
        "baseline": b, "tst": t_,
        "final_val_loss_baseline": b["final_val_loss"], "final_val_loss_tst": t_["final_val_loss"],
        # baseline minus TST at the final step; positive = TST better (pipeline.compare's sign)
        "equal_step_diff_nats": res["equal_step"]["diff_nats"],
        "val_loss_diff_by_step": [(st, bv[st] - tv[st]) for st in same],
        "iso_loss_speedup": res["speedup"],
        "comparison": {k: res[k] for k in ("target_loss", "mode", "equal_step")},
    }


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _clean_json(x):
    """NaN/inf -> None (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_json(v) for v in x]
    return x


def _fmt(v, spec="{:.3g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def format_table(report: dict) -> str:
    lines = [f"gpu_check ({report['mode']}, {report.get('device_name') or report['device']}): "
             f"{report['status']} in {report['elapsed_s']:.0f} s"]
    sec = report["sections"]
    for name in SECTIONS:
        sct = sec.get(name, {})
        lines.append(f"  {name:<12} {sct.get('status', '?'):<8} {_fmt(sct.get('seconds'), '{:.1f}')} s"
                     + (f"  ({sct['reason']})" if sct.get("reason") else ""))
    c = sec.get("correctness", {}).get("result")
    if c:
        worst: dict[str, float] = {}
        for case in c["fused_loss"]:
            key = f"{case['backend']}/{case['dtype']}"
            e = case.get("err")
            worst[key] = max(worst.get(key, 0.0), max(e.values()) if e else float("inf"))
        lines.append("  correctness: worst rel err " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
                     + f"; bag_embedding bf16 {'ok' if all(e['passed'] for e in c['bag_embedding']) else 'FAIL'}"
                     + ("" if c["triton"]["available"] else f"; triton: {c['triton'].get('reason')}"))
    m = sec.get("matmul", {}).get("result")
    if m:
        lines.append(f"  matmul {m['n']}^3 {m['dtype']}: {m['tflops_per_s']:.1f} TFLOP/s")
    k = sec.get("kernels", {}).get("result")
    if k:
        lines.append(f"  kernels (fused = {k['fused_backend']})   s   fused ms   ref ms   fused/ref time   fused/ref mem"
                     "   fused/compiled-ref time")
        for row in k["configs"]:
            lines.append(f"  {'':<32}{row['s']:>3} {row['fused']['ms_median']:>10.2f} {row['reference']['ms_median']:>8.2f}"
                         f" {row['fused_over_reference_time']:>16.3f} {_fmt(row.get('fused_over_reference_peak_memory')):>15}"
                         f" {_fmt(row.get('fused_over_compiled_reference_time')):>25}")
    kc = sec.get("kernels_compiled", {}).get("result")
    if kc and kc["configs"]:
        lines.append("  kernels vs torch.compile'd reference: " + ", ".join(
            f"s={r['s']} {r['reference_compiled']['ms_median']:.2f} ms (fused/compiled time "
            f"{_fmt(r.get('fused_over_compiled_reference_time'))}, mem {_fmt(r.get('fused_over_compiled_reference_peak_memory'))})"
            for r in kc["configs"]))
    tr = sec.get("train", {}).get("result")
    if tr:
        lines.append("  train   preset  compile  phase          steps/s   positions/s   raw tokens/s   MFU(sheet)"
                     "   MFU(matmul)")
        for run in tr["runs"]:
            if "error" in run:
                lines.append(f"          {run['preset']:<7} {str(run['compile']):<8} ERROR {run['error'][:80]}")
                continue
            for ph in ("superposition", "recovery"):
                f = run[ph]
                if not f.get("intervals"):
                    continue
                lines.append(f"          {run['preset']:<7} {str(run['compile']):<8} {ph:<14} {f['steps_per_s']:>7.2f}"
                             f" {f['positions_per_s']:>13,.0f} {f['tokens_per_s']:>14,.0f}"
                             f" {_fmt(f['mfu_datasheet'], '{:.1%}'):>12} {_fmt(f['mfu_vs_measured_matmul'], '{:.1%}'):>13}")
            lines.append(f"          {'':<16} raw-token rate superposition/recovery = {_fmt(run['raw_token_rate_ratio'])}"
                         f" (s = {run['bag_size']})")
        for note in tr["skipped"]:
            lines.append(f"          skipped: {note}")
    cp = sec.get("compare", {}).get("result")
    if cp:
        st = cp["settings"]
        lines.append(f"  compare {st['preset']} ({st['params'] / 1e6:.1f}M) T={st['steps']} B={st['batch']} "
                     f"L={st['seq_len']}: final val loss baseline {_fmt(cp['final_val_loss_baseline'], '{:.4f}')}, "
                     f"TST(s={st['tst_bag_size']}, r={st['tst_switch_fraction']}) {_fmt(cp['final_val_loss_tst'], '{:.4f}')}"
                     f", equal-step diff (base - TST) {_fmt(cp['equal_step_diff_nats'], '{:+.4f}')} nats")
    return "\n".join(lines)


def run_check(args) -> dict:
    mode = "tiny" if args.tiny else "gpu"
    p = dict(PROFILES[mode])
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny for the CPU smoke test")
    max_min = args.max_minutes if args.max_minutes is not None else p["max_minutes"]
    budget = Budget(max_min * 60.0)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    skip = set(args.skip.split(",")) if args.skip else set()
    for x in only | skip:
        if x not in SECTIONS:
            raise SystemExit(f"unknown section {x!r}; sections: {', '.join(SECTIONS)}")
    wanted = [s for s in SECTIONS if s in only and s not in skip]
    if ("train" in wanted or "compare" in wanted) and not args.data:
        raise SystemExit("train/compare need --data STORE (a token store folder from `tst data prepare`), or --skip "
                         "train,compare")
    torch.manual_seed(0)
    if p.get("threads") and device.type == "cpu":
        torch.set_num_threads(p["threads"])  # small shared CPU machines: no thread oversubscription
    os.makedirs(args.out, exist_ok=True)
    ctx: dict[str, Any] = {"p": p, "device": device, "budget": budget, "args": args, "mode": mode, "env": None,
                           "tmp": tempfile.mkdtemp(prefix="gpu_check_", dir=args.out)}

    def reserve_after(section: str) -> float:
        """Seconds the sections after `section` need at the least (the compare reserve on the GPU)."""
        later = wanted[wanted.index(section) + 1:] if section in wanted else []
        return p["compare_reserve_s"] if "compare" in later else 0.0

    ctx["reserve_after"] = reserve_after
    if "train" in wanted or "compare" in wanted:
        ctx["data"] = load_store(args.data)
    fns = {"env": section_env, "correctness": section_correctness, "matmul": section_matmul,
           "kernels": section_kernels, "train": section_train, "compare": section_compare,
           "kernels_compiled": section_kernels_compiled}
    report: dict[str, Any] = {"mode": mode, "device": str(device), "max_minutes": max_min, "profile": p,
                              "sections": {}, "argv": sys.argv[1:]}
    if ctx.get("data"):
        report["data"] = ctx["data"]["header"]
    for name in SECTIONS:
        if name not in wanted:
            report["sections"][name] = {"status": "skipped", "reason": "not selected"}
            continue
        est = {"env": 0, "train": p["est_s"]["train_eager"]}.get(name, p["est_s"].get(name, 0))
        if name == "kernels_compiled":
            est = 0  # budgeted per s inside
        if name != "env" and not budget.allows(est):
            report["sections"][name] = {"status": "skipped",
                                        "reason": f"over budget ({budget.elapsed():.0f} s of {budget.max_s:.0f} s used)"}
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = fns[name](ctx)
            status = "ok"
            if name == "correctness" and not res["passed"]:
                status = "failed"
            if name == "train" and any("error" in r or r.get("status") != "finished" for r in res["runs"]):
                status = "failed"
            if name == "compare" and (res["baseline"]["status"] != "finished" or res["tst"]["status"] != "finished"):
                status = "failed"
            report["sections"][name] = {"status": status, "result": res}
            if status == "ok" and res.get("configs") == [] and res.get("skipped"):
                report["sections"][name].update(status="skipped", reason="; ".join(res["skipped"]))
        except Exception as e:  # noqa: BLE001 - recorded, later sections still run
            report["sections"][name] = {"status": "error", "reason": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()}
            traceback.print_exc()
        report["sections"][name]["seconds"] = time.perf_counter() - t0
        if name == "env":
            ctx["env"] = report["sections"]["env"].get("result")
        _free(device)
    env = ctx["env"] or {}
    report["device_name"] = env.get("gpu_name")
    report["elapsed_s"] = budget.elapsed()
    bad = [n for n, s in report["sections"].items() if s["status"] in ("failed", "error")]
    report["status"] = "FAILED (" + ", ".join(bad) + ")" if bad else "passed"
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(_clean_json(report), f, indent=1, default=_json_default)
    import shutil

    shutil.rmtree(ctx["tmp"], ignore_errors=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    for a in (ap, sub.add_parser("run", help="run the checks (the default command)")):
        a.add_argument("--tiny", action="store_true", help="CPU smoke mode: every section, small shapes, few steps")
        a.add_argument("--tiny-compile", action="store_true", help="in --tiny, also run the torch.compile paths")
        a.add_argument("--data", help="token store folder from `tst data prepare` (needed by train and compare)")
        a.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.json (default %(default)s)")
        a.add_argument("--only", help=f"comma-separated sections to run ({','.join(SECTIONS)})")
        a.add_argument("--skip", help="comma-separated sections to skip")
        a.add_argument("--max-minutes", type=float, default=None,
                       help="skip sections that would start past this budget (default 4.5 on GPU, 3 in --tiny)")
        a.add_argument("--device", help="override the device (default cuda:0, or cpu with --tiny)")
        a.add_argument("--compare-steps", type=int, default=None, help="override T of the compare section")
        a.add_argument("--compare-eager", action="store_true", help="run the compare pair without torch.compile")
        a.add_argument("--verbose", action="store_true", help="print the training loop's progress lines")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_check(args)
    print(format_table(report), flush=True)
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
