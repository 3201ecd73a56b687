"""Reading a run's curves for `tst compare`: an MLflow run or a run folder, as a `RunCurves`.

Runs are read from (1) MLflow: a run id, or a run name (`run_name` or the `tst.run_name` tag) searched in the
experiment `--experiment` (default "tst") at the tracking URI that `pipeline.report.tracking.resolve_tracking_uri`
decides for every command (`--tracking-uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<output-dir>/mlflow.db`);
metric histories `val_loss`, `elapsed_s`, `flops`, `raw_tokens` and params `train.steps`, `train.switch_fraction`,
`data.bag_size`; or (2) a run folder `<output_dir>/runs/NAME/`, or any folder inside it such as a checkpoint (the
reader walks up to the folder holding `metrics.jsonl`), reading `metrics.jsonl` and `config.yaml`. A bare NAME
that is not an MLflow run is also looked up as `<output-dir>/runs/NAME/`. Reading never creates a store: a SQLite
URI whose file does not exist is not opened, and its folder is not made.

mlflow and yaml are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import TSTError
from pipeline.report.curves import interp_at
from pipeline.report.tracking import resolve_tracking_uri

METRIC_KEYS = ("val_loss", "elapsed_s", "flops", "raw_tokens")

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
    uri = resolve_tracking_uri(tracking_uri, output_dir, create_dir=False)  # a lookup makes no store
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

