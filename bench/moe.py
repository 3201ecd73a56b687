#!/usr/bin/env python
"""An MoE feed-forward layer against a dense one of equal active FLOPs: forward + backward time, side by side.

    python bench/moe.py                      # CPU, 1 thread, the tiny-moe shape and a wider one
    python bench/moe.py --threads 2 --repeats 20

Equal active FLOPs: the dense SwiGLU has intermediate size k * I, the MoE E experts of size I with top-k routing,
so both do 3 matmuls of N x D x (k I) per token batch; the MoE adds the router (N x D x E), the softmax/top-k, the
sort by expert, the gather of the N k rows and the index_add back (pipeline/model/moe.py). Target (issue 16): at most
1.5x the dense time. Above it, the per-operator profile (torch.profiler, one extra forward + backward) says where
the time goes: "matmul" (mm/addmm/bmm/linear), "dispatch" (argsort, bincount, index/gather, index_add, split, cat),
"routing" (softmax, topk, logsumexp), "elementwise" (silu, mul, add, ...), and "other".

Two MoE dispatch paths are timed: `grouped_mm` (torch._grouped_mm, one call per projection, the default where
it takes the shapes) and `loop` (one matmul per expert group in Python, the fallback).
Both layers run in float32 on CPU (bf16 with --dtype bfloat16, where CUDA is used if available: --device cuda).
Timings are medians of --repeats runs after --warmup, same thread count for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.model.transformer import FeedForward  # noqa: E402
import pipeline.model.moe  # noqa: E402
from pipeline.model.moe import MoEFeedForward  # noqa: E402

SHAPES = {  # name: (D, E, k, I, N tokens)
    "tiny-moe": (128, 8, 2, 192, 16 * 128),  # the preset, one step's tokens (batch 16 x seq 128)
    "wide": (512, 8, 2, 512, 4096),
    "granular": (512, 32, 4, 256, 4096),  # more, smaller experts (Qwen3/OLMoE-style granularity)
}

CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_grouped_mm"),
    "dispatch": ("aten::argsort", "aten::sort", "aten::bincount", "aten::index", "aten::index_add", "aten::split",
                 "aten::cat", "aten::gather", "aten::index_select", "aten::scatter", "aten::index_put_",
                 "aten::_index_put_impl_", "aten::index_add_", "aten::new_zeros", "aten::zeros_like"),
    "routing": ("aten::softmax", "aten::_softmax", "aten::topk", "aten::logsumexp", "aten::_softmax_backward_data"),
}


def time_fwd_bwd(layer, x, repeats: int, warmup: int, device) -> list[float]:
    out = []
    for i in range(warmup + repeats):
        xi = x.detach().requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = layer(xi)
        y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
    return out


def profile(layer, x) -> dict[str, float]:
    """Self CPU time per category of one forward + backward (ms)."""
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        xi = x.detach().requires_grad_()
        y = layer(xi)
        y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()
    cats = {k: 0.0 for k in (*CATEGORIES, "elementwise/other")}
    for ev in p.key_averages():
        name = ev.key
        base = name.replace("Backward0", "").replace("Backward1", "")
        for cat, names in CATEGORIES.items():
            if name in names or any(base.lower().endswith(n.split("::")[1]) for n in names if "::" in n):
                cats[cat] += ev.self_cpu_time_total / 1e3
                break
        else:
            cats["elementwise/other"] += ev.self_cpu_time_total / 1e3
    return cats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    load0 = os.getloadavg()[0]
    rows = []
    print(f"forward + backward, median of {args.repeats}, {args.threads} thread(s), {args.dtype} on {device}; "
          f"load {load0:.1f}")
    print(f"{'shape':10s} {'D':>5s} {'E':>4s} {'k':>3s} {'I':>5s} {'N':>6s} {'dense ms':>9s} {'MoE ms':>9s} "
          f"{'ratio':>6s} {'loop ms':>9s} {'ratio':>6s}")
    for name in args.shapes.split(","):
        D, E, k, I, N = SHAPES[name]
        cfg = SimpleNamespace(hidden_size=D, intermediate_size=k * I, num_experts=E, experts_per_token=k,
                              moe_intermediate_size=I)
        torch.manual_seed(0)
        dense = FeedForward(cfg).to(device, dtype)
        moe = MoEFeedForward(cfg).to(device, dtype)
        with torch.no_grad():
            for p in (*dense.parameters(), *moe.parameters()):
                p.normal_(0, 0.02)
        x = torch.randn(1, N, D, device=device, dtype=dtype)
        # interleave the three so that machine load hits them alike
        td, tm, tl = [], [], []
        auto = pipeline.model.moe.use_grouped_mm
        for _ in range(3):
            td += time_fwd_bwd(dense, x, args.repeats // 3 or 1, args.warmup, device)
            tm += time_fwd_bwd(moe, x, args.repeats // 3 or 1, args.warmup, device)
            pipeline.model.moe.use_grouped_mm = lambda x, w13: False
            tl += time_fwd_bwd(moe, x, args.repeats // 3 or 1, args.warmup, device)
            pipeline.model.moe.use_grouped_mm = auto
        d_ms, m_ms, l_ms = (statistics.median(t) * 1e3 for t in (td, tm, tl))
        row = {"shape": name, "D": D, "E": E, "k": k, "I": I, "N": N, "dense_ms": d_ms, "moe_ms": m_ms,
               "ratio": m_ms / d_ms, "moe_path": "grouped_mm" if auto(x.reshape(N, D), moe.w13) else "loop",
               "moe_loop_ms": l_ms, "loop_ratio": l_ms / d_ms}
        if device.type == "cpu":
            row["moe_profile_ms"] = profile(moe, x)
            row["dense_profile_ms"] = profile(dense, x)
        rows.append(row)
        print(f"{name:10s} {D:5d} {E:4d} {k:3d} {I:5d} {N:6d} {d_ms:9.2f} {m_ms:9.2f} {m_ms / d_ms:6.2f} "
              f"{l_ms:9.2f} {l_ms / d_ms:6.2f}   (MoE path: {row['moe_path']})")
    if device.type == "cpu":
        print("\nwhere the time goes (self CPU ms of one forward + backward, torch.profiler):")
        for r in rows:
            for kind in ("dense", "moe"):
                prof_ms = r[f"{kind}_profile_ms"]
                print(f"  {r['shape']:10s} {kind:5s} " + "  ".join(f"{c} {v:7.2f}" for c, v in prof_ms.items()))
    load1 = os.getloadavg()[0]
    print(f"load before/after: {load0:.1f} / {load1:.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": args.threads, "dtype": args.dtype, "device": str(device),
                       "load": [load0, load1], "torch": torch.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
