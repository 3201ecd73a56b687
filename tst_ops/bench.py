"""Measuring the fused multi-hot cross-entropy against the unfused reference (forward + backward).

Why: the fused loss (``fused.py``) exists to avoid holding the (N, V) logits; these helpers measure what that
buys (peak memory) and what it costs (time), like for like. ``bench/ops.py`` is the command line over them
(the CPU table of the design notes, each path's memory in its own process); ``bench/gpu_check.py`` measures
each path on CUDA with ``measure_loss_config`` (CUDA events: ``time_ms``; ``cuda_peak_memory``) and the
GPU's attainable matmul rate with ``matmul_rate``. The paths:
- "reference": materialised logits ``hidden @ W.T``, one ``log_softmax`` and a gather
  (:func:`tst_ops.multi_hot_cross_entropy`), eager;
- "reference_compiled": the same function under ``torch.compile``;
- "fused": :func:`tst_ops.fused_linear_multi_hot_cross_entropy` (chunked, gradients computed in the forward).
Each iteration is a forward and a backward for ``hidden`` and ``W`` (``torch.autograd.grad``, nothing kept).
Times are measured side by side in one process (warm-up, then repeats interleaved across paths; median and
minimum: on a shared machine the minimum is the least-disturbed run). Peak memory: on CPU the peak RSS above
the RSS before the measured iteration, after a warm-up and a reset of the high-water mark via
/proc/self/clear_refs (call it in a fresh process started with ``CPU_MEMORY_ENV``: an allocator that kept
memory from earlier work hides it);
on CUDA ``torch.cuda.max_memory_allocated`` above the memory in use before the iteration.

Imports nothing but torch, the standard library and ``tst_ops``.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from typing import Any, Callable, Optional

import torch

from .fused import auto_chunk_size, fused_linear_multi_hot_cross_entropy
from .loss import multi_hot_cross_entropy

PATHS = ("reference", "reference_compiled", "fused")

_clock = time.perf_counter  # the tests replace it with a fake clock

# The environment of a process that measures CPU peak memory. glibc's malloc raises its mmap threshold (up to
# 32 MiB) each time a mapped block is freed; blocks below it then come from a heap that keeps freed pages, so the
# measured iteration reuses the warm-up's pages and its RSS does not grow (seen: the fused loss's 4 MiB chunks
# measured 1.0 MiB). A fixed threshold (setting one turns the adjustment off) maps every block of 128 KiB or
# more afresh, so the peak RSS counts it (4.8 MiB). glibc reads it at start-up: pass it to the new process.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def make_inputs(N, D, V, s, device="cpu", dtype=torch.float32, seed=0):
    """hidden (N, D), W (V, D) (both requiring grad) and targets (N, s) with ~1 % ignored slots."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * D**-0.5).to(dtype)
    t = torch.randint(0, V, (N, s), generator=g)
    t[torch.rand(N, s, generator=g) < 0.01] = -100
    return h.to(device).requires_grad_(), w.to(device).requires_grad_(), t.to(device)


def _reference(h, w, t, weights):
    return multi_hot_cross_entropy(h @ w.t(), t, weights)


_compiled = {}


def make_step(path, weights="uniform", chunk_size=None):
    """A callable (h, w, t) -> (loss, grad_h, grad_w) for one path."""
    if path == "reference":
        fn = _reference
    elif path == "reference_compiled":
        if weights not in _compiled:
            _compiled[weights] = torch.compile(lambda h, w, t: _reference(h, w, t, weights), dynamic=False)
        cfn = _compiled[weights]
        fn = lambda h, w, t, _w: cfn(h, w, t)  # noqa: E731
    elif path == "fused":
        fn = lambda h, w, t, weights: fused_linear_multi_hot_cross_entropy(  # noqa: E731
            h, w, t, weights, chunk_size=chunk_size
        )
    else:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")

    def step(h, w, t):
        loss = fn(h, w, t, weights)
        gh, gw = torch.autograd.grad(loss, (h, w))
        return loss.detach(), gh, gw

    return step


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rss_kib():
    with open("/proc/self/status") as f:
        status = f.read()
    return {k: int(re.search(k + r":\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}


def peak_bytes_of(call: Callable[[], object], device="cpu") -> int:
    """Peak memory of one ``call()`` above what was in use before it, after one warm-up call."""
    out = call()  # warm-up (compilation, lazy initialisation)
    del out
    _sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = call()
        _sync(device)
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _rss_kib()["VmRSS"]
    out = call()
    return (_rss_kib()["VmHWM"] - before) * 1024


def peak_memory_bytes(path, N, D, V, s, device="cpu", dtype=torch.float32, weights="uniform", chunk_size=None):
    """Peak memory of one forward+backward of ``path`` above what was in use before it (a fresh process on CPU)."""
    h, w, t = make_inputs(N, D, V, s, device, dtype)
    step = make_step(path, weights, chunk_size)
    return peak_bytes_of(lambda: step(h, w, t), device)


def time_calls(calls: dict[str, Callable[[], tuple]], repeats=3, warmup=1, device="cpu") -> dict:
    """Seconds of each named call, measured side by side: ``warmup`` calls of each, then ``repeats`` rounds
    that call each once in turn. Per name: median ``time_s``, ``time_min_s``, ``times_s`` and ``loss`` (the
    first element of the last warm-up call's result, as a float; None without warm-up)."""
    losses = {}
    for p, call in calls.items():
        for _ in range(warmup):
            losses[p] = float(call()[0])
    times = {p: [] for p in calls}
    for _ in range(repeats):
        for p, call in calls.items():
            _sync(device)
            t0 = _clock()
            out = call()
            _sync(device)
            times[p].append(_clock() - t0)
            del out
    return {p: {"time_s": statistics.median(times[p]), "time_min_s": min(times[p]), "times_s": times[p],
                "loss": losses.get(p)} for p in calls}


def time_paths(paths, N, D, V, s, device="cpu", dtype=torch.float32, weights="uniform", chunk_size=None,
               repeats=3, warmup=1):
    """Median forward+backward seconds of each path, measured side by side (interleaved) in this process."""
    h, w, t = make_inputs(N, D, V, s, device, dtype)
    steps = {p: make_step(p, weights, chunk_size) for p in paths}
    return time_calls({p: (lambda st=st: st(h, w, t)) for p, st in steps.items()}, repeats, warmup, device)


def run_one(path, N, D, V, s, device="cpu", dtype=torch.float32, weights="uniform", chunk_size=None,
            repeats=3, warmup=1):
    """One configuration of one path on ``device``: dict with time_s, loss and peak_bytes (in this process)."""
    res = time_paths([path], N, D, V, s, device, dtype, weights, chunk_size, repeats, warmup)[path]
    res["peak_bytes"] = peak_memory_bytes(path, N, D, V, s, device, dtype, weights, chunk_size)
    res.update(path=path, N=N, D=D, V=V, s=s, device=str(device), dtype=str(dtype), weights=weights,
               chunk_size=chunk_size or auto_chunk_size(N, D, V))
    return res


def summarize(rows):
    """Lines of fused / reference ratios (time median and min, peak memory) per s, from ``bench`` rows."""
    lines = []
    for s in sorted({r["s"] for r in rows}):
        by = {r["path"]: r for r in rows if r["s"] == s}
        f = by["fused"]
        for ref in ("reference", "reference_compiled"):
            r = by[ref]
            lines.append(f"s={s:<3d} fused / {ref:<19s} time x{f['time_s'] / r['time_s']:.3f} "
                         f"(min x{f.get('time_min_s', f['time_s']) / r.get('time_min_s', r['time_s']):.3f})  "
                         f"peak memory x{f['peak_bytes'] / r['peak_bytes']:.3f}")
        best = min(by["reference"]["time_s"], by["reference_compiled"]["time_s"])
        lines.append(f"s={s:<3d} fused / fastest reference time x{f['time_s'] / best:.3f}")
    return lines


# -- CUDA-event timing (bench/gpu_check.py) ---------------------------------------------------------------------------
def time_ms(fn: Callable[[], Any], device, reps: int, warmup: int) -> list[float]:
    """Milliseconds of each of `reps` calls after `warmup` calls: CUDA events on a GPU, perf_counter on CPU."""
    device = torch.device(device)
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
            t = _clock()
            fn()
            out.append((_clock() - t) * 1e3)
    return out


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def cuda_peak_memory(fn: Callable[[], Any], device) -> Optional[dict]:
    """Peak allocated bytes of one call, and the part above what was allocated before it (CUDA only, else None)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free_memory(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": int(peak), "above_inputs_bytes": int(peak - base)}


def matmul_rate(n: int, device, reps: int, warmup: int = 3) -> dict:
    """An n^3 matmul (bf16 on CUDA, fp32 on CPU), median of `reps` timed calls: the "measured peak" that MFU is also
    reported against. flops_per_s = 2 n^3 / median seconds."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b, out=c), device, reps, warmup)
    med = statistics.median(ms)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms_median": med, "ms_all": ms,
            "tflops_per_s": flops / (med / 1e3) / 1e12, "flops_per_s": flops / (med / 1e3)}


def measure_loss_config(n: int, d: int, v: int, s: int, dtype, device, path: str, reps: int = 5, warmup: int = 2,
                        seed: int = 0) -> dict:
    """Forward + backward of one loss path (``make_inputs``, ``make_step``) on (N, D) hidden states, a (V, D) head
    and (N, s) targets: the first call (compile / Triton JIT / autotune) timed apart, then ``time_ms`` of `reps`
    calls after `warmup - 1` more, and (CUDA) the peak memory above the inputs. matmul_tflops_per_s counts the
    three matmuls of forward + backward, 6 N D V."""
    device = torch.device(device)
    h, w, t = make_inputs(n, d, v, s, device=device, dtype=dtype, seed=seed)
    step_fn = make_step(path)

    def step():
        return step_fn(h, w, t)

    t_first = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - t_first
    ms = time_ms(step, device, reps, max(0, warmup - 1))
    mem = cuda_peak_memory(step, device)
    med = statistics.median(ms)
    out = {"path": path, "ms_median": med, "ms_all": ms, "first_call_s": first_s,
           "matmul_tflops_per_s": 6.0 * n * d * v / (med / 1e3) / 1e12, "measured_with": "tst_ops.bench.make_step"}
    if mem:
        out.update(mem)
    del h, w, t, step_fn
    free_memory(device)
    return out


def ratios(row: dict, other: str, suffix: str) -> None:
    """Into `row`: fused / `other` median time and (when both were measured) peak memory above the inputs."""
    f, r = row["fused"], row[other]
    row[f"fused_over_{suffix}_time"] = f["ms_median"] / r["ms_median"]
    if "above_inputs_bytes" in f and "above_inputs_bytes" in r:
        row[f"fused_over_{suffix}_peak_memory"] = f["above_inputs_bytes"] / r["above_inputs_bytes"]
