"""What Ray costs a user: start-up (command start to first step) and steady-state steps/s of the tiny model,
`tst train --no-ray` (the plain loop) against `tst train` (a local Ray, TorchTrainer, one worker), side by side.

Each run is the real command in a fresh process, so start-up includes Python and library imports, `ray.init`,
the Train controller and worker start, data and model set-up. Both read the same token store (prepared by a
first, unmeasured run) with the same torch thread count. Plain and Ray runs are interleaved in pairs (the order
alternates), so a change of machine load hits both; each figure is the median over the pairs.

- start-up: from launching the command to the start of the first training step: the first record of the run's
  metrics.jsonl, `logged_at` (when it reached the driver) minus `elapsed_s` (the loop's time since its start).
  On the Ray path it includes the record's trip to the controller (at most one poll, 0.5 s).
- steady state: steps/s between the first logged step >= --warmup and the last step (the loop's own elapsed_s:
  evaluation and checkpoints excluded by the config below), and the per-step overhead in ms.

    python bench/overhead.py                      # 3 pairs, ~8 minutes on 2 quiet cores
    python bench/overhead.py --pairs 1 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steady_rate(records: list[dict], warmup: int) -> float:
    """Steps/s between the first logged step >= warmup and the last logged step (the loop's elapsed_s)."""
    rows = [r for r in records if r.get("kind") != "final" and "elapsed_s" in r]
    start = next(r for r in rows if r["step"] >= warmup)
    end = rows[-1]
    return (end["step"] - start["step"]) / (end["elapsed_s"] - start["elapsed_s"])


def run_once(mode: str, name: str, overrides: list[str], out: str, warmup: int) -> dict:
    """One `tst train` in a fresh process; its start-up and steady rate from its metrics.jsonl."""
    from pipeline.train.metrics import JsonlWriter

    tst = os.path.join(os.path.dirname(sys.executable), "tst")
    cmd = [tst, "train", "--name", name, *(["--no-ray"] if mode == "plain" else []), *overrides,
           f"run.output_dir={out}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    total = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    recs = [r for r in JsonlWriter(os.path.join(out, "runs", name, "metrics.jsonl")).read() if "step" in r]
    first = next(r for r in recs if r.get("kind") != "final")
    return {"first_step_s": first["logged_at"] - first["elapsed_s"] - t0, "total_s": total,
            "steps_per_s": steady_rate(recs, warmup) if warmup < recs[-1]["step"] else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="output dir (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for both paths")
    args = ap.parse_args()

    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="tst-overhead-"))
    over = ["--config", os.path.join(REPO, "recipes", "tiny.yaml"), f"train.steps={args.steps}", "train.log_every=5",
            f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", "data.bag_size=4",
            "train.switch_fraction=0.5", f"train.threads={args.threads}", "run.tracking=false",
            "scaling.num_workers=1"] + args.overrides
    run_once("plain", "prepare", over + ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"], out,
             args.warmup)
    rows = {"plain": [], "ray": []}
    for i in range(args.pairs):
        for mode in (("plain", "ray") if i % 2 == 0 else ("ray", "plain")):
            r = run_once(mode, f"{mode}-{i}", over, out, args.warmup)
            rows[mode].append(r)
            print(f"pair {i} {mode:<5} first step {r['first_step_s']:6.1f} s  steady {r['steps_per_s']:.3f} steps/s"
                  f"  total {r['total_s']:.1f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rows[m]) for k in ("first_step_s", "steps_per_s", "total_s")}
           for m in rows}
    ratio = med["ray"]["steps_per_s"] / med["plain"]["steps_per_s"]
    overhead_ms = 1000 * (1 / med["ray"]["steps_per_s"] - 1 / med["plain"]["steps_per_s"])
    start_ratio = med["ray"]["first_step_s"] / med["plain"]["first_step_s"]
    print(f"\nmedian of {args.pairs} interleaved pairs (tiny model, {args.steps} steps, {args.threads} thread(s)):")
    print(f"{'path':<34} {'start -> first step s':>22} {'steady steps/s':>15} {'total s':>8}")
    for mode, label in (("plain", "tst train --no-ray (plain loop)"), ("ray", "tst train (Ray, 1 worker)")):
        m = med[mode]
        print(f"{label:<34} {m['first_step_s']:>22.1f} {m['steps_per_s']:>15.3f} {m['total_s']:>8.1f}")
    print(f"start-up: Ray / plain = {start_ratio:.2f}x (target <= 2x)")
    print(f"steady state: Ray / plain = {ratio:.3f} (target >= 0.9); Ray's per-step overhead {overhead_ms:+.1f} ms")
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump({"pairs": rows, "median": med, "steady_ratio": ratio, "overhead_ms": overhead_ms,
                   "startup_ratio": start_ratio, "overrides": over, "loadavg_end": os.getloadavg()}, f, indent=1)
    print(f"figures: {os.path.join(out, 'overhead.json')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
