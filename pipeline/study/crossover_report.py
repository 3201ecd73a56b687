"""The crossover study's report (pipeline/study/crossover.py): crossover.csv, crossover.md and crossover.png from
the run folders on disk, whatever part of the plan has run (bench/crossover.py --report-only redraws it).

Why separate: the report reads only finished runs and their cached comparisons, so it can be rebuilt at any time
(and mid-study) without the scheduler; and every number in it is traceable to a run folder.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time

from pipeline.study import crossover as X

CSV_KEYS = ("size", "params", "params_non_embedding", "T", "seed", "lr", "variant", "s", "r", "tst_loss",
            "baseline_loss", "diff_nats", "speedup_steps", "baseline_steps_needed", "speedup_wall", "speedup_flops",
            "tst_wall_s", "chosen_on", "tst_run")


def _rows(out: str, corpus: str, sizes) -> list[dict]:
    rows = []
    for z in sizes:
        for T in (X.T_FIRST, X.T_SECOND):
            for seed in X.SEEDS:
                for variant in ("paper", "best"):
                    r = X.compare_cell(out, corpus, z, seed, T, variant)
                    if r is not None:
                        rows.append(r)
    return rows


def _fmt(xs, nd=3, signed=True) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "not measured"
    f = f"{{:+.{nd}f}}" if signed else f"{{:.{nd}f}}"
    if len(xs) == 1:
        return f.format(xs[0]) + " (1 seed)"
    return f"{f.format(statistics.mean(xs))} ± {statistics.stdev(xs):.{nd}f} ({len(xs)} seeds)"


def _loss(out, name, steps):
    s = X.finished(out, name, steps)
    return None if s is None else s["final_val_loss"]


def _ledger(res_dir: str) -> tuple[float, list[dict]]:
    recs = X.read_ledger(os.path.join(res_dir, "ledger.jsonl"))
    return sum(r["wall_s"] for r in recs), recs


def _cpu(recs) -> str:
    """Process CPU of the finished jobs that recorded it (stopped jobs and older records have none)."""
    known = [r["cpu_s"] for r in recs if r.get("cpu_s") is not None]
    return f"{sum(known) / 3600:.2f} h of process CPU over the {len(known)} finished jobs that recorded it"


def write_report(out: str, corpus: str, sizes, res_dir: str, *, spent_s: float = 0.0, command: str = "") -> dict:
    os.makedirs(res_dir, exist_ok=True)
    X.restore_runs(out, res_dir)  # a fresh checkout: the committed archive of finished runs
    rows = _rows(out, corpus, sizes)
    with open(os.path.join(res_dir, "crossover.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    total_s, recs = _ledger(res_dir)
    L = [f"# Crossover map: results on disk ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
         f"Written by `pipeline.study.crossover_report` from `{out}`; command: `{command}`.", "",
         f"Time in the ledger (one-thread jobs): {total_s / 3600:.2f} h of wall-clock over {len(recs)} job runs "
         f"(this invocation {spent_s / 3600:.2f} h), {_cpu(recs)}.", ""]
    # the lr search
    L += ["## Baseline learning-rate search (T = 600, seed 0, final val loss)", "",
          "| size | params (non-emb) | " + " | ".join(f"lr {lr:g}" for lr in X.LRS) + " | chosen |",
          "|---|---|" + "---|" * len(X.LRS) + "---|"]
    for z in sizes:
        pm = X.params_of(z)
        ls = [_loss(out, X.lrsearch_name(z, lr), X.T_FIRST) for lr in X.LRS]
        ch = X.chosen_lr(out, z)
        edge = " (at the edge of the grid)" if ch in (X.LRS[0], X.LRS[-1]) else ""
        L.append(f"| {z} | {pm['params'] / 1e6:.2f}M ({pm['params_non_embedding'] / 1e6:.2f}M) | " +
                 " | ".join("not run" if v is None else f"{v:.4f}" for v in ls) +
                 f" | {'-' if ch is None else f'{ch:g}{edge}'} |")
    # the TST grid
    L += ["", "## TST grid (T = 600, seed 0, at the baseline's chosen lr; final val loss)", "",
          "| size | " + " | ".join(f"s={s}, r={r:g}" + (" (paper)" if (s, r) == X.PAPER else "")
                                   for s, r in X.GRID) + " | own best |", "|---|" + "---|" * (len(X.GRID) + 1)]
    for z in X.grid_sizes(sizes):
        lr = X.chosen_lr(out, z)
        ls = [None if lr is None else _loss(out, X.tst_name(z, 0, lr, s, r, X.T_FIRST), X.T_FIRST)
              for s, r in X.GRID]
        b = None if lr is None else X.chosen_tst(out, z, lr)
        L.append(f"| {z} | " + " | ".join("not run" if v is None else f"{v:.4f}" for v in ls) +
                 f" | {'-' if b is None else f's={b[0]}, r={b[1]:g}'} |")
    # the map
    L += ["", "## The map: size x T (positive difference = TST better; speedup = baseline steps to TST's loss / T)",
          "", "| size | non-emb params | T | TST setting | baseline − TST (nats) | iso-loss speedup, steps | "
              "wall-clock | seeds |", "|---|---|---|---|---|---|---|---|"]
    for z in sizes:
        pm = X.params_of(z)
        for T in (X.T_FIRST, X.T_SECOND):
            for variant in ("paper", "best"):
                rs = [r for r in rows if r["size"] == z and r["T"] == T and r["variant"] == variant]
                if not rs:
                    continue
                sr = f"s={rs[0]['s']}, r={rs[0]['r']:g}"
                label = ("paper " if variant == "paper" else "own best ") + sr
                L.append(f"| {z} | {pm['params_non_embedding'] / 1e6:.2f}M | {T} | {label} | "
                         f"{_fmt([r['diff_nats'] for r in rs])} | {_fmt([r['speedup_steps'] for r in rs], 2, False)} "
                         f"| {_fmt([r['speedup_wall'] for r in rs], 2, False)} | "
                         f"{', '.join(str(r['seed']) for r in rs)} |")
    if not rows:
        L.append("| (no cell finished yet) | | | | | | | |")
    L += ["", "± is the sample standard deviation over the seeds listed (the standard error of their mean is that "
              "divided by √n). Wall-clock speedups come from two jobs sharing 2 cores with other users' work: noisy; "
              "the steps and FLOPs ratios do not depend on load.", ""]
    L += _switch_curves(out, corpus, sizes)
    # plan status
    jobs, blocked = X.plan_jobs(out, corpus, sizes)
    L += ["## Not yet run", ""]
    L += [f"- {j.key} ({j.kind}, phase {j.phase}, {j.steps} steps)" for j in jobs] or ["- (nothing runnable)"]
    L += [f"- blocked: {b}" for b in blocked]
    with open(os.path.join(res_dir, "crossover.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    fig = _figure(rows, sizes, os.path.join(res_dir, "crossover.png"))
    print("\n".join(L), flush=True)
    return {"rows": rows, "figure": fig, "pending": [j.key for j in jobs], "blocked": blocked,
            "ledger_s": total_s}


def _val_curve(out: str, name: str) -> dict:
    """{step: held-out loss} of one run folder's metrics.jsonl (a decay branch's file holds the shared prefix too)."""
    from pipeline.train.metrics import JsonlWriter

    records = JsonlWriter(os.path.join(out, "runs", name, "metrics.jsonl")).read()
    return {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}


def _switch_curves(out: str, corpus: str, sizes) -> list[str]:
    """What the curves say around the switch: baseline − TST (paper setting) held-out loss at every tenth of the run,
    per size and seed, against the cell's own T-step baseline (the same run its final difference uses)."""
    L = []
    for T in (X.T_FIRST, X.T_SECOND):
        curves = []
        for z in sizes:
            lr = X.chosen_lr(out, z)
            for seed in X.SEEDS:
                if lr is None or X.compare_cell(out, corpus, z, seed, T, "paper") is None:
                    continue
                lad = X.ladder(X.base_config(z, seed, out, corpus, lr), z, seed, lr, T)
                base = _val_curve(out, next(b["name"] for b in lad["baselines"] if b["steps"] == T))
                tst = _val_curve(out, X.tst_name(z, seed, lr, *X.PAPER, T))
                curves.append((z, seed, base, tst))
        if curves:
            # columns: the evaluation steps both arms share nearest to each tenth of the run (every 60 steps here:
            # at T = 1500 the tenths fall between evaluations)
            common = sorted(set.intersection(*(set(b) & set(t) for _, _, b, t in curves)))
            cols = sorted({min(common, key=lambda c: abs(c - k * T / 10)) for k in range(1, 11)}) if common else []
            rows = [f"| {z} | {seed} | " + " | ".join(f"{b[c] - t[c]:+.3f}" for c in cols) + " |"
                    for z, seed, b, t in curves]
            sw = round(X.PAPER[1] * T)
            L += [f"## The curves around the switch (T = {T}, paper setting s={X.PAPER[0]}, r={X.PAPER[1]:g}: "
                  f"switch at step {sw})", "",
                  "Baseline − TST held-out loss (nats, positive = TST ahead) at the shared evaluation nearest each "
                  "tenth of the run.", "",
                  "| size | seed | " + " | ".join(f"{c}" + _switch_mark(c, sw, cols) for c in cols) + " |",
                  "|---|---|" + "---|" * len(cols), *rows, ""]
    return L


def _switch_mark(c: int, sw: int, cols) -> str:
    if c == sw:
        return " (switch)"
    after = [x for x in cols if x > sw]
    return " (first after switch)" if sw not in cols and after and c == after[0] else ""


def _figure(rows, sizes, path):
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for T, color in ((X.T_FIRST, "tab:blue"), (X.T_SECOND, "tab:red")):
        for variant, ls in (("paper", "-"), ("best", "--")):
            pts = []
            for z in sizes:
                rs = [r for r in rows if r["size"] == z and r["T"] == T and r["variant"] == variant]
                if rs:
                    d = [r["diff_nats"] for r in rs]
                    sp = [r["speedup_steps"] for r in rs if r["speedup_steps"] is not None]
                    pts.append((rs[0]["params_non_embedding"], statistics.mean(d),
                                statistics.stdev(d) if len(d) > 1 else 0.0,
                                statistics.mean(sp) if sp else math.nan,
                                statistics.stdev(sp) if len(sp) > 1 else 0.0))
            if not pts:
                continue
            x = [p[0] for p in pts]
            lab = f"T={T}, {'paper s=6 r=0.3' if variant == 'paper' else 'TST own best'}"
            axes[0].errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], ls=ls, marker="o", color=color,
                             capsize=3, label=lab)
            axes[1].errorbar(x, [p[3] for p in pts], yerr=[p[4] for p in pts], ls=ls, marker="o", color=color,
                             capsize=3, label=lab)
            if variant == "paper":  # every seed's own point, so that a spread of three is seen as three
                rs = [r for r in rows if r["T"] == T and r["variant"] == variant and r["size"] in sizes]
                axes[0].scatter([r["params_non_embedding"] for r in rs], [r["diff_nats"] for r in rs], s=12,
                                color=color, alpha=0.45, zorder=3)
                axes[1].scatter([r["params_non_embedding"] for r in rs if r["speedup_steps"] is not None],
                                [r["speedup_steps"] for r in rs if r["speedup_steps"] is not None], s=12,
                                color=color, alpha=0.45, zorder=3)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[1].axhline(1, color="grey", lw=0.8)
    for ax, yl in zip(axes, ("baseline − TST final val loss (nats)", "iso-loss speedup in steps (x)")):
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel(yl)
        ax.legend(fontsize=8)
    fig.suptitle("TST vs WSD baselines at equal FLOPs per step "
                 "(error bars: seed sd where measured; dots: each seed, paper setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
