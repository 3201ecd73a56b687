"""Benchmark: fused multi-hot cross-entropy vs the efficient unfused reference (forward + backward).

Why: the fused loss (tst_ops/fused.py) exists to avoid holding the (N, V) logits; this measures what that
buys (peak memory) and what it costs (time), like for like, as the design notes ask:
- "reference": materialised logits ``hidden @ W.T``, one ``log_softmax`` and a gather
  (``tst_ops.multi_hot_cross_entropy``), eager;
- "reference_compiled": the same function under ``torch.compile``;
- "fused": ``tst_ops.fused_linear_multi_hot_cross_entropy`` (chunked, gradients computed in the forward).
Each iteration is a forward and a backward for ``hidden`` and ``W`` (``torch.autograd.grad``, nothing kept).
Times are measured side by side in one process (warm-up, then repeats interleaved across paths; median and
minimum: on a shared machine the minimum is the least-disturbed run);
on CPU each path's peak memory is measured in its own fresh process (peak RSS above the RSS before the
measured iteration, after a warm-up and a reset of the high-water mark via /proc/self/clear_refs); on CUDA
with ``torch.cuda.max_memory_allocated`` above the memory in use before the iteration.

Usage (CPU figures of the issue):  python bench/ops.py            (N=8192, D=1024, V=32768, s in 1 6 16)
Reusable: ``run_one(path, N, D, V, s, device=...)`` returns a dict; ``bench(...)`` runs a whole table
(bench/gpu_check.py calls them on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tst_ops import (  # noqa: E402
    auto_chunk_size,
    fused_linear_multi_hot_cross_entropy,
    multi_hot_cross_entropy,
)

PATHS = ("reference", "reference_compiled", "fused")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    status = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}


def peak_memory_bytes(path, N, D, V, s, device="cpu", dtype=torch.float32, weights="uniform", chunk_size=None):
    """Peak memory of one forward+backward above what was in use before it (call in a fresh process on CPU)."""
    h, w, t = make_inputs(N, D, V, s, device, dtype)
    step = make_step(path, weights, chunk_size)
    out = step(h, w, t)  # warm-up (compilation, lazy initialisation)
    del out
    _sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = step(h, w, t)
        _sync(device)
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _rss_kib()["VmRSS"]
    out = step(h, w, t)
    return (_rss_kib()["VmHWM"] - before) * 1024


def time_paths(paths, N, D, V, s, device="cpu", dtype=torch.float32, weights="uniform", chunk_size=None,
               repeats=3, warmup=1):
    """Median forward+backward seconds of each path, measured side by side (interleaved) in this process."""
    h, w, t = make_inputs(N, D, V, s, device, dtype)
    steps = {p: make_step(p, weights, chunk_size) for p in paths}
    losses = {}
    for p in paths:
        for _ in range(warmup):
            losses[p] = steps[p](h, w, t)[0].item()
    times = {p: [] for p in paths}
    for _ in range(repeats):
        for p in paths:
            _sync(device)
            t0 = time.perf_counter()
            out = steps[p](h, w, t)
            _sync(device)
            times[p].append(time.perf_counter() - t0)
            del out
    return {p: {"time_s": statistics.median(times[p]), "time_min_s": min(times[p]), "times_s": times[p],
                "loss": losses.get(p)} for p in paths}


def run_one(path, N, D, V, s, device="cpu", dtype=torch.float32, weights="uniform", chunk_size=None,
            repeats=3, warmup=1):
    """One configuration of one path on ``device``: dict with time_s, loss and peak_bytes (in this process)."""
    res = time_paths([path], N, D, V, s, device, dtype, weights, chunk_size, repeats, warmup)[path]
    res["peak_bytes"] = peak_memory_bytes(path, N, D, V, s, device, dtype, weights, chunk_size)
    res.update(path=path, N=N, D=D, V=V, s=s, device=str(device), dtype=str(dtype), weights=weights,
               chunk_size=chunk_size or auto_chunk_size(N, D, V))
    return res


def _memory_in_subprocess(path, args, s):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", path, "--N", str(args.N), "--D", str(args.D),
           "--V", str(args.V), "--s", str(s), "--dtype", args.dtype, "--weights", args.weights]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def bench(args):
    """The full table: for each s, times side by side here and (CPU) each path's peak memory in its own process."""
    rows = []
    for s in args.s:
        times = time_paths(PATHS, args.N, args.D, args.V, s, args.device, _DTYPES[args.dtype], args.weights,
                           args.chunk_size, args.repeats, args.warmup)
        for p in PATHS:
            if args.time_only:
                peak = float("nan")
            elif args.device == "cpu":
                peak = _memory_in_subprocess(p, args, s)
            else:
                peak = peak_memory_bytes(p, args.N, args.D, args.V, s, args.device, _DTYPES[args.dtype],
                                         args.weights, args.chunk_size)
            rows.append(dict(s=s, path=p, peak_bytes=peak, **times[p]))
            print(f"  s={s:<3d} {p:<19s} time {times[p]['time_s']:7.3f} s (min {times[p]['time_min_s']:7.3f})  peak {peak / 2**20:8.1f} MiB  "
                  f"loss {times[p]['loss']:.5f}", flush=True)
    return rows


def summarize(rows):
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32768)
    ap.add_argument("--s", type=int, nargs="+", default=[1, 6, 16])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    ap.add_argument("--weights", default="uniform")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--time-only", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        peak = peak_memory_bytes(args.memory_child, args.N, args.D, args.V, args.s[0], "cpu",
                                 _DTYPES[args.dtype], args.weights, args.chunk_size)
        print(json.dumps({"peak_bytes": peak}))
        return
    print(f"bench/ops.py: N={args.N} D={args.D} V={args.V} s={args.s} device={args.device} dtype={args.dtype} "
          f"weights={args.weights} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"chunk={args.chunk_size or auto_chunk_size(args.N, args.D, args.V)} repeats={args.repeats}", flush=True)
    rows = bench(args)
    print("\n".join(summarize(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
