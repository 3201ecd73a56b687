"""The Ray Train edge: the Ray-free loop (`pipeline.train.loop.train`) inside `TorchTrainer` workers.

What Ray adds, and nothing else: worker processes with an initialised process group (gloo on CPU, NCCL on
GPU), checkpoint persistence through `ray.train.report` (each rank passes its own DCP shard folder; Ray merges
them into one checkpoint folder in `RunConfig.storage_path` and registers it only once every rank has
uploaded), restarts from the latest checkpoint after a worker failure (`FailureConfig`), elastic worker counts,
and a controller-side callback that records rank 0's metrics (MLflow is written from that one place).

Stack notes that shape this file (Ray 2.60, Train V2): configs come from `ray.train`; `prepare_model` only wraps
FSDP1 and refuses CPU, so `pipeline.train.parallel` calls `fully_shard` itself; `ray.train.report` is a barrier that
every rank calls the same number of times; a whole run resumes by starting it again with the same
`RunConfig(name, storage_path)`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Optional

from ray.train import UserCallback

from pipeline import ray_internals
from pipeline.ray_session import on_local_ray
from pipeline.train.metrics import say


class RayReporter:
    """A rank's reporting under Ray Train (see `pipeline.train.loop.Reporter`)."""

    def __init__(self, stop_signal: "Optional[StopSignal]" = None):
        import ray.train

        self.stop_signal = stop_signal  # the driver's SIGTERM (None: no stop requests)
        self._stop_polled, self._stopped = 0.0, False
        self.ctx = ray.train.get_context()
        self.rank = self.ctx.get_world_rank()
        self.is_chief = self.rank == 0

    def stop_requested(self) -> bool:
        """Rank 0 asks whether the driver got a SIGTERM, at most once a second (the loop all-reduces the answer)."""
        import time

        if self.stop_signal is None:
            return False
        now = time.monotonic()
        if not self._stopped and now - self._stop_polled >= 1.0:
            self._stop_polled = now
            self._stopped = self.stop_signal.requested()
        return self._stopped

    def staging_dir(self, step: int) -> str:
        from pipeline.train.checkpoint import staging_dir

        return staging_dir(step, self.rank)  # removed after the report, or by a later sweep if this rank dies

    def report(self, metrics: Optional[dict], checkpoint_staging: Optional[str], step: int) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_staging) if checkpoint_staging else None
        payload = dict(metrics or {}) if self.is_chief else {}
        try:
            ray.train.report(payload, checkpoint=ckpt,
                             checkpoint_dir_name=f"step_{step:08d}" if ckpt else None)
        finally:
            if checkpoint_staging:
                shutil.rmtree(checkpoint_staging, ignore_errors=True)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        """The newest checkpoint that verifies (pipeline.train.checkpoint.verify), walking back through the ones Ray
        registered: a checkpoint corrupted after registration (a truncated shard) is skipped with one warning
        line instead of failing every restart."""
        import ray.train

        from pipeline.train.checkpoint import newest_verified

        cands = []
        try:
            cands = [r.checkpoint for r in ray.train.get_all_reported_checkpoints()]
        except Exception:  # noqa: BLE001 - older Ray or no controller state: the latest alone
            pass
        latest = ray.train.get_checkpoint()
        if latest is not None and all(c.path != latest.path for c in cands):
            cands.append(latest)
        name = lambda c: os.path.basename(c.path.rstrip("/"))  # noqa: E731
        cands.sort(key=name)  # step_%08d: name order is step order
        with newest_verified(cands, as_directory=lambda c: c.as_directory(), name=name,
                             say=say if self.rank == 0 else (lambda line: None)) as path:
            yield path

    def last_good_checkpoint(self) -> Optional[str]:
        import ray.train

        try:
            reported = ray.train.get_all_reported_checkpoints()
            if reported:
                return reported[-1].checkpoint.path
        except Exception:
            pass
        ckpt = ray.train.get_checkpoint()
        return ckpt.path if ckpt else None


def train_worker(config: dict) -> None:
    """`train_loop_per_worker`: one rank of the run (the same `train()` as the Ray-free loop)."""
    import torch

    import ray.train
    from pipeline.config import Config
    from pipeline.ray_internals import set_train_report_log_level
    from pipeline.train.loop import train

    cfg = Config.from_dict(config["cfg"])
    set_train_report_log_level(_train_log_level())  # the per-report INFO lines LoggingConfig does not reach
    os.environ.update(config.get("env", {}))  # the driver's TST_* settings (workers inherit the raylet's env)
    ctx = ray.train.get_context()
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", ctx.get_local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    tok_path = None
    if config.get("tokenizer_json"):  # one file per tokenizer content, reused by restarts and later runs
        import hashlib

        digest = hashlib.sha256(config["tokenizer_json"].encode()).hexdigest()[:16]
        tok_path = os.path.join(tempfile.gettempdir(), f"tst-tokenizer-{digest}.json")
        if not os.path.exists(tok_path):
            tmp = f"{tok_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(config["tokenizer_json"])
            os.replace(tmp, tok_path)
    train(cfg, config["source"], RayReporter(config.get("stop_signal")), vocab_size=config["vocab_size"],
          device=device, tokenizer_path=tok_path)


def _train_log_level() -> str:
    """Ray Train's log level for tst runs: WARNING (it logs every report at INFO; our progress lines say the same
    once, readably). TST_RAY_TRAIN_LOG_LEVEL=INFO brings its lines back."""
    return os.environ.get("TST_RAY_TRAIN_LOG_LEVEL", "WARNING")


class MetricsCallback(UserCallback):
    """Runs in the Ray Train controller: rank 0's reported metrics -> console, metrics.jsonl, MLflow."""

    def __init__(self, run_dir: str, total_steps: int, tracking_uri: Optional[str], mlflow_run_id: Optional[str],
                 console: bool = True):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.tracking_uri = tracking_uri
        self.mlflow_run_id = mlflow_run_id
        self.console = console
        self._sink = None

    def _get_sink(self):
        if self._sink is None:
            from pipeline.train.metrics import MetricsSink

            tracker = None
            if self.mlflow_run_id:
                from pipeline.report.tracking import MlflowTracker

                tracker = MlflowTracker(self.tracking_uri, "", "", run_id=self.mlflow_run_id)
            self._sink = MetricsSink(self.run_dir, self.total_steps, tracker=tracker, console=self.console)
        return self._sink

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and metrics[0]:
            self._get_sink().log(metrics[0])

    def after_exception(self, run_context, worker_exceptions) -> None:
        """Infrastructure failures (a dead worker, node or actor; a collective aborted by one) are retried from the
        last checkpoint; a deterministic error (config, data, a bug: `pipeline.errors.is_deterministic`) would
        only repeat, so raising here ends the run now, once (Ray Train treats an error raised by a callback as a
        controller failure, which it does not retry)."""
        from pipeline.errors import FatalWorkerError, is_deterministic

        fatal = {r: e for r, e in worker_exceptions.items() if is_deterministic(e)}
        if fatal:
            rank, exc = min(fatal.items())
            raise FatalWorkerError(f"{type(exc).__name__} on worker {rank}: {_first_line(exc)}", exc)
        for rank, exc in worker_exceptions.items():
            say(f"[tst] worker {rank} failed: {type(exc).__name__}: {_first_line(exc)}"
                f" — restarting from the last checkpoint if failures remain")


class _StopRequested:
    """A Ray actor that exists only while its driver asks its run to stop: its name is the message."""

    def ping(self) -> bool:
        return True


class StopSignal:
    """The driver's SIGTERM, passed to its ranks (pipeline.train.loop: checkpoint at the end of the step, leave).

    The driver creates a named actor (`_StopRequested`) only when it is asked to stop; rank 0 looks the name up at
    most once a second (`RayReporter.stop_requested`) and the loop all-reduces the answer. Until a stop nothing
    runs: the flag actor it replaces was one more Ray worker process at every start of every Ray run (1.4
    CPU-seconds on 2 cores, measured 2026-12-03). Each driver has its own name, so a resumed run never sees an
    earlier driver's request. Pickled to the workers as its name only.

    The actor is pinned to the driver's node (the head on a cluster): a 0-CPU actor may otherwise land on any node,
    and on an autoscaling cluster it landed on a CPU data node, which it kept from going idle for the whole run
    (found by tests/test_autoscale.py; a lost data node would also have taken the request with it)."""

    NAMESPACE = "tst"

    def __init__(self):
        import uuid

        self.name = f"tst-stop-{uuid.uuid4().hex[:16]}"
        self._asked = False
        self._actor = None  # the driver's handle, once made (a named actor lives while a handle does)

    def __getstate__(self):
        return {"name": self.name, "_asked": False, "_actor": None}  # the request and its handle stay with the driver

    def request(self) -> None:
        """Driver: ask the ranks to stop (idempotent; safe from a signal handler: the actor is made in a thread)."""
        import threading

        if self._asked:
            return
        self._asked = True
        threading.Thread(target=self._create, name="tst-stop-request", daemon=True).start()

    def _create(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._actor = ray.remote(num_cpus=0)(_StopRequested).options(
            name=self.name, namespace=self.NAMESPACE, scheduling_strategy=here).remote()

    def requested(self) -> bool:
        """A rank: whether the driver asked to stop (one lookup in Ray's GCS; False if it cannot tell)."""
        import ray

        try:
            ray.get_actor(self.name, namespace=self.NAMESPACE)
        except Exception:  # noqa: BLE001 - ValueError: no request (or the driver is gone: Ray ends the run anyway)
            return False
        return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def build_trainer(cfg, *, source, vocab_size: int, tokenizer_json: Optional[str], run_name: str, run_dir: str,
                  storage_path: str, tracking_uri: Optional[str], mlflow_run_id: Optional[str],
                  extra_callbacks: Optional[list] = None, console: bool = True, stop_signal=None):
    """A `TorchTrainer` for the config (no fit)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.ray_env import ray_train_env

    ray_train_env()  # a worker's print is one console line, not two (pipeline/ray_env.py)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **(sc.worker_resources or {})}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    # Ray refuses GPU in resources_per_worker unless use_gpu=True; with use_gpu=false and worker_resources {GPU: n}
    # the workers reserve GPUs (a node type's declared GPUs) and still train on CPU with gloo (cfg decides the
    # device and backend below, not Ray's flag)
    ray_use_gpu = sc.use_gpu or resources.get("GPU", 0) > 0
    num_workers = (sc.min_workers, sc.num_workers) if sc.min_workers else sc.num_workers
    # elastic_resize_monitor_interval_s: how often a healthy elastic run checks whether it can grow back
    scaling = ray.train.ScalingConfig(num_workers=num_workers, use_gpu=ray_use_gpu, resources_per_worker=resources,
                                      elastic_resize_monitor_interval_s=sc.elastic_resize_interval_s)
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=storage_path,
        failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        callbacks=[MetricsCallback(run_dir, cfg.train.steps, tracking_uri, mlflow_run_id, console)]
        + list(extra_callbacks or []),
        logging_config=ray.train.LoggingConfig(log_level=_train_log_level()),
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "source": source, "vocab_size": vocab_size,
                           "tokenizer_json": tokenizer_json, "stop_signal": stop_signal,
                           "env": {k: v for k, v in os.environ.items() if k.startswith("TST_")}},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo", timeout_s=sc.collective_timeout_s),
        scaling_config=scaling,
        run_config=run_config,
    )
    ray_internals.skip_unused_datasets_callback(trainer)  # no `datasets`: no idle DatasetManager per (re)start
    if on_local_ray():  # no placement-group cleaner, no autoscaler requests: nothing outlives this Ray
        ray_internals.lean_local_trainer(trainer)
    return trainer


RESERVATIONS_FILE = "ray_train_reservations.txt"  # in the run folder: one controller's requester id a line


def release_earlier_reservations(run_dir: str, trainer) -> int:
    """Before a run's (re)start: cancel the worker reservations that its earlier Ray Train controllers left in the
    cluster's AutoscalingCoordinator, then record this controller's id in the run folder.

    An elastic run's controller reserves its workers' resources there; a driver SIGKILLed with its controller
    never cancels, and for 180 s (Ray's expiry) the resumed run saw no free train node and waited (found by
    bench/chaos.py --combined: `tst train --resume` after a driver kill on a 3-node cluster sat at "ready
    resources for 0 workers"). A run has one driver, so no earlier controller of this run folder is alive when a
    new one starts. Returns how many reservations were cancelled."""
    from pipeline.ray_internals import cancel_autoscaling_requests, train_requester_id

    path = os.path.join(run_dir, RESERVATIONS_FILE)
    try:
        with open(path) as f:
            earlier = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        earlier = []
    n = cancel_autoscaling_requests(earlier)
    mine = train_requester_id(trainer)
    with open(path, "w") as f:  # the earlier ones are gone (cancelled, or expired with their cluster)
        f.write(f"{mine}\n" if mine else "")
    return n
