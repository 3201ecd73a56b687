"""The trainable of `tst tune`, run in each Tune trial's process: `tst_trial` runs the trainer's own
`run_training` (one-process loop or TorchTrainer) for one point, forwards its evaluation records (`val_loss`) to
Tune, and keeps the trial's MLflow child run in step (reopened on resume, closed KILLED when the scheduler cuts
it). See "Trials" and "MLflow" in tune/search.py for the decisions.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Optional

from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.config import Config, apply_overrides
from tune.space import trial_label

METRIC = "val_loss"  # the objective: final next-token loss on the held-out windows, minimised


def tst_trial(config: dict) -> None:
    """One trial: the trainer's own run (TorchTrainer, or the one-process loop), nested in the search's MLflow
    parent; `val_loss` is reported to Tune at evaluation steps and, at the end, the final one."""
    import ray.tune

    from pipeline.runner import run_training

    meta, trial = config["tst"], config["trial"]
    overrides = dict(trial["overrides"])
    base = Config.from_dict(meta["base"])
    cfg = apply_overrides(base, overrides)
    base_flat = base.flatten()
    label = trial_label(trial, ray.tune.get_context().get_trial_id(), meta["varying"], base_flat)
    name = f"{meta['search']}-{label}"
    cfg.run.name = name
    # MLflow shows children under their parent and cuts long names in chart legends: the point first
    cfg.run.display_name = f"{label} · {meta['search']}"
    cfg.run.parent_run_id = meta["parent_run_id"]
    T = cfg.train.steps
    _append_jsonl(meta["starts_file"], {"run_name": name, "trial_id": ray.tune.get_context().get_trial_id(),
                                        "pid": os.getpid(), "time": time.time()})
    if cfg.run.tracking:
        _reopen_child(cfg, name)
    try:
        if meta["backend"] == "local":
            summary = run_training(cfg, use_ray=False, name=name, console=meta.get("console", False),
                                   on_metrics=_tune_reporter(T))
        else:
            summary = run_training(cfg, use_ray=True, name=name, console=meta.get("console", False),
                                   extra_callbacks=[ValLossToTune(T)], data_mode=meta.get("data_mode", "memory"))
    except SystemExit:  # Tune stopped this trial (scheduler decision): its run did not fail, it was cut
        if cfg.run.tracking:
            _close_child(cfg, name, "KILLED", {"tst.tune.stopped_early": "true"})
        raise
    final = {
        METRIC: summary.get("final_val_loss"),
        "step": summary.get("step"),
        "final": 1,
        "status": summary.get("status"),
        "raw_tokens": summary.get("raw_tokens"),
        "epochs": summary.get("epochs"),
        "wall_s": summary.get("wall_s"),
        "run_name": name,
        "run_dir": summary.get("run_dir"),
        "mlflow_run_id": summary.get("mlflow_run_id") or "",
    }
    ray.tune.report({k: v for k, v in final.items() if v is not None})


def _tune_metrics(m: dict) -> dict:
    out = {k: m[k] for k in (METRIC, "step", "train_loss", "raw_tokens", "elapsed_s", "epoch", "bag_size")
           if isinstance(m.get(k), (int, float))}
    out["phase"] = m.get("phase", "")
    out["final"] = 0
    return out


def _forward(m: Optional[dict], total_steps: int) -> bool:
    """Tune sees evaluation records only (every result carries `val_loss`), and not the last step's: that one
    is reported by the trainable once the run is closed (so a scheduler never cuts a run at its last step)."""
    return bool(m) and m.get(METRIC) is not None and m.get("kind") != "final" and 0 < int(m.get("step", 0)) < total_steps


def _tune_reporter(total_steps: int):
    """The local backend's hook (`run_training(on_metrics=...)`): every record the one-process loop logs (after
    JSONL and MLflow) that carries `val_loss` is also sent to `ray.tune.report`."""
    import ray.tune

    def report(metrics: dict) -> None:
        if _forward(metrics, total_steps):
            ray.tune.report(_tune_metrics(metrics))

    return report


class ValLossToTune(TuneReportCallback):
    """`TuneReportCallback` that forwards only rank 0's evaluation records (with `val_loss`) to Tune."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = total_steps

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = metrics[0] if metrics else None
        if _forward(m, self.total_steps):
            self._training_actor_item_queue.put(_tune_metrics(m))


def _append_jsonl(path: str, rec: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# -- the trial's MLflow child run (the trainer's own run, nested under the search's parent) ---------------
def _client(cfg: Config):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.run.tracking_uri)


def _reopen_child(cfg: Config, name: str) -> None:
    """A resumed trial's child run (closed KILLED when its process died) is RUNNING again while it trains."""
    from pipeline.report.tracking import MlflowTracker

    try:
        rid = MlflowTracker.find_run(cfg.run.tracking_uri, cfg.run.experiment, name)
        if rid and _client(cfg).get_run(rid).info.status != "RUNNING":
            _client(cfg).update_run(rid, status="RUNNING")
    except Exception as e:  # tracking problems surface in run_training with their own message
        warnings.warn(f"could not reopen MLflow run {name}: {e}")


def _close_child(cfg: Config, name: str, status: str, tags: Optional[dict] = None) -> None:
    from pipeline.report.tracking import MlflowTracker

    try:
        rid = MlflowTracker.find_run(cfg.run.tracking_uri, cfg.run.experiment, name)
        if rid:
            c = _client(cfg)
            for k, v in (tags or {}).items():
                c.set_tag(rid, k, v)
            c.set_terminated(rid, status=status)
    except Exception as e:
        warnings.warn(f"could not close MLflow run {name}: {e}")


__all__ = ["METRIC", "tst_trial", "ValLossToTune"]
