"""What Ray costs: steps/s of the tiny model in one process vs under TorchTrainer with the Ray Data pipeline.

Both runs train the same config (superposition then recovery, equal FLOPs per step) with the same torch thread
count; the Ray run uses one TorchTrainer worker, the plain run the Ray-free loop, both reading the same token store
(prepared once, before either run). Steady state excludes the first `--warmup` steps; start-up
(ray.init + fit() to first step) is reported separately. Figures are read from each run's metrics.jsonl.

    python bench/overhead.py                # ~3-4 minutes on 2 cores
    python bench/overhead.py --steps 120 --warmup 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def steady_rate(records: list[dict], warmup: int) -> tuple[float, float]:
    """(steps/s, data-wait fraction) between the first logged step >= warmup and the last step."""
    rows = [r for r in records if r.get("kind") != "final" and "elapsed_s" in r]
    start = next(r for r in rows if r["step"] >= warmup)
    end = rows[-1]
    steps = end["step"] - start["step"]
    dt = end["elapsed_s"] - start["elapsed_s"]
    waits = [r["data_wait_frac"] for r in rows if r["step"] > start["step"] and "data_wait_frac" in r]
    return steps / dt, (sum(waits) / len(waits) if waits else float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="output dir (default: a temp dir)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.train.metrics import JsonlWriter
    from pipeline.runner import run_training

    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="tst-overhead-"))
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny.yaml")
    over = [f"train.steps={args.steps}", "train.log_every=5", f"train.eval_every={args.steps}",
            f"train.checkpoint_every={args.steps}", "data.bag_size=4", "train.switch_fraction=0.5",
            f"train.threads={args.threads}", f"run.output_dir={out}", "run.tracking=false",
            "scaling.num_workers=1"] + args.overrides
    cfg = load_config(recipe, over)
    results = {}
    for label, use_ray in (("plain", False), ("ray", True)):
        t0 = time.perf_counter()
        summary = run_training(cfg, use_ray=use_ray, name=f"overhead-{label}", console=False)
        total = time.perf_counter() - t0
        recs = JsonlWriter(os.path.join(out, "runs", f"overhead-{label}", "metrics.jsonl")).read()
        rate, wait = steady_rate(recs, args.warmup)
        # outside the training loop: tokenizer/corpus preparation, ray.init, fit() start-up and teardown
        startup = total - summary["elapsed_s"]
        results[label] = {"steady_steps_per_s": rate, "data_wait_frac": wait, "total_s": total,
                          "startup_s": startup, "train_s": summary["elapsed_s"]}
    ratio = results["ray"]["steady_steps_per_s"] / results["plain"]["steady_steps_per_s"]
    print(f"\n{'path':<28} {'steady steps/s':>15} {'data wait':>10} {'outside loop s':>15} {'total s':>8}")
    for label, name in (("plain", "one process (Ray-free)"), ("ray", "TorchTrainer + Ray Data")):
        r = results[label]
        print(f"{name:<28} {r['steady_steps_per_s']:>15.3f} {100 * r['data_wait_frac']:>9.1f}% "
              f"{r['startup_s']:>15.1f} {r['total_s']:>8.1f}")
    print(f"Ray / plain steady-state ratio: {ratio:.3f} (target >= 0.9); Ray data-wait "
          f"{100 * results['ray']['data_wait_frac']:.1f}% (target < 5%)")
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump({"results": results, "ratio": ratio, "config": over}, f, indent=1)
    print(f"figures: {os.path.join(out, 'overhead.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
