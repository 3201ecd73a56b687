"""`tst compare TST_RUN BASE_RUN [BASE_RUN ...]`: the paper's Table 1 and Figure 1 for two (or more) runs.

What it reports (all from the validation next-token loss, `val_loss`, which is comparable across both phases;
the training loss of phase 1 is the multi-hot loss and is not):

- the final validation loss of every run (the last evaluation);
- the **equal-step loss difference** in nats: the baseline's validation loss at the TST run's final evaluation
  step (linearly interpolated between the baseline's evaluations) minus TST's final loss; positive = TST better;
- the raw tokens each run consumed (last value of the cumulative `raw_tokens` metric);
- the **iso-loss speedup** (the paper's reading of speedup): the target is the loss TST ends at; the baseline's
  step count at which its loss first reaches the target (linear interpolation between the two evaluations that
  bracket the first crossing) divided by TST's final step. The same crossing gives the wall-clock (`elapsed_s`)
  and FLOPs (cumulative `flops`) speedups: the baseline's `elapsed_s` / `flops` at the crossing (interpolated
  linearly in step between evaluations) over TST's at its final evaluation.
  When the baseline never gets to the target, the speedup is a **lower bound** ("≥"): the baseline's last
  evaluated step (elapsed, FLOPs) over TST's. When the baseline's very first evaluation is already at or below
  the target, the crossing is somewhere before it and the figure is an **upper bound** ("≤").

Which curve of the baseline is used:

- **One baseline**: its whole validation curve. Its intermediate points are *not* LR-decayed (the WSD schedule
  decays only over the last 10% of the run), so they are higher than a fully-trained run of that length would
  reach and the speedup read off them is optimistic. Prefer several baselines when you can afford them.
- **Several baselines** (runs of different lengths T, 1.5T, 2T, ..., each with its own complete warmup-stable-
  decay schedule): only each baseline's FINAL (step, loss) point is used, i.e. the loss a fully-decayed run of
  that length reaches. The points are sorted by final step and the iso-loss point is interpolated linearly
  between the two final points that bracket the first crossing of the target (wall-clock and FLOPs likewise
  between those runs' final `elapsed_s` and `flops`). The equal-step difference uses the baseline whose final
  step equals TST's (the same-length run, as in the paper's Table 1), else the first baseline given.

Which run is TST: the first argument, unless its params say it is not a TST run (`train.switch_fraction` = 0 or
`data.bag_size` = 1) and exactly one of the others is (`train.switch_fraction` > 0 and `data.bag_size` > 1); then
that one is taken as TST and a note says so.

Runs are read from (1) MLflow: a run id, or a run name (`run_name` or the `tst.run_name` tag) searched in the
experiment `--experiment` (default "tst") at `--tracking-uri`, else $MLFLOW_TRACKING_URI, else
`sqlite:///<output-dir>/mlflow.db`; metric histories `val_loss`, `elapsed_s`, `flops`, `raw_tokens` and params
`train.steps`, `train.switch_fraction`, `data.bag_size`; or (2) a run folder `<output_dir>/runs/NAME/`, or any
folder inside it such as a checkpoint (the reader walks up to the folder holding `metrics.jsonl`), reading
`metrics.jsonl` and `config.yaml`. A bare NAME that is not an MLflow run is also looked up as
`<output-dir>/runs/NAME/`.

Outputs: a table on the console, the same figures as JSON (`--json PATH`), and a PNG (`--out PATH`, default
compare.png) with two panels, validation loss against wall-clock and against steps, every run, the TST switch
step marked with a vertical line and the iso-loss point marked. When the TST run came from MLflow, the PNG and
the JSON are logged as artifacts of that run under `compare/` (a failure to log is a warning, not an error).

mlflow, yaml and matplotlib are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.errors import TSTError

METRIC_KEYS = ("val_loss", "elapsed_s", "flops", "raw_tokens")
PARAM_KEYS = ("train.steps", "train.switch_fraction", "data.bag_size", "train.global_batch_size", "data.seq_len")


# ------------------------------------------------------------------------------------------------------------
# Pure numerics (no MLflow, no files)
# ------------------------------------------------------------------------------------------------------------


def interp_at(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """Linear interpolation of y at x over points sorted by x; None when x is outside [xs[0], xs[-1]]."""
    if not xs:
        return None
    if x < xs[0] or x > xs[-1]:
        return None
    for i in range(len(xs)):
        if xs[i] == x:
            return float(ys[i])
        if xs[i] > x:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return None  # unreachable


def first_crossing(losses: Sequence[float], target: float) -> tuple[Optional[int], float]:
    """Where a loss curve first reaches `target` (loss <= target).

    Returns (i, frac): the crossing lies between evaluation i-1 and i at fraction `frac` (0..1] of the way,
    found by linear interpolation of the loss; i = 0 (frac 1.0) when the first evaluation is already at or below
    the target; (None, 0.0) when the curve never gets there.
    """
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return 0, 1.0
            l0 = losses[i - 1]  # l0 > target >= loss, so l0 > loss
            return i, float((l0 - target) / (l0 - loss))
    return None, 0.0


@dataclass
class IsoLoss:
    """The baseline's cost to reach the target loss, and its ratio to TST's cost (one axis)."""

    needed: Optional[float]  # baseline steps / seconds / FLOPs at the crossing (or at its last point)
    tst: Optional[float]  # TST's steps / seconds / FLOPs at its end
    ratio: Optional[float]  # needed / tst
    lower_bound: bool = False  # baseline never reached the target: ratio is ">= ratio"
    upper_bound: bool = False  # baseline's first point is already at/below the target: "<= ratio"

    @property
    def reached(self) -> bool:
        return not self.lower_bound

    def as_dict(self) -> dict:
        return {
            "needed": self.needed,
            "tst": self.tst,
            "ratio": self.ratio,
            "lower_bound": self.lower_bound,
            "upper_bound": self.upper_bound,
            "reached": self.reached,
            "display": fmt_ratio(self),
        }


def iso_loss_speedup(
    base_x: Sequence[float],
    base_losses: Sequence[float],
    target_loss: float,
    tst_x_at_end: Optional[float],
) -> IsoLoss:
    """The baseline's x (steps, wall-clock seconds or FLOPs) needed to reach `target_loss`, over TST's x at its end.

    `base_x` and `base_losses` are the baseline's evaluations in step order (x must increase with step); the
    crossing is the first evaluation at or below the target, interpolated linearly from the one before. If the
    baseline never reaches the target, `needed` is its last x and the ratio is a lower bound.
    """
    if len(base_x) != len(base_losses):
        raise ValueError("base_x and base_losses must have the same length")
    if not base_x:
        return IsoLoss(None, tst_x_at_end, None)
    i, frac = first_crossing(base_losses, target_loss)
    if i is None:
        needed = float(base_x[-1])
        lower, upper = True, False
    elif i == 0:
        needed = float(base_x[0])
        lower, upper = False, True
    else:
        x0, x1 = base_x[i - 1], base_x[i]
        needed = float(x0 + frac * (x1 - x0))
        lower, upper = False, False
    ratio = needed / tst_x_at_end if tst_x_at_end else None
    return IsoLoss(needed, tst_x_at_end, ratio, lower, upper)


def iso_loss_all_axes(
    base_steps: Sequence[float],
    base_losses: Sequence[float],
    target_loss: float,
    tst_step: float,
    base_elapsed: Optional[Sequence[Optional[float]]] = None,
    tst_elapsed: Optional[float] = None,
    base_flops: Optional[Sequence[Optional[float]]] = None,
    tst_flops: Optional[float] = None,
) -> dict[str, IsoLoss]:
    """Steps, wall-clock and FLOPs speedups from one crossing. An axis with a missing value gives ratio None."""
    out = {"steps": iso_loss_speedup(base_steps, base_losses, target_loss, tst_step)}
    for name, bx, tx in (("wall_clock", base_elapsed, tst_elapsed), ("flops", base_flops, tst_flops)):
        if bx is None or tx is None or any(v is None for v in bx) or not len(bx):
            out[name] = IsoLoss(None, tx, None, out["steps"].lower_bound, out["steps"].upper_bound)
        else:
            out[name] = iso_loss_speedup(bx, base_losses, target_loss, tx)
    return out


def equal_step_difference(
    base_steps: Sequence[float], base_losses: Sequence[float], tst_step: float, tst_loss: float
) -> Optional[float]:
    """Baseline validation loss at TST's final step (interpolated) minus TST's loss, in nats; positive = TST
    better. None when the baseline was not evaluated up to that step."""
    b = interp_at(list(base_steps), list(base_losses), tst_step)
    return None if b is None else b - tst_loss


def fmt_ratio(r: IsoLoss) -> str:
    if r.ratio is None:
        return "n/a"
    prefix = "≥ " if r.lower_bound else ("≤ " if r.upper_bound else "")
    return f"{prefix}{r.ratio:.2f}x"


# ------------------------------------------------------------------------------------------------------------
# Runs and readers
# ------------------------------------------------------------------------------------------------------------


@dataclass
class RunCurves:
    """One run's logged curves: metric -> sorted [(step, value)], plus the params compare needs."""

    name: str
    source: str  # "mlflow" | "folder"
    metrics: dict[str, list[tuple[int, float]]]
    params: dict[str, Any] = field(default_factory=dict)
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    path: Optional[str] = None
    phases: list[tuple[int, str]] = field(default_factory=list)  # (step, phase) from metrics.jsonl

    # -- derived -----------------------------------------------------------------------------------------------
    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = self.metrics.get(key, [])
        return [p[0] for p in pts], [p[1] for p in pts]

    def value_at(self, key: str, step: float) -> Optional[float]:
        xs, ys = self.series(key)
        return interp_at(xs, ys, step)

    @property
    def eval_steps(self) -> list[int]:
        return self.series("val_loss")[0]

    @property
    def eval_losses(self) -> list[float]:
        return self.series("val_loss")[1]

    @property
    def final_step(self) -> int:
        if not self.eval_steps:
            raise TSTError(f"run '{self.name}' has no val_loss evaluations to compare")
        return self.eval_steps[-1]

    @property
    def final_loss(self) -> float:
        return self.eval_losses[-1]

    def last(self, key: str) -> Optional[float]:
        pts = self.metrics.get(key)
        return pts[-1][1] if pts else None

    def param(self, key: str, cast=float) -> Any:
        v = self.params.get(key)
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null", "")):
            return None
        try:
            return cast(v)
        except (TypeError, ValueError):
            return None

    @property
    def is_tst(self) -> Optional[bool]:
        """True/False from params (switch_fraction > 0 and bag_size > 1); None when the params are unknown."""
        r = self.param("train.switch_fraction")
        s = self.param("data.bag_size", lambda v: int(float(v)))
        if r is None or s is None:
            return None
        return r > 0 and s > 1

    @property
    def switch_step(self) -> Optional[int]:
        """`floor(r*T + 0.5)` from params; else the last step logged in the superposition phase."""
        r = self.param("train.switch_fraction")
        t = self.param("train.steps", lambda v: int(float(v)))
        if r is not None and t is not None:
            return int(math.floor(r * t + 0.5)) if r > 0 else None
        sup = [st for st, ph in self.phases if ph == "superposition"]
        return max(sup) if sup else None

    def eval_axis(self, key: str) -> Optional[list[Optional[float]]]:
        """`key` (elapsed_s, flops) at each evaluation step, interpolated in step; None if never logged."""
        if not self.metrics.get(key):
            return None
        return [self.value_at(key, s) for s in self.eval_steps]

    def raw_tokens(self) -> Optional[float]:
        return self.last("raw_tokens")


def _clean(points: list[tuple[float, float]]) -> list[tuple[int, float]]:
    """Sort by step, keep the last value logged for a step (a resumed run may re-log), drop non-finite."""
    by_step: dict[int, float] = {}
    for st, v in points:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            by_step[int(st)] = v
    return sorted(by_step.items())


def find_run_dir(path: str | Path) -> Path:
    """The run folder (the one holding metrics.jsonl) for a run folder or any folder/file inside it."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        if d.is_dir() and (d / "metrics.jsonl").is_file():
            return d
    raise TSTError(
        f"no metrics.jsonl in '{path}' or any folder above it; pass a run folder <output_dir>/runs/NAME/, "
        "a checkpoint inside it, or an MLflow run id/name"
    )


def _flatten_config(d: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out


def read_run_folder(path: str | Path) -> RunCurves:
    """Read `metrics.jsonl` (and `config.yaml` when present) of a run folder or a checkpoint inside it."""
    run_dir = find_run_dir(path)
    raw: dict[str, list[tuple[float, float]]] = {k: [] for k in METRIC_KEYS}
    phases: dict[int, str] = {}
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{run_dir / 'metrics.jsonl'}:{n}: skipping a malformed line", stacklevel=2)
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            st = rec["step"]
            for k in METRIC_KEYS:
                if isinstance(rec.get(k), (int, float)):
                    raw[k].append((st, rec[k]))
            if isinstance(rec.get("phase"), str):
                phases[int(st)] = rec["phase"]
    params: dict[str, Any] = {}
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            import yaml

            params = _flatten_config(yaml.safe_load(cfg.read_text(encoding="utf-8")) or {})
        except Exception as e:  # a broken config only loses the switch marker and TST detection
            warnings.warn(f"could not read {cfg}: {e}", stacklevel=2)
    return RunCurves(
        name=str(params.get("run.name") or run_dir.name),
        source="folder",
        metrics={k: _clean(v) for k, v in raw.items()},
        params=params,
        path=str(run_dir),
        phases=sorted(phases.items()),
    )


def resolve_tracking_uri(tracking_uri: Optional[str] = None, output_dir: str = "outputs") -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlflow.db")


def _sqlite_missing(uri: str) -> bool:
    """A sqlite URI whose file does not exist (opening it would create an empty store)."""
    if not uri.startswith("sqlite:///"):
        return False
    return not Path(uri[len("sqlite:///"):]).exists()


def read_mlflow_run(ref: str, tracking_uri: str, experiment: str = "tst") -> RunCurves:
    """A run by id, or by name (`run_name` or tag `tst.run_name`, most recent first) in `experiment`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = None
    try:
        run = client.get_run(ref)
    except Exception:
        run = None
    if run is None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise TSTError(f"no MLflow run '{ref}': experiment '{experiment}' does not exist at {tracking_uri}")
        found = []
        for flt in (f"attributes.run_name = '{ref}'", f"tags.`tst.run_name` = '{ref}'"):
            found = client.search_runs(
                [exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=10
            )
            if found:
                break
        if not found:
            raise TSTError(
                f"no MLflow run with id or name '{ref}' in experiment '{experiment}' at {tracking_uri}; "
                "check --experiment/--tracking-uri, or pass a run folder"
            )
        if len(found) > 1:
            warnings.warn(
                f"{len(found)} runs named '{ref}' in experiment '{experiment}'; using the most recent "
                f"({found[0].info.run_id})",
                stacklevel=2,
            )
        run = found[0]
    run_id = run.info.run_id
    metrics = {}
    for k in METRIC_KEYS:
        try:
            hist = client.get_metric_history(run_id, k)
        except mlflow.exceptions.MlflowException:
            hist = []
        metrics[k] = _clean([(m.step, m.value) for m in hist])
    params = dict(run.data.params)
    name = run.data.tags.get("tst.run_name") or run.info.run_name or run_id
    return RunCurves(
        name=name, source="mlflow", metrics=metrics, params=params, run_id=run_id, tracking_uri=tracking_uri
    )


def load_run(
    ref: "str | Path | RunCurves",
    tracking_uri: Optional[str] = None,
    experiment: str = "tst",
    output_dir: str = "outputs",
) -> RunCurves:
    """A path (run or checkpoint folder) -> folder reader; otherwise MLflow id/name, then <output_dir>/runs/ref."""
    if isinstance(ref, RunCurves):
        return ref
    ref = str(ref)
    if Path(ref).exists():
        return read_run_folder(ref)
    uri = resolve_tracking_uri(tracking_uri, output_dir)
    err: Optional[Exception] = None
    if not _sqlite_missing(uri):
        try:
            return read_mlflow_run(ref, uri, experiment)
        except TSTError as e:
            err = e
    local = Path(output_dir) / "runs" / ref
    if (local / "metrics.jsonl").is_file():
        return read_run_folder(local)
    if err is not None:
        raise err
    raise TSTError(
        f"'{ref}' is not a folder, the MLflow store {uri} does not exist, and there is no {local}/metrics.jsonl"
    )


# ------------------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------------------


def _pick_tst(runs: list[RunCurves]) -> tuple[RunCurves, list[RunCurves], Optional[str]]:
    first = runs[0]
    if first.is_tst is False:
        cands = [r for r in runs[1:] if r.is_tst]
        if len(cands) == 1:
            tst = cands[0]
            note = f"'{first.name}' is not a TST run by its params; using '{tst.name}' as the TST run"
            return tst, [r for r in runs if r is not tst], note
    return first, runs[1:], None


def _run_summary(r: RunCurves) -> dict:
    return {
        "name": r.name,
        "source": r.source,
        "run_id": r.run_id,
        "path": r.path,
        "final_step": r.final_step,
        "final_val_loss": r.final_loss,
        "raw_tokens": r.raw_tokens(),
        "elapsed_s": r.value_at("elapsed_s", r.final_step),
        "flops": r.value_at("flops", r.final_step),
        "total_steps": r.param("train.steps", lambda v: int(float(v))),
        "switch_fraction": r.param("train.switch_fraction"),
        "bag_size": r.param("data.bag_size", lambda v: int(float(v))),
        "switch_step": r.switch_step,
    }


def compute_comparison(tst: RunCurves, baselines: list[RunCurves]) -> dict:
    """All of the table's figures (pure: no I/O). See the module docstring for the definitions."""
    if not baselines:
        raise TSTError("compare needs at least one baseline run")
    target = tst.final_loss
    t_step = tst.final_step
    t_elapsed = tst.value_at("elapsed_s", t_step)
    t_flops = tst.value_at("flops", t_step)

    if len(baselines) == 1:
        b = baselines[0]
        mode = "curve"
        iso = iso_loss_all_axes(
            b.eval_steps, b.eval_losses, target, t_step,
            b.eval_axis("elapsed_s"), t_elapsed, b.eval_axis("flops"), t_flops,
        )
    else:
        mode = "final_points"
        pts = sorted(baselines, key=lambda r: r.final_step)
        iso = iso_loss_all_axes(
            [r.final_step for r in pts],
            [r.final_loss for r in pts],
            target,
            t_step,
            [r.value_at("elapsed_s", r.final_step) for r in pts],
            t_elapsed,
            [r.value_at("flops", r.final_step) for r in pts],
            t_flops,
        )

    same = [b for b in baselines if b.final_step == t_step]
    eq_base = same[0] if same else baselines[0]
    eq_diff = equal_step_difference(eq_base.eval_steps, eq_base.eval_losses, t_step, target)
    eq_base_loss = None if eq_diff is None else eq_diff + target

    return {
        "tst": _run_summary(tst),
        "baselines": [_run_summary(b) for b in baselines],
        "target_loss": target,
        "mode": mode,
        "equal_step": {
            "step": t_step,
            "baseline": eq_base.name,
            "baseline_loss": eq_base_loss,
            "tst_loss": target,
            "diff_nats": eq_diff,  # baseline - TST; positive = TST better
        },
        "speedup": {k: v.as_dict() for k, v in iso.items()},
    }


def format_table(res: dict) -> str:
    def num(v, f="{:.4f}"):
        return "n/a" if v is None else f.format(v)

    def tok(v):
        if v is None:
            return "n/a"
        for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(v) >= scale:
                return f"{v / scale:.3g}{unit}"
        return f"{v:.0f}"

    runs = [("TST", res["tst"])] + [("baseline", b) for b in res["baselines"]]
    w = max(len(r["name"]) for _, r in runs)
    lines = [f"{'role':<9} {'run':<{w}}  {'final step':>10}  {'final val loss':>14}  {'raw tokens':>10}  "
             f"{'wall-clock':>10}  {'FLOPs':>9}"]
    for role, r in runs:
        lines.append(
            f"{role:<9} {r['name']:<{w}}  {r['final_step']:>10}  {num(r['final_val_loss']):>14}  "
            f"{tok(r['raw_tokens']):>10}  {num(r['elapsed_s'], '{:.1f}s'):>10}  {num(r['flops'], '{:.3g}'):>9}"
        )
    eq = res["equal_step"]
    lines.append("")
    if eq["diff_nats"] is None:
        lines.append(f"equal-step loss difference at step {eq['step']}: n/a (baseline '{eq['baseline']}' "
                     f"not evaluated up to that step)")
    else:
        better = "TST better" if eq["diff_nats"] > 0 else ("equal" if eq["diff_nats"] == 0 else "baseline better")
        lines.append(
            f"equal-step loss difference at step {eq['step']} (baseline '{eq['baseline']}' {eq['baseline_loss']:.4f}"
            f" - TST {eq['tst_loss']:.4f}): {eq['diff_nats']:+.4f} nats ({better})"
        )
    how = ("the baseline's validation curve (intermediate points are not LR-decayed)"
           if res["mode"] == "curve" else "the baselines' final (fully-decayed) points")
    lines.append(f"iso-loss speedup to reach TST's final loss {res['target_loss']:.4f}, read off {how}:")
    names = {"steps": "steps", "wall_clock": "wall-clock", "flops": "FLOPs"}
    unit = {"steps": "{:.1f} steps", "wall_clock": "{:.1f}s", "flops": "{:.3g}"}
    for k in ("steps", "wall_clock", "flops"):
        s = res["speedup"][k]
        detail = ""
        if s["needed"] is not None and s["tst"] is not None:
            detail = f"  (baseline {unit[k].format(s['needed'])} vs TST {unit[k].format(s['tst'])})"
        lines.append(f"  {names[k]:<10} {s['display']:>9}{detail}")
    if res["speedup"]["steps"]["lower_bound"]:
        lines.append("  ≥: the baseline never reached TST's final loss; the ratio uses its last point (a lower bound)")
    if res["speedup"]["steps"]["upper_bound"]:
        lines.append("  ≤: the baseline's first point is already at or below TST's final loss (an upper bound)")
    for n in res.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------------------------


def plot_comparison(tst: RunCurves, baselines: list[RunCurves], res: dict, out: str | Path) -> Path:
    """Figure 1 style: val loss vs wall-clock (left) and vs steps (right); switch and iso-loss point marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2)
    base_colors = [f"C{i}" for i in range(10) if i != 3]  # C3 (red) is TST's alone
    runs = [(tst, "TST", "C3")] + [(b, "baseline", base_colors[i % len(base_colors)]) for i, b in enumerate(baselines)]
    for r, role, color in runs:
        steps, losses = r.eval_steps, r.eval_losses
        label = f"{role}: {r.name}"
        ax_s.plot(steps, losses, "-o", ms=2.5, color=color, label=label)
        el = r.eval_axis("elapsed_s")
        if el is not None:
            xy = [(e, l) for e, l in zip(el, losses) if e is not None]
            if xy:
                ax_t.plot([p[0] for p in xy], [p[1] for p in xy], "-o", ms=2.5, color=color, label=label)
    if res["mode"] == "final_points":
        pts = sorted(baselines, key=lambda r: r.final_step)
        ax_s.plot([r.final_step for r in pts], [r.final_loss for r in pts], ":s", color="k", ms=5,
                  label="baselines' final points")
        fe = [(r.value_at("elapsed_s", r.final_step), r.final_loss) for r in pts]
        if all(e is not None for e, _ in fe):
            ax_t.plot([e for e, _ in fe], [l for _, l in fe], ":s", color="k", ms=5, label="baselines' final points")
    sw = tst.switch_step
    if sw is not None:
        ax_s.axvline(sw, color="C3", ls="--", lw=1, label=f"TST switch (step {sw})")
        sw_t = tst.value_at("elapsed_s", sw)
        if sw_t is not None:
            ax_t.axvline(sw_t, color="C3", ls="--", lw=1, label="TST switch")
    target = res["target_loss"]
    for ax, key in ((ax_s, "steps"), (ax_t, "wall_clock")):
        ax.axhline(target, color="gray", ls=":", lw=1)
        s = res["speedup"][key]
        if s["needed"] is not None:
            mark = "≥ " if s["lower_bound"] else ("≤ " if s["upper_bound"] else "")
            ax.plot([s["needed"]], [target], marker="*", ms=14, color="k", ls="none",
                    label=(f"baseline reaches TST's final loss: {mark}{s['ratio']:.2f}x"
                           if s["ratio"] is not None else "iso-loss point"))
    # Zoom on the part that matters (as the paper's figure does): the early, steep losses would flatten the rest.
    all_l = sorted(l for r, _, _ in runs for l in r.eval_losses)
    if len(all_l) >= 4:
        lo, hi = all_l[0], all_l[len(all_l) // 2]
        sw_l = tst.value_at("val_loss", sw) if sw is not None else None
        if sw_l is not None:
            hi = max(hi, sw_l)
        hi = min(max(hi, target), all_l[-1])
        pad = 0.08 * max(hi - lo, 1e-6)
        for ax in (ax_s, ax_t):
            ax.set_ylim(lo - pad, hi + pad)
    ax_s.set_xlabel("optimizer step")
    ax_t.set_xlabel("wall-clock (s)")
    for ax in (ax_s, ax_t):
        ax.set_ylabel("validation next-token loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_title("loss vs wall-clock")
    ax_s.set_title("loss vs steps")
    fig.suptitle(f"TST '{tst.name}' vs baseline{'s' if len(baselines) > 1 else ''} "
                 f"{', '.join(repr(b.name) for b in baselines)}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# ------------------------------------------------------------------------------------------------------------
# API and CLI
# ------------------------------------------------------------------------------------------------------------


def _log_to_mlflow(run: RunCurves, paths: list[Path]) -> Optional[str]:
    """Log artifacts to the TST run; returns a warning message instead of raising."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=run.tracking_uri)
        for p in paths:
            client.log_artifact(run.run_id, str(p), artifact_path="compare")
        return None
    except Exception as e:  # logging is a convenience: never fail the comparison for it
        return f"could not log the comparison to MLflow run {run.run_id}: {type(e).__name__}: {e}"


def compare_runs(
    tst: "str | Path | RunCurves",
    baselines: "Sequence[str | Path | RunCurves] | str | Path | RunCurves",
    *,
    tracking_uri: Optional[str] = None,
    experiment: str = "tst",
    output_dir: str = "outputs",
    out: "str | Path | None" = "compare.png",
    json_path: "str | Path | None" = None,
    log_to_mlflow: bool = True,
    detect_tst: bool = True,
) -> dict:
    """Compare a TST run against one or more baselines; returns the figures (the same dict as the JSON).

    `tst` and `baselines` are MLflow run ids/names, run/checkpoint folders, or `RunCurves`. With `out`, writes
    the PNG; with `json_path`, the JSON; when the TST run came from MLflow and `log_to_mlflow`, logs both to it.
    """
    if isinstance(baselines, (str, Path, RunCurves)):
        baselines = [baselines]
    runs = [load_run(r, tracking_uri, experiment, output_dir) for r in [tst, *baselines]]
    notes = []
    if detect_tst:
        t, bases, note = _pick_tst(runs)
        if note:
            notes.append(note)
    else:
        t, bases = runs[0], runs[1:]
    if t.is_tst is False:
        notes.append(f"the TST run '{t.name}' has switch_fraction 0 or bag_size 1 by its params")
    res = compute_comparison(t, bases)
    res["notes"] = notes
    written: list[Path] = []
    if out:
        res["figure"] = str(plot_comparison(t, bases, res, out))
        written.append(Path(out))
    if json_path:
        jp = Path(json_path)
        jp.parent.mkdir(parents=True, exist_ok=True)
        res["json"] = str(jp)
        jp.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        written.append(jp)
    if log_to_mlflow and t.source == "mlflow" and written:
        msg = _log_to_mlflow(t, written)
        if msg:
            warnings.warn(msg, stacklevel=2)
            res["notes"].append(msg)
        else:
            res["logged_to"] = t.run_id
    return res


def _cmd(args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = compare_runs(
            args.tst,
            args.baselines,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            output_dir=args.output_dir,
            out=args.out,
            json_path=args.json,
            log_to_mlflow=not args.no_log,
            detect_tst=not args.no_detect,
        )
    for w in caught:
        if "could not log" not in str(w.message):  # already among the notes
            print(f"tst compare: warning: {w.message}", file=sys.stderr)
    print(format_table(res))
    if res.get("figure"):
        print(f"figure: {res['figure']}")
    if res.get("json"):
        print(f"json: {res['json']}")
    if res.get("logged_to"):
        print(f"logged to MLflow run {res['logged_to']} (artifacts under compare/)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare a TST run with baseline run(s): final loss, equal-step difference, iso-loss speedup",
        description=(
            "Compare a TST run with one baseline (its whole validation curve) or several baselines of different "
            "lengths T, 1.5T, 2T, ... each with its own complete LR schedule (their FINAL points are interpolated). "
            "Reports final losses, the equal-step loss difference (nats, positive = TST better), raw tokens, and "
            "the iso-loss speedup in steps / wall-clock / FLOPs ('≥' = lower bound: the baseline never got there). "
            "Runs are MLflow run ids or names, or run/checkpoint folders."
        ),
    )
    p.add_argument("tst", help="the TST run (MLflow run id or name, or a run/checkpoint folder)")
    p.add_argument("baselines", nargs="+", help="baseline run(s), same forms")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<output-dir>/mlflow.db)")
    p.add_argument("--experiment", default="tst", help="MLflow experiment to search run names in (default: tst)")
    p.add_argument("--output-dir", default="outputs", help="where runs/NAME/ folders and mlflow.db live")
    p.add_argument("--out", default="compare.png", help="PNG figure path (default: compare.png)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--no-log", action="store_true", help="do not log the PNG/JSON to the TST run in MLflow")
    p.add_argument("--no-detect", action="store_true",
                   help="take the first argument as the TST run even if its params say otherwise")
    p.set_defaults(func=_cmd)
