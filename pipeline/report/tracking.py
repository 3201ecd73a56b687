"""MLflow tracking, from one place only (the Ray-free process, or the Ray Train controller / driver).

Decisions:
- Default store: `sqlite:///<output_dir>/mlflow.db` made absolute on the driver (MLflow 3.17 refuses the
  `./mlruns` folder store without MLFLOW_ALLOW_FILE_STORE). `run.tracking_uri` or $MLFLOW_TRACKING_URI points
  it at a server instead.
- Unreachable at start: `check_reachable()` raises a one-line TrackingError before any worker starts.
- Lost mid-run: `log_metrics` never blocks: it queues the record (bounded: MAX_PENDING records, the oldest
  dropped beyond, since metrics.jsonl holds them all) and a daemon thread sends it. A lost server is one warning;
  the queue is sent when it answers again, and `backfill()` sends what metrics.jsonl has and MLflow lacks at the
  end. MLflow's own HTTP retries (7 with back-off, 120 s timeouts by default) are cut to MLFLOW_HTTP_REQUEST_*
  defaults below unless the user set them, and closing waits at most `end(timeout_s)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import warnings
from typing import Any, Optional

from pipeline.errors import TrackingError


def resolve_tracking_uri(tracking_uri: Optional[str] = None, output_dir: str = "outputs", *,
                         create_dir: bool = True) -> str:
    """The MLflow tracking URI of every command (train, tune, compare, export --mlflow-run-id):
    `tracking_uri` (--tracking-uri / run.tracking_uri), else $MLFLOW_TRACKING_URI, else
    `sqlite:///<output_dir>/mlflow.db`. A SQLite path is made absolute against the current folder, so that every
    process that opens it (the driver, Ray Train's controller, a later `mlflow ui`) means the same file.
    `create_dir`: make the SQLite file's folder (a run about to write); a reader (`tst compare`) passes False, so
    that looking a run up creates nothing."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = "sqlite:///" + os.path.abspath(os.path.join(output_dir, "mlflow.db"))
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if create_dir and uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    return uri


def default_artifact_location(uri: str) -> Optional[str]:
    """Artifacts of a local SQLite store live beside the database (not in the driver's cwd, which under
    `ray job submit` is a temporary copy); a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    return None


def mlflow_command() -> str:
    """How to type `mlflow` in the user's shell: plain `mlflow` when it is this environment's, else its path
    (a fresh shell after the quick start has no venv on PATH)."""
    import shutil

    mine = os.path.join(os.path.dirname(sys.executable), "mlflow")
    found = shutil.which("mlflow")
    if found and os.path.realpath(found) == os.path.realpath(mine):
        return "mlflow"
    rel = os.path.relpath(mine)
    return rel if not rel.startswith("..") else mine


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the fix, when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it (`mlflow server --port ...`), "
            f"fix --tracking-uri / MLFLOW_TRACKING_URI, or pass run.tracking=false"
        ) from None


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment_tags(world_size: int) -> dict[str, str]:
    """What MLflow records besides the config (design notes): commit, versions, hardware, world size."""
    import torch

    tags = {
        "tst.git_commit": git_commit(),
        "tst.python": sys.version.split()[0],
        "tst.torch": torch.__version__,
        "tst.platform": platform.platform(),
        "tst.cpu_count": str(os.cpu_count()),
        "tst.world_size": str(world_size),
        "tst.hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    for mod in ("ray", "mlflow", "tokenizers", "pyarrow"):
        try:
            tags[f"tst.{mod}"] = __import__(mod).__version__
        except Exception:
            pass
    return tags


# MLflow 3 records what an experiment is for in this tag; its UI opens a "custom_model_development" experiment on
# its runs (the classic table and charts) instead of the GenAI traces page (mlflow 3.17: the values in
# mlflow/server/js's experiment-kind enum; the tag is what the UI's own "experiment type" selector writes).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client, name: str, uri: str) -> str:
    """The experiment's id, created (artifacts beside a SQLite store) and marked as model training if needed."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=default_artifact_location(uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created meanwhile by another process (two Tune trials)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # a store from before: mark it too (a user's own kind stays)
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def run_params(cfg) -> dict[str, Any]:
    """The config as MLflow params, led by the three that tell runs apart (s, r, T: `bag_size` is also a per-step
    metric, whose last value is the recovery phase's 1). model.* left to the preset are logged by
    `model_params` once the tokenizer gives the vocabulary, with their resolved values instead of None."""
    flat = cfg.flatten()
    out = {"s": cfg.data.bag_size, "r": cfg.train.switch_fraction, "T": cfg.train.steps}
    out.update({k: v for k, v in flat.items() if not (k.startswith("model.") and v is None)})
    return out


def model_params(cfg, vocab_size: Optional[int]) -> dict[str, Any]:
    """model.* as the run builds them (the preset's values where the config says None)."""
    from pipeline.model.transformer import resolve_model_config

    m = resolve_model_config(cfg.model, vocab_size)
    return {f"model.{k}": v for k, v in dataclasses.asdict(m).items()}


MAX_PENDING = 10_000
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class MlflowTracker:
    """One MLflow run. Created on the driver; `run_id` can be handed to another process to reopen it."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: Optional[str] = None,
                 parent_run_id: Optional[str] = None, display_name: Optional[str] = None):
        """`run_name` is the run's identity (its folder, the `tst.run_name` tag every lookup uses); `display_name`
        is what the MLflow UI shows and legends cut (default: the run name)."""
        import mlflow
        from mlflow.tracking import MlflowClient

        import threading

        for k, v in HTTP_DEFAULTS.items():  # a dead server costs seconds, not minutes of retries
            os.environ.setdefault(k, v)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.pending: list[tuple[dict, int]] = []
        self.dropped = 0
        self._warned = False
        self._lock = threading.Lock()  # guards pending
        self._send_lock = threading.Lock()  # one sender at a time (the thread or a flush)
        self._wake = threading.Event()
        self._sender: Optional[threading.Thread] = None
        if run_id is None:
            exp_id = ensure_experiment(self.client, experiment, uri)
            shown = display_name or run_name
            tags = {"mlflow.runName": shown, "tst.run_name": run_name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, tags=tags, run_name=shown)
            run_id = run.info.run_id
        self.run_id = run_id
        self._mlflow = mlflow

    @classmethod
    def find_run(cls, uri: str, experiment: str, run_name: str) -> Optional[str]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], f"tags.`tst.run_name` = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        from pipeline.config import redact_secrets

        existing = self.client.get_run(self.run_id).data.params
        params = redact_secrets(params)  # credentials in URIs never reach the server
        items = [Param(k, _param_str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Queue one step's metrics and return at once; the sender thread delivers them."""
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and v == v}
        with self._lock:
            self.pending.append((clean, step))
            if len(self.pending) > MAX_PENDING:  # metrics.jsonl keeps it; backfill() sends it at the end
                self.pending.pop(0)
                self.dropped += 1
        if self._sender is None or not self._sender.is_alive():
            import threading

            self._sender = threading.Thread(target=self._send_loop, name="tst-mlflow-sender", daemon=True)
            self._sender.start()
        self._wake.set()

    def _send_loop(self) -> None:
        while True:
            self._wake.wait(timeout=10.0)  # woken by a new record; retried every 10 s while the server is away
            self._wake.clear()
            self.flush_pending()

    def flush_pending(self, timeout_s: Optional[float] = None) -> bool:
        """Send queued metrics now (True when none are left); on failure keep them and warn once. With
        `timeout_s`, give up waiting for the sender after that long (False)."""
        import time

        from mlflow.entities import Metric

        if not self._send_lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            return False
        try:
            while True:
                with self._lock:
                    if not self.pending:
                        break
                    clean, step = self.pending[0]
                ts = int(time.time() * 1000)
                try:
                    self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in clean.items()])
                except Exception as e:  # server gone: keep the record, retry later
                    if not self._warned:
                        warnings.warn(f"MLflow at {self.uri} stopped answering ({type(e).__name__}); training goes "
                                      f"on, metrics are kept in metrics.jsonl and sent when it is back",
                                      stacklevel=2)
                        self._warned = True
                    return False
                with self._lock:
                    if self.pending and self.pending[0][1] == step and self.pending[0][0] is clean:
                        self.pending.pop(0)
            self._warned = False
            return True
        finally:
            self._send_lock.release()

    def backfill(self, history: list[dict]) -> int:
        """Send the metrics.jsonl records that MLflow never received (server lost mid-run, or records written by
        a controller whose own buffer died with it). Returns how many step records were sent."""
        try:
            logged = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
        except Exception:
            return 0
        with self._lock:
            logged |= {step for _, step in self.pending}  # queued already
        sent = 0
        for rec in history:
            if rec.get("kind") == "final" or "train_loss" not in rec or rec["step"] in logged:
                continue
            self.log_metrics(rec, step=int(rec["step"]))
            sent += 1
        self.flush_pending(timeout_s=60.0)  # the end of a run: deliver now (bounded) rather than in the background
        return sent

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        try:
            self.client.log_artifact(self.run_id, path, artifact_path)
        except Exception as e:
            warnings.warn(f"could not log artifact {path} to MLflow: {e}", stacklevel=2)

    def log_text(self, text: str, name: str) -> None:
        try:
            self.client.log_text(self.run_id, text, name)
        except Exception as e:
            warnings.warn(f"could not log {name} to MLflow: {e}", stacklevel=2)

    def end(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        try:
            self.flush_pending(timeout_s=timeout_s)
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            warnings.warn(f"could not close MLflow run {self.run_id}: {e}", stacklevel=2)


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return s[:6000]


def loss_curve_png(history: list[dict], path: str, title: str, switch_step: Optional[int] = None) -> Optional[str]:
    """The final loss-curve plot logged as an artifact: train loss per phase and validation loss."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for phase, style in (("superposition", ":"), ("recovery", "-")):
        pts = [(r["step"], r["train_loss"]) for r in history if r.get("phase") == phase and "train_loss" in r]
        if pts:
            ax.plot(*zip(*pts), style, label=f"train loss ({phase}{', MCE' if phase == 'superposition' else ''})")
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation next-token loss")
    if switch_step:
        ax.axvline(switch_step, color="gray", ls="--", label=f"switch (step {switch_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
