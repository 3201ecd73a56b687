#!/usr/bin/env python
"""The CPU MoE comparison of docs/results.md (issue 16), in one command.

    python bench/moe_compare.py --run        # trains the 4 runs one after another (~90 min on 2 shared, loaded cores)
    python bench/moe_compare.py              # the table and docs/moe_cpu.png from the runs' metrics.jsonl

Runs (all from recipes/tiny.yaml on builtin:wiki: T = 400 steps of 16 x 128 latent positions, lr 1e-3 (the tiny
baseline's best in docs/results.md), 40 warmup steps, WSD decay over the last 10%, Ray-free loop, 1 torch thread):
  tiny-base                 the dense `tiny` baseline
  moe-base                  the `tiny-moe` baseline: 8 experts of 192, top 2 = tiny's active FLOPs per position
  moe-tst-s16-r0.25-power   TST on tiny-moe with the paper's MoE setting: s = 16, r = 0.25, power weights
  moe-tst-s6-r0.3           TST on tiny-moe with the paper's dense setting: s = 6, r = 0.3, uniform weights
Every run costs the same FLOPs per step (within tiny-moe's routers and QK-norms: +0.3%), so equal steps are equal
compute. The figure: next-token validation loss against step, and each MoE run's expert load (the busiest
expert's share of the interval's token assignments over the ideal 1/E, max over layers; per layer thin) per
10-step logging interval, with the switch marked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = "outputs/moe_cpu"
COMMON = ["--no-ray", "--config", "recipes/tiny.yaml", "train.steps=400", "train.lr=1e-3", "train.warmup_steps=40",
          "train.log_every=10", "train.eval_every=50", "train.checkpoint_every=1000", "train.threads=1",
          "run.tracking=false", f"run.output_dir={OUT}"]
RUNS = {
    "tiny-base": ["model.preset=tiny"],
    "moe-base": ["model.preset=tiny-moe"],
    "moe-tst-s16-r0.25-power": ["model.preset=tiny-moe", "data.bag_size=16", "train.switch_fraction=0.25",
                                "train.loss_weights=power"],
    "moe-tst-s6-r0.3": ["model.preset=tiny-moe", "data.bag_size=6", "train.switch_fraction=0.3"],
}

COLORS = {"tiny-base": "black", "moe-base": "tab:blue", "moe-tst-s16-r0.25-power": "tab:red",
          "moe-tst-s6-r0.3": "tab:orange"}


def read(name: str) -> tuple[list[dict], dict]:
    path = os.path.join(ROOT, OUT, "runs", name)
    recs = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(path, "summary.json"))) if os.path.exists(
        os.path.join(path, "summary.json")) else {}
    return [r for r in recs if r.get("kind") != "final"], summary


def report(png: str, partial: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    print(f"| run | s | r | final val loss | val @ switch | raw tokens | epochs | aux loss (last) | "
          f"expert load max: superposition mean / recovery mean | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in RUNS:
        if not os.path.exists(os.path.join(ROOT, OUT, "runs", name, "metrics.jsonl")):
            continue
        recs, summ = read(name)
        if not partial and not summ:
            print(f"({name}: not finished, left out; --partial shows it)")
            continue
        vals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        color = COLORS[name]
        if vals:
            a.plot(*zip(*vals), label=name, marker=".", color=color)
        vals = vals or [(0, float("nan"))]
        if recs[-1]["step"] < 400:
            name = f"{name} (stopped at step {recs[-1]['step']})"
        sups = [r["step"] for r in recs if r["phase"] == "superposition"]
        sw = summ.get("switch_step") or (max(sups) if sups else 0)  # (a run still in superposition: so far)
        row = [name, str(recs[0]["bag_size"]), "", f"{vals[-1][1]:.4f}", "", f"{recs[-1]['raw_tokens']:,}",
               f"{recs[-1]['epoch']:.2f}", "", "", f"{summ.get('elapsed_s', recs[-1]['elapsed_s']):.0f} s"]
        import yaml

        cfg = yaml.safe_load(open(os.path.join(ROOT, OUT, "runs", name.split(" ")[0], "config.yaml")))
        row[1], row[2] = str(cfg["data"]["bag_size"]), str(cfg["train"]["switch_fraction"] if sw else "")
        if sw:
            at = [v for s, v in vals if s == sw]
            row[4] = f"{at[0]:.4f}" if at else ""
        if "expert_load_max" in recs[-1]:
            steps = [r["step"] for r in recs if "expert_load_max" in r]
            b.plot(steps, [r["expert_load_max"] for r in recs if "expert_load_max" in r], label=name, color=color)
            for key in sorted(k for k in recs[-1] if k.startswith("expert_load_l")):
                b.plot(steps, [r[key] for r in recs if key in r], color=color, lw=0.5, alpha=0.4)
            if sw:
                b.axvline(sw, color=color, ls="--", lw=1)
                a.axvline(sw, color=color, ls="--", lw=1)
            sup = [r["expert_load_max"] for r in recs if r["phase"] == "superposition" and "expert_load_max" in r]
            rec = [r["expert_load_max"] for r in recs if r["phase"] == "recovery" and "expert_load_max" in r]
            row[7] = f"{recs[-1]['moe_aux_loss']:.4f}"
            row[8] = " / ".join(f"{sum(x) / len(x):.2f}" if x else "-" for x in (sup, rec))
        print("| " + " | ".join(row) + " |")
    a.set_xlabel("step")
    a.set_ylabel("next-token validation loss")
    a.set_ylim(top=7.5)
    a.legend(fontsize=8)
    a.set_title("tiny (dense) vs tiny-moe at equal active FLOPs per step")
    b.axhline(1.0, color="grey", lw=0.5)
    b.set_xlabel("step")
    b.set_ylabel("expert load (busiest expert's share x E)")
    b.set_title("expert load per 10-step interval (thin: per layer); dashed: switch")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"figure: {png}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="train the runs first (skips runs that finished)")
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "moe_cpu.png"))
    ap.add_argument("--partial", action="store_true", help="also table and plot runs that have not finished")
    args = ap.parse_args(argv)
    if args.run:
        tst = os.path.join(os.path.dirname(sys.executable), "tst")
        for name, over in RUNS.items():
            if os.path.exists(os.path.join(ROOT, OUT, "runs", name, "summary.json")):
                continue
            subprocess.run([tst, "train", *COMMON, f"run.name={name}", *over], cwd=ROOT, check=True)
    report(args.png, args.partial)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
