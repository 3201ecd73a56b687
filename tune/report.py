"""What a search shows: the (s, r) table like the paper's Tables 4-7 (s down, r across), the best setting, its
loss against the baseline's and the equal-FLOPs gain in nats; the results CSV, a heatmap of final validation
loss over (s, r) and the loss curves of the best trial against the baseline, all logged to the parent run.

Reading the table: every cell is the final next-token validation loss after the same T optimizer steps on the
same latent positions per step (equal FLOPs). The baseline (s = 1, or r = 0: no superposition step) is one run,
shown in the whole s = 1 row and the whole r = 0 column. A cell marked `*` is a trial the scheduler stopped
early (its last validation loss, at fewer steps: not comparable, never picked as best); `err` a failed trial;
`-` a trial not run (yet). The gain is baseline loss minus best loss (positive: TST lower).

matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Optional

from pipeline.config import Config
from tune.space import R_KEY, S_KEY, W_KEY, is_baseline, point_label, trial_label


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def collect_rows(exp_dir: str, base: Config, varying: list[str], points: Optional[list] = None,
                 expected: Optional[int] = None) -> list[dict]:
    """One row per trial, read back from the search's saved state on disk (not the in-memory ResultGrid: after a
    Ctrl+C Tune's cleanup marks the trials it killed as terminated in memory, while the saved state keeps them
    PENDING/RUNNING, which is what a restore resumes). Completed from each run's own summary.json. Grid points
    Tune has not created yet (it generates trials lazily) and samples not drawn yet are rows with status
    `pending`."""
    import json
    import logging

    from ray.tune import ExperimentAnalysis

    base_flat = base.flatten()
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = log.level
    log.setLevel(logging.ERROR)  # never-started trials have no result.json yet: not a problem here
    try:
        trials = ExperimentAnalysis(exp_dir).trials
    finally:
        log.setLevel(level)
    rows = []
    search = None
    for tr in trials:
        meta, trial = tr.config.get("tst", {}), tr.config.get("trial", {})
        search = meta.get("search", search)
        m = dict(tr.last_result or {})
        ov = dict(trial.get("overrides", {}))
        label = trial_label(trial, tr.trial_id, varying, base_flat)
        run_name = m.get("run_name") or f"{search}-{label}"
        row: dict[str, Any] = {
            "label": label, "run_name": run_name, "trial_id": tr.trial_id,
            "s": int(ov.get(S_KEY, base_flat[S_KEY])), "r": float(ov.get(R_KEY, base_flat[R_KEY])),
        }
        for k in varying:
            if k not in (S_KEY, R_KEY):
                row[k] = ov.get(k, base_flat.get(k))
        row["baseline"] = is_baseline(ov, base_flat)
        if tr.status == "ERROR":
            status = "error"
        elif m.get("final"):
            status = "finished"
        elif tr.status == "TERMINATED":
            status = "stopped"  # ended without its final report: cut by the scheduler
        else:
            status = "running" if m.get("val_loss") is not None else "pending"
        row["status"] = status
        row["last_step"] = m.get("step")
        row["last_val_loss"] = m.get("val_loss")
        row["final_val_loss"] = m.get("val_loss") if status == "finished" else None
        summ_path = os.path.join(base.run.output_dir, "runs", run_name, "summary.json")
        if os.path.exists(summ_path) and status == "finished":
            with open(summ_path) as f:
                sj = json.load(f)
            row["final_val_loss"] = sj.get("final_val_loss", row["final_val_loss"])
            for k in ("raw_tokens", "wall_s", "epochs", "mlflow_run_id"):
                row[k] = sj.get(k)
        for k in ("raw_tokens", "wall_s", "epochs", "mlflow_run_id"):
            if row.get(k) in (None, "") and m.get(k) not in (None, ""):
                row[k] = m.get(k)
        row["run_dir"] = os.path.join(base.run.output_dir, "runs", run_name)
        row["error"] = ""
        if status == "error":
            err = os.path.join(tr.local_path or "", "error.txt")
            if os.path.exists(err):
                with open(err) as f:
                    lines = [x for x in f.read().splitlines() if x.strip()]
                row["error"] = (lines[-1] if lines else "")[:300]
        rows.append(row)
    rows += _not_started(rows, search, base_flat, varying, points, expected)
    rows.sort(key=lambda r: (r.get("placeholder", False), not r["baseline"], r["s"], r["r"],
                             str([r.get(k) for k in varying])))
    return rows


def _not_started(rows: list[dict], search: Optional[str], base_flat: dict, varying: list[str],
                 points: Optional[list], expected: Optional[int]) -> list[dict]:
    """Rows with status `pending` for the grid points Tune has not created yet and the samples not drawn yet."""
    rows, started = list(rows), len(rows)
    have = {r["label"] for r in rows}
    for p in points or []:  # grid points not created yet
        label = point_label(p, varying, base_flat)
        if label not in have:
            rows.append({"label": label, "run_name": f"{search}-{label}", "trial_id": None,
                         "s": int(p.get(S_KEY, base_flat[S_KEY])), "r": float(p.get(R_KEY, base_flat[R_KEY])),
                         **{k: p.get(k, base_flat.get(k)) for k in varying if k not in (S_KEY, R_KEY)},
                         "baseline": is_baseline(p, base_flat), "status": "pending", "last_step": None,
                         "last_val_loss": None, "final_val_loss": None, "run_dir": "", "error": ""})
    for i in range(max(0, (expected or 0) - len(rows))):  # samples not drawn yet
        rows.append({"label": f"(sample {len(rows) + 1})", "run_name": "", "trial_id": None, "s": 0, "r": 0.0,
                     "baseline": False, "status": "pending", "last_step": None, "last_val_loss": None,
                     "final_val_loss": None, "run_dir": "", "error": "", "placeholder": True})
    return rows[started:]


def _others(varying: list[str]) -> list[str]:
    """Searched keys besides s and r: each combination of their values gets its own table."""
    return [k for k in varying if k not in (S_KEY, R_KEY)]


def _combo_key(row: dict, keys: list[str], baseline: bool) -> tuple:
    # the baseline does not depend on the slot weights: one baseline serves every weight scheme's table
    return tuple(None if (baseline and k == W_KEY) else row.get(k) for k in keys)


def _pick(cands: list[dict]) -> Optional[dict]:
    """The row a table cell shows: the best finished trial, else the best stopped one, else any."""
    fin = [c for c in cands if c["status"] == "finished" and _finite(c["final_val_loss"])]
    if fin:
        return min(fin, key=lambda c: c["final_val_loss"])
    stp = [c for c in cands if c["status"] == "stopped" and _finite(c.get("last_val_loss"))]
    if stp:
        return min(stp, key=lambda c: c["last_val_loss"])
    return cands[0] if cands else None


def summarize(rows: list[dict], base: Config, varying: list[str], mode: str = "grid") -> dict:
    """Best finished trial, its baseline (same lr etc.), the gain, and the (s, r) tables: in grid mode one per
    combination of the other searched keys (e.g. per lr); in sample mode one table whose cells hold the best
    trial at that (s, r) over the other keys."""
    others = _others(varying)
    finished = [r for r in rows if r["status"] == "finished" and _finite(r["final_val_loss"])]
    baselines = [r for r in finished if r["baseline"]]
    tst = [r for r in finished if not r["baseline"]]
    # "best": the best TST setting (what a user is searching for), even when the baseline beats it
    best = min(tst or finished, key=lambda r: r["final_val_loss"]) if finished else None
    ref = None
    if best is not None and baselines:
        same = [b for b in baselines if all(b.get(k) == best.get(k) for k in others if k != W_KEY)]
        ref = min(same or baselines, key=lambda r: r["final_val_loss"])
    gain = (ref["final_val_loss"] - best["final_val_loss"]) if (best and ref) else None
    real = [r for r in rows if not r.get("placeholder")]
    table_keys = others if mode == "grid" else []
    combos = []
    for r in real:
        c = _combo_key(r, table_keys, r["baseline"]) if not r["baseline"] else None
        if c is not None and c not in combos:
            combos.append(c)
    if not combos and real:
        combos = [tuple(None for _ in table_keys)]
    s_vals = sorted({r["s"] for r in real} | {1})
    r_vals = sorted({r["r"] for r in real} | {0.0})
    tables = []
    for combo in combos:
        combo_d = {k: v for k, v in zip(table_keys, combo) if v is not None}
        match = lambda x, skip_w=False: all(x.get(k) == v for k, v in combo_d.items() if not (skip_w and k == W_KEY))
        base_row = _pick([b for b in real if b["baseline"] and match(b, skip_w=True)])
        cells = []
        for sv in s_vals:
            cells.append([base_row if (sv == 1 or rv == 0.0) else
                          _pick([x for x in real if not x["baseline"] and x["s"] == sv and x["r"] == rv and match(x)])
                          for rv in r_vals])
        tables.append({"combo": combo_d, "s": s_vals, "r": r_vals, "cells": cells, "baseline": base_row})
    return {
        "best": best, "baseline": ref, "gain_nats": gain, "tables": tables,
        "finished": len(finished), "stopped": sum(r["status"] == "stopped" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "pending": sum(r["status"] in ("pending", "running") for r in rows), "trials": len(rows),
        "tabular": len(s_vals) <= 12 and len(r_vals) <= 12, "mode": mode,
    }


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return "-"
    if row["status"] == "finished" and _finite(row["final_val_loss"]):
        return f"{row['final_val_loss']:.4f}"
    if row["status"] == "stopped" and _finite(row.get("last_val_loss")):
        return f"*{row['last_val_loss']:.4f}"
    if row["status"] == "error":
        return "err"
    return "-"


def _setting(row: dict, varying: list[str]) -> str:
    if row["baseline"]:
        desc = "baseline (s=1, r=0)"
    else:
        desc = f"s={row['s']}, r={row['r']:g}"
    extra = [f"{k.split('.')[-1]}={row.get(k)}" for k in _others(varying) if not (row["baseline"] and k == W_KEY)]
    return desc + (", " + ", ".join(extra) if extra else "")


def render(summary: dict, rows: list[dict], base: Config, name: str, mode: str, interrupted: bool,
           varying: list[str]) -> str:
    t = base.train
    out = [f"Search '{name}': final validation next-token loss (nats) after T={t.steps} steps, equal FLOPs per "
           f"step ({t.global_batch_size}x{base.data.seq_len} latent positions, {base.model.preset} model)"]
    if summary["tabular"]:
        for tab in summary["tables"]:
            if tab["combo"]:
                out.append("  " + ", ".join(f"{k} = {v}" for k, v in tab["combo"].items()))
            width = 9
            corner = "s \\ r"
            head = f"{corner:>6} |" + "".join(f"{rv:>{width}g}" for rv in tab["r"])
            out.append(head)
            out.append("-" * 7 + "+" + "-" * (width * len(tab["r"])))
            for s, line in zip(tab["s"], tab["cells"]):
                out.append(f"{s:>6} |" + "".join(f"{_cell(c):>{width}}" for c in line))
        notes = ["the baseline (s=1 / r=0, no superposition step) is one run, shown in the s=1 row and r=0 column"]
        if mode == "sample" and _others(varying):
            notes.append("each cell: the best trial at that (s, r) over " + ", ".join(_others(varying)))
        if summary["stopped"]:
            notes.append("* = stopped early by the scheduler (last val_loss at fewer steps; not comparable)")
        out.append("(" + "; ".join(notes) + ")")
    if mode == "sample" or not summary["tabular"]:
        fin = sorted([r for r in rows if r["status"] == "finished"], key=lambda r: r["final_val_loss"])
        out.append(f"{'rank':>4}  {'setting':<40} {'final val loss':>14}")
        for i, r in enumerate(fin[:10], 1):
            out.append(f"{i:>4}  {_setting(r, varying):<40} {r['final_val_loss']:>14.4f}")
    best, ref, gain = summary["best"], summary["baseline"], summary["gain_nats"]
    if best is None:
        out.append("best: no trial finished")
    elif ref is None:
        out.append(f"best: {_setting(best, varying)}: {best['final_val_loss']:.4f} (no finished baseline to compare)")
    elif best is ref:
        out.append(f"best: {_setting(best, varying)}: {best['final_val_loss']:.4f} (no TST trial finished)")
    else:
        verdict = ("TST lower" if gain > 0 else
                   "baseline lower: no TST setting beat the baseline in this search" if gain < 0 else "tie")
        out.append(f"best: {_setting(best, varying)}: {best['final_val_loss']:.4f} vs baseline "
                   f"{ref['final_val_loss']:.4f}: equal-FLOPs gain {gain:+.4f} nats ({verdict})")
    out.append(f"trials: {summary['finished']} finished, {summary['stopped']} stopped early, {summary['errors']} "
               f"failed, {summary['pending']} not finished{' (search interrupted)' if interrupted else ''}")
    return "\n".join(out)


CSV_FIELDS = ["label", "run_name", "s", "r", "baseline", "status", "final_val_loss", "last_step", "last_val_loss",
              "delta_vs_baseline", "raw_tokens", "epochs", "wall_s", "trial_id", "mlflow_run_id", "error"]


def write_artifacts(exp_dir: str, rows: list[dict], summary: dict, text: str, name: str) -> dict:
    """results.csv, table.txt, heatmap PNG(s) and the best-vs-baseline curves PNG under <search dir>/report/."""
    out = os.path.join(exp_dir, "report")
    os.makedirs(out, exist_ok=True)
    arts = {}
    extra = sorted({k for r in rows for k in r if "." in k})
    ref = summary.get("baseline")
    path = os.path.join(out, "results.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS[:4] + extra + CSV_FIELDS[4:], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            row = dict(r)
            if ref and _finite(r.get("final_val_loss")):
                row["delta_vs_baseline"] = r["final_val_loss"] - ref["final_val_loss"]
            w.writerow(row)
    arts["csv"] = path
    path = os.path.join(out, "table.txt")
    with open(path, "w") as f:
        f.write(text + "\n")
    arts["table"] = path
    heat = heatmaps(summary, out, name)
    if heat:
        arts["heatmaps"] = heat
    curves = best_vs_baseline_png(summary, os.path.join(out, "best_vs_baseline.png"), name)
    if curves:
        arts["curves"] = curves
    return arts


def heatmaps(summary: dict, out_dir: str, name: str) -> list[str]:
    if not summary["tabular"] or not summary["tables"]:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except Exception:
        return []
    paths = []
    for i, tab in enumerate(summary["tables"]):
        vals = np.full((len(tab["s"]), len(tab["r"])), np.nan)
        for a, line in enumerate(tab["cells"]):
            for b, c in enumerate(line):
                if c is not None and c["status"] == "finished" and _finite(c["final_val_loss"]):
                    vals[a, b] = c["final_val_loss"]
        fig, ax = plt.subplots(figsize=(1.2 * len(tab["r"]) + 2.5, 0.7 * len(tab["s"]) + 1.8))
        im = ax.imshow(vals, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(tab["r"])), [f"{r:g}" for r in tab["r"]])
        ax.set_yticks(range(len(tab["s"])), [str(s) for s in tab["s"]])
        ax.set_xlabel("switch fraction r")
        ax.set_ylabel("bag size s")
        for a in range(vals.shape[0]):
            for b in range(vals.shape[1]):
                txt = _cell(tab["cells"][a][b])
                ax.text(b, a, txt, ha="center", va="center", fontsize=8,
                        color="white" if np.isfinite(vals[a, b]) and vals[a, b] > np.nanmean(vals) else "black")
        combo = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in tab["combo"].items())
        ax.set_title(f"{name}: final val loss (nats){' — ' + combo if combo else ''}", fontsize=9)
        fig.colorbar(im, ax=ax, label="val loss")
        fig.tight_layout()
        suffix = "" if len(summary["tables"]) == 1 else f"-{i}"
        p = os.path.join(out_dir, f"heatmap{suffix}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _history(run_dir: str) -> list[dict]:
    from pipeline.train.metrics import JsonlWriter

    return [r for r in JsonlWriter(os.path.join(run_dir, "metrics.jsonl")).read() if r.get("kind") != "final"]


def best_vs_baseline_png(summary: dict, path: str, name: str) -> Optional[str]:
    best, ref = summary.get("best"), summary.get("baseline")
    if not best or not ref:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    runs = [(ref, "baseline", "C0")] + ([] if best is ref else [(best, f"best: s={best['s']}, r={best['r']:g}", "C3")])
    switch = None
    for row, label, color in runs:
        hist = _history(row["run_dir"])
        val = sorted({r["step"]: r["val_loss"] for r in hist if r.get("val_loss") is not None}.items())
        if val:
            ax.plot(*zip(*val), "o-", color=color, label=f"{label}: validation next-token loss")
        rec = sorted({r["step"]: r["train_loss"] for r in hist if r.get("phase") == "recovery"
                      and r.get("train_loss") is not None}.items())
        if rec:
            ax.plot(*zip(*rec), "-", color=color, alpha=0.3, label=f"{label}: train loss (next-token)")
        if row is best and best is not ref:
            switch = next((h.get("switch_step") for h in _history(row["run_dir"]) if h.get("switch_step")), None)
            if switch is None:
                from tst_ops.schedule import switch_step

                steps = max((h["step"] for h in hist), default=0)
                switch = switch_step(steps, row["r"]) if steps else None
    if switch:
        ax.axvline(switch, color="gray", ls="--", label=f"switch of the best (step {switch})")
    ax.set_xlabel("optimizer step (equal FLOPs per step)")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{name}: best trial vs baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def close_stale_children(tracking_uri: str, parent_run_id: str, stopped: Optional[list] = None) -> list[str]:
    """Children still RUNNING once the search has returned belong to trial processes that are gone (a trial Tune
    stopped and killed, an interrupted search): close them KILLED (a resumed trial reopens its run). Trials the
    scheduler stopped are tagged `tst.tune.stopped_early`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    kids = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    stopped = set(stopped or [])
    closed = []
    for r in kids:
        if r.data.tags.get("tst.run_name") in stopped:
            client.set_tag(r.info.run_id, "tst.tune.stopped_early", "true")
        if r.info.status == "RUNNING":
            client.set_tag(r.info.run_id, "tst.tune.closed_by", "driver: the trial process ended without closing it")
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
    return closed


def log_parent(tracker, summary: dict, artifacts: dict) -> None:
    best, ref = summary.get("best"), summary.get("baseline")
    metrics = {"trials_finished": summary["finished"], "trials_stopped": summary["stopped"],
               "trials_failed": summary["errors"], "search_wall_s": summary.get("wall_s", 0.0)}
    if best:
        metrics.update({"best_val_loss": best["final_val_loss"], "best_s": best["s"], "best_r": best["r"]})
    if ref:
        metrics["baseline_val_loss"] = ref["final_val_loss"]
    if summary.get("gain_nats") is not None:
        metrics["gain_nats"] = summary["gain_nats"]
    tracker.log_metrics(metrics, step=0)
    if best:
        tracker.set_tags({"tst.tune.best": best["label"], "tst.tune.best_run": best["run_name"]})
    for key, p in artifacts.items():
        for path in (p if isinstance(p, list) else [p]):
            tracker.log_artifact(path)
