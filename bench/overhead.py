"""What Ray costs a user: start-up (command start to first step) and steady-state steps/s of the tiny model,
`tst train --no-ray` (the plain loop) against `tst train` (a local Ray, TorchTrainer, one worker), side by side.

Each run is the real command in a fresh process, so start-up includes Python and library imports, `ray.init`,
the Train controller and worker start, data and model set-up. Both read the same token store (prepared by a
first, unmeasured run) with the same torch thread count. Plain and Ray runs are interleaved in pairs (the order
alternates), so a change of machine load hits both; each figure is the median over the pairs.

- start-up: from launching the command to the start of the first training step: the first record of the run's
  metrics.jsonl, `logged_at` (when it reached the driver) minus `elapsed_s` (the loop's time since its start).
  On the Ray path it includes the record's trip to the controller (at most one poll, 0.5 s).
- start-up's busy CPU-seconds: the whole machine's (/proc/stat, sampled every 0.1 s: Ray's daemons and actors
  included) from launch to the first step, and its CPU floor: those less the background's (3 s measured before the
  pairs), divided by the cores. No overlap of the run's processes starts it sooner than that floor; only less work
  does (pipeline/study/overhead.py). Linux only (nan elsewhere).
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
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    from pipeline.study.overhead import background_busy, run_once

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="output dir (default: a temp dir)")
    ap.add_argument("--by-process", action="store_true",
                    help="also sample each process's CPU (every 0.25 s; costs a little CPU itself) and print where "
                         "start-up's CPU-seconds go")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for both paths")
    args = ap.parse_args()

    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="tst-overhead-"))
    over = ["--config", os.path.join(REPO, "recipes", "tiny.yaml"), f"train.steps={args.steps}", "train.log_every=5",
            f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", "data.bag_size=4",
            "train.switch_fraction=0.5", f"train.threads={args.threads}", "run.tracking=false",
            "scaling.num_workers=1"] + args.overrides
    run_once("plain", "prepare", over + ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"], out,
             args.warmup, cwd=REPO)
    idle = background_busy()
    cores = os.cpu_count() or 1
    print(f"background: {idle:.2f} of {cores} cores busy before the pairs (3 s, nothing of ours running)")
    rows = {"plain": [], "ray": []}
    for i in range(args.pairs):
        for mode in (("plain", "ray") if i % 2 == 0 else ("ray", "plain")):
            r = run_once(mode, f"{mode}-{i}", over, out, args.warmup, cwd=REPO, by_process=args.by_process)
            rows[mode].append(r)
            print(f"pair {i} {mode:<5} first step {r['first_step_s']:6.1f} s ({r['startup_busy_cpu_s']:5.1f} busy "
                  f"CPU-s)  steady {r['steps_per_s']:.3f} steps/s  total {r['total_s']:.1f} s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    keys = ("first_step_s", "startup_busy_cpu_s", "steps_per_s", "total_s")
    med = {m: {k: statistics.median(r[k] for r in rows[m]) for k in keys} for m in rows}
    ratio = med["ray"]["steps_per_s"] / med["plain"]["steps_per_s"]
    overhead_ms = 1000 * (1 / med["ray"]["steps_per_s"] - 1 / med["plain"]["steps_per_s"])
    start_ratio = med["ray"]["first_step_s"] / med["plain"]["first_step_s"]
    # Start-up's CPU floor: its busy CPU-seconds, less the background's, spread over every core with none idle.
    floor = {m: max(med[m]["startup_busy_cpu_s"] - idle * med[m]["first_step_s"], 0.0) / cores for m in med}
    print(f"\nmedian of {args.pairs} interleaved pairs (tiny model, {args.steps} steps, {args.threads} thread(s)):")
    print(f"{'path':<34} {'start -> first step s':>22} {'busy CPU-s':>11} {'CPU floor s':>12} {'steady steps/s':>15} "
          f"{'total s':>8}")
    for mode, label in (("plain", "tst train --no-ray (plain loop)"), ("ray", "tst train (Ray, 1 worker)")):
        m = med[mode]
        print(f"{label:<34} {m['first_step_s']:>22.1f} {m['startup_busy_cpu_s']:>11.1f} {floor[mode]:>12.1f} "
              f"{m['steps_per_s']:>15.3f} {m['total_s']:>8.1f}")
    print(f"start-up: Ray / plain = {start_ratio:.2f}x (target <= 2x); CPU floor of the Ray path / plain start-up = "
          f"{floor['ray'] / med['plain']['first_step_s']:.2f}x on {cores} cores (busy CPU-s less background, / cores: "
          "no overlap of its processes starts it sooner)")
    print(f"steady state: Ray / plain = {ratio:.3f} (target >= 0.9); Ray's per-step overhead {overhead_ms:+.1f} ms")
    if args.by_process:
        print("\nstart-up CPU-s by process (median over the pairs; a process that ended between samples loses up "
              "to 0.25 s):")
        for mode in ("plain", "ray"):
            labels = {k for r in rows[mode] for k in r["startup_cpu_by_process"]}
            med_by = {k: statistics.median(r["startup_cpu_by_process"].get(k, 0.0) for r in rows[mode]) for k in labels}
            print(f"  {mode}: {sum(med_by.values()):.1f} CPU-s in {len(labels)} kinds of process")
            for k, v in sorted(med_by.items(), key=lambda kv: -kv[1]):
                if v >= 0.05:
                    print(f"    {v:6.2f}  {k}")
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump({"pairs": rows, "median": med, "steady_ratio": ratio, "overhead_ms": overhead_ms,
                   "startup_ratio": start_ratio, "startup_cpu_floor_s": floor, "background_busy_cores": idle,
                   "cores": cores, "overrides": over, "loadavg_end": os.getloadavg()}, f, indent=1)
    print(f"figures: {os.path.join(out, 'overhead.json')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
