"""Figure 1 of the paper for `tst compare`: validation loss against wall-clock and against steps, every run, the
TST switch step and the iso-loss point marked. matplotlib is imported inside the function (Agg canvas, no
pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.report.runs import RunCurves

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

