"""`compare_runs`: a TST run against one or more baselines, end to end (read the runs, pick which is TST,
compute the figures, draw the PNG, write the JSON, log both to the TST run in MLflow). The definitions are in
`pipeline.report.curves`; the readers in `pipeline.report.runs`; the figure in `pipeline.report.plots`; the
command line (`tst compare`) in `pipeline/cli/compare.py`.

Which run is TST: the first argument, unless its params say it is not a TST run (`train.switch_fraction` = 0 or
`data.bag_size` = 1) and exactly one of the others is (`train.switch_fraction` > 0 and `data.bag_size` > 1); then
that one is taken as TST and a note says so.

Outputs: the figures as a dict (the same as the JSON, `json_path`), and a PNG (`out`) with two panels, validation
loss against wall-clock and against steps. When the TST run came from MLflow, the PNG and the JSON are logged as
artifacts of that run under `compare/` (a failure to log is a warning, not an error). mlflow is imported inside
the function that uses it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

from pipeline.report.curves import compute_comparison
from pipeline.report.plots import plot_comparison
from pipeline.report.runs import RunCurves, load_run


def _pick_tst(runs: list[RunCurves]) -> tuple[RunCurves, list[RunCurves], Optional[str]]:
    first = runs[0]
    if first.is_tst is False:
        cands = [r for r in runs[1:] if r.is_tst]
        if len(cands) == 1:
            tst = cands[0]
            note = f"'{first.name}' is not a TST run by its params; using '{tst.name}' as the TST run"
            return tst, [r for r in runs if r is not tst], note
    return first, runs[1:], None


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

