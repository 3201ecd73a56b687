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
The measuring helpers (inputs, paths, timing, peak memory, the summary) are ``tst_ops.bench``; this script is
the command line and the table (``bench(...)``, each path's CPU memory in its own process of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tst_ops import auto_chunk_size  # noqa: E402
from tst_ops.bench import CPU_MEMORY_ENV, PATHS, peak_memory_bytes, summarize, time_paths  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _memory_in_subprocess(path, args, s):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", path, "--N", str(args.N), "--D", str(args.D),
           "--V", str(args.V), "--s", str(s), "--dtype", args.dtype, "--weights", args.weights]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, **CPU_MEMORY_ENV))
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
