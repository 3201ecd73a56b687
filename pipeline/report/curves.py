"""The comparison's numbers: the paper's Table 1 for a TST run against one or more baselines (pure: no files,
no MLflow, no plotting). `pipeline.report.runs` reads the runs, `pipeline.report.plots` draws Figure 1,
`pipeline.report.compare.compare_runs` ties them together, and `tst compare` (pipeline/cli/compare.py) is its
command line.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from pipeline.errors import TSTError

if TYPE_CHECKING:  # runs.py imports interp_at from here; the comparison only calls RunCurves' methods
    from pipeline.report.runs import RunCurves


# ------------------------------------------------------------------------------------------------------------
# Pure numerics on one curve
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
# The comparison
# ------------------------------------------------------------------------------------------------------------


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

