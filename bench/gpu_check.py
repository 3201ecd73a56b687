#!/usr/bin/env python
"""The GPU path, checked and measured: one script that proves and times everything that needs a GPU.

Run on one NVIDIA GPU with nothing but Python 3.11+, PyTorch (>= 2.11) and Triton (no Ray, MLflow, yaml,
tokenizers, numpy or network needed at run time); it finishes in under 5 minutes on one H200 (``--max-minutes``,
default 4.5, skips whatever would run late and records it as skipped). It uses the project's own code paths:
``tst_ops`` (fused linear + multi-hot CE, bag embedding; checked by ``tst_ops.check``, measured by ``tst_ops.bench``),
``pipeline.model.transformer`` presets, and the Ray-free training driver ``pipeline.runner.train_in_process`` (the
runner that `tst train --no-ray` uses, on the token store folder directly) with FSDP2 (one rank), bf16 mixed precision
and ``torch.compile`` from ``pipeline.train.parallel``; figures come from the loop's own metrics
(``pipeline.train.metrics.phase_figures``) and the comparison from ``pipeline.study.pair`` (``pipeline.report.curves``).
This script holds the profiles, the time budget, the sections' order and the report; the work is in the package.

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
               in bf16 against float32. Tolerances are ``tst_ops.check.TOL``; the unfused bf16 reference's own error
               is recorded beside the fused one for scale.
  matmul       an 8192^3 bf16 matmul (CUDA events, median): the "measured peak" that MFU is also reported against.
  kernels      N = 16384 positions, D = 2048, V = 131072, s in {1, 6, 16}, bf16: fused vs the efficient unfused
               reference (materialised logits, one log_softmax, a gather): forward + backward time (median of 5
               after 2 warm-ups, CUDA events) and peak memory (``torch.cuda.max_memory_allocated`` over the
               inputs). Per-configuration function: ``tst_ops.bench.measure_loss_config``.
  train        the "125M" preset (then "270M" if time allows) in bf16, FSDP2 on one rank, eager and
               ``torch.compile``: steps/s, latent positions/s, raw tokens/s per phase (superposition should read
               s times the raw tokens of recovery per second), TFLOP/s with the design notes' FLOP count and MFU
               against the datasheet dense bf16 peak (H200: 989 TFLOP/s) and, labelled ``mfu_vs_measured_matmul``,
               against the matmul section. Warm-up / compile intervals are excluded
               (``pipeline.train.metrics.steady_intervals``).
  compare      an equal-FLOPs run pair on the real text of the token store, baseline (r = 0) vs TST (s = 6, r = 0.3), same
               T, batch, L, seed and WSD schedule: validation curves, final validation next-token losses, the
               equal-step difference and the iso-loss figures (``pipeline.study.pair.compare_pair``).
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

Checkpoints are not written in this script (``checkpoints=False``: the loop reports the metrics only): the loop's
DCP checkpointing is disk I/O, tested on CPU, and would pollute the throughput intervals.

The data (``--data``): a token store written by ``tst data prepare`` (the same shards + index every training run
reads), given to the runner as data.source and opened with ``pipeline.data.store_folder_source`` -- PyTorch and the
standard library only; the store's index gives the vocabulary, EOS id and sizes, and every shard is checked against
its sha256 at its first read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tst_ops.bench import free_memory, matmul_rate, measure_loss_config, ratios  # noqa: E402
from tst_ops.check import check_correctness, triton_status  # noqa: E402

SECTIONS = ("env", "correctness", "matmul", "kernels", "train", "compare", "kernels_compiled")

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
# Budget
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



# ---------------------------------------------------------------------------------------------------------------
# Sections: env, correctness, matmul, kernels (tst_ops.check, tst_ops.bench)
# ---------------------------------------------------------------------------------------------------------------
def section_env(ctx: dict) -> dict:
    dev = ctx["device"]
    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "device": str(dev), "mode": ctx["mode"], "triton": triton_status(dev), "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
    }
    if dev.type == "cuda":
        from pipeline.train.metrics import peak_flops_for

        p = torch.cuda.get_device_properties(dev)
        out.update(gpu_name=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count())
        out["datasheet_bf16_peak_tflops"] = (peak_flops_for(p.name) or float("nan")) / 1e12
    try:
        import subprocess

        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - git is optional on the GPU machine
        out["git_commit"] = None
    out["imported_optional_modules"] = {m: m in sys.modules for m in ("ray", "mlflow", "yaml", "tokenizers", "numpy")}
    return out


def section_correctness(ctx: dict) -> dict:
    p = ctx["p"]
    return check_correctness(ctx["device"], rows=p["corr_rows"], dim=p["corr_dim"], vocab=p["corr_vocab"],
                             chunk=p["corr_chunk"], s_values=p["corr_s"], dtypes=p["corr_dtypes"],
                             emb_shape=p["emb_shape"], emb_vocab=p["emb_vocab"], emb_dim=p["emb_dim"])


def section_matmul(ctx: dict) -> dict:
    p = ctx["p"]
    res = matmul_rate(p["mm_n"], ctx["device"], p["mm_reps"])
    ctx["matmul_flops_per_s"] = res.pop("flops_per_s")
    return res


def _kernel_row(ctx: dict, s: int, paths: tuple) -> dict:
    p, dev = ctx["p"], ctx["device"]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n, d, v = p["kern_n"], p["kern_d"], p["kern_v"]
    row: dict[str, Any] = {"s": s, "n": n, "d": d, "v": v, "dtype": str(dtype).replace("torch.", "")}
    for path in paths:
        row[path] = measure_loss_config(n, d, v, s, dtype, dev, path, p["kern_reps"], p["kern_warmup"])
    return row


def section_kernels(ctx: dict) -> dict:
    """Fused vs the eager unfused reference (the compiled reference is the late section `kernels_compiled`)."""
    dev = ctx["device"]
    configs = []
    for s in ctx["p"]["kern_s"]:
        row = _kernel_row(ctx, s, ("fused", "reference"))
        ratios(row, "reference", "reference")
        configs.append(row)
    ctx["kernel_rows"] = configs
    return {"fused_backend": "triton" if triton_status(dev)["available"] else "torch (chunked)", "configs": configs,
            "timing": "CUDA events, median" if dev.type == "cuda" else "wall-clock, median",
            "memory": "torch.cuda.max_memory_allocated above the inputs" if dev.type == "cuda"
            else "not measured on CPU"}


def section_kernels_compiled(ctx: dict) -> dict:
    """The unfused reference under torch.compile (one compile per s), run last: only if time is left."""
    p, dev, budget = ctx["p"], ctx["device"], ctx["budget"]
    if dev.type != "cuda" and not ctx["args"].tiny_compile:
        return {"configs": [], "skipped": ["CPU inductor compiles are skipped in --tiny (pass --tiny-compile)"]}
    fused = {r["s"]: r["fused"] for r in ctx.get("kernel_rows", [])}
    configs, skipped = [], []
    for i, s in enumerate(p["kern_s"]):
        if not budget.allows(p["est_s"]["kernels_compiled"] if i == 0 else p["est_s"]["kernels_compiled"] / 2):
            skipped.append(f"s={s}: over budget ({budget.left():.0f} s left)")
            continue
        row = _kernel_row(ctx, s, ("reference_compiled",))
        if s in fused:
            row["fused"] = fused[s]
            ratios(row, "reference_compiled", "compiled_reference")
        configs.append(row)
    torch._dynamo.reset()
    return {"configs": configs, "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------------
# Sections: train, compare (the runner's Ray-free driver on the store folder)
# ---------------------------------------------------------------------------------------------------------------
def train_run(ctx: dict, **run) -> dict:
    """One run of `pipeline.study.pair.train_run` on the store: FSDP2 on one rank, no checkpoint writes."""
    from pipeline.study.pair import train_run as train

    return train(ctx["args"].data, ctx["data"]["vocab_size"], device=ctx["device"], out_dir=ctx["tmp"],
                 threads=ctx["p"].get("threads"), console=ctx["args"].verbose, **run)


def section_train(ctx: dict) -> dict:
    from pipeline.train.metrics import phase_figures

    p, budget, args = ctx["p"], ctx["budget"], ctx["args"]
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
            sup = phase_figures(run["records"], "superposition", matmul)
            rec = phase_figures(run["records"], "recovery", matmul)
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


def section_compare(ctx: dict) -> dict:
    from pipeline.study.pair import compare_pair

    p, args = ctx["p"], ctx["args"]
    steps = args.compare_steps or p["cmp_steps"]
    comp = bool(ctx.get("compile_ok")) and not args.compare_eager
    common = dict(preset=p["cmp_preset"], seq_len=p["cmp_seq"], batch=p["cmp_batch"], steps=steps, compile=comp,
                  log_every=p["cmp_eval_every"], eval_every=p["cmp_eval_every"], lr=p["cmp_lr"],
                  warmup=p["cmp_warmup"], val_windows=p["cmp_val_windows"], seed=0)
    s, r = p["cmp_bag"], p["cmp_r"]
    base = train_run(ctx, name="compare_baseline", switch_fraction=0.0, bag_size=1, **common)
    tst = train_run(ctx, name="compare_tst", switch_fraction=r, bag_size=s, **common)
    res = compare_pair(base, tst)
    settings = dict(common) | {
        "tst_bag_size": s, "tst_switch_fraction": r, "params": tst["params"], "vocab_size": tst["vocab_size"],
        "flops_per_position": tst["flops_per_position"], "positions_per_step": p["cmp_batch"] * p["cmp_seq"],
        "flops_per_run": res.pop("flops_per_run"), "decay_fraction": 0.1, "schedule": "warmup-stable-decay",
        "data": ctx["data"].get("source"), "corpus_train_tokens": ctx["data"]["train_tokens"]}
    return {"settings": settings, **res}


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
        from pipeline.data import store_folder_info

        ctx["data"] = store_folder_info(args.data)
    fns = {"env": section_env, "correctness": section_correctness, "matmul": section_matmul,
           "kernels": section_kernels, "train": section_train, "compare": section_compare,
           "kernels_compiled": section_kernels_compiled}
    report: dict[str, Any] = {"mode": mode, "device": str(device), "max_minutes": max_min, "profile": p,
                              "sections": {}, "argv": sys.argv[1:]}
    if ctx.get("data"):
        report["data"] = ctx["data"]
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
        free_memory(device)
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
