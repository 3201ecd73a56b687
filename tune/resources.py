"""How many trials run at a time and with what: the CPUs (real cores on a local machine, the cluster's CPUs on a
cluster) and GPUs divided by what one trial's training costs, and the torch threads per trial. See "Resources"
in tune/search.py for the decisions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.config import Config
from tune.space import SearchSpec


@dataclass
class ResourcePlan:
    """What `plan_resources` decided (CPU counts in Ray CPUs; `trial_resources` goes to `tune.with_resources`)."""

    usable_cpus: float
    train_cpus: float
    data_cpus: float
    per_trial_cpus: float
    max_concurrent: int
    threads: int
    trial_resources: dict
    note: str


def plan_resources(cfg: Config, spec: SearchSpec, backend: str, n_trials: int) -> ResourcePlan:
    """Trials at a time (`max_concurrent`), each trial's Tune resources and torch threads, and a one-line note."""
    import ray

    sc = cfg.scaling
    cluster = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    on_cluster = os.environ.get("RAY_ADDRESS", "local") not in ("", "local") or len(alive) > 1
    cpus = float(cluster.get("CPU", 1.0))
    usable = cpus if on_cluster else min(cpus, float(os.cpu_count() or 1))
    workers = 1 if backend == "local" else max(1, sc.num_workers)
    # A training process keeps at least one core busy whatever fraction of a logical CPU it reserved (the
    # tiny recipe's workers ask for 0.5 to dodge the 2-core trap), so the budget counts whole cores per worker.
    train_cpus = workers * max(1.0, sc.cpus_per_worker)
    # The driver prepares the token store before any trial starts; trials only read it (no data share).
    data_cpus = 0.0
    per_trial = float(spec.cpus_per_trial or train_cpus)
    limit = max(1, int(usable // per_trial + 1e-9))
    if sc.use_gpu:
        gpus = float(cluster.get("GPU", 0.0))
        per_gpu = workers * sc.gpus_per_worker
        limit = min(limit, max(1, int(gpus // per_gpu))) if per_gpu else limit
    max_conc = max(1, min(spec.max_concurrent or limit, n_trials or 1))
    threads = cfg.train.threads or max(1, int(train_cpus // workers))
    if backend == "local":
        res = {"cpu": train_cpus}
        if sc.use_gpu:
            res["gpu"] = sc.gpus_per_worker
    else:
        res = {"cpu": 0.1}  # the trainable only waits on fit(); the TorchTrainer's workers reserve their own
    note = (f"{usable:g} CPUs usable ({'cluster' if on_cluster else 'local cores'}), {per_trial:g} per trial "
            f"(train {train_cpus:g} + data {data_cpus:g}), {threads} torch thread(s) per worker: "
            f"{max_conc} trial(s) at a time")
    return ResourcePlan(usable, train_cpus, data_cpus, per_trial, max_conc, threads, res, note)


__all__ = ["ResourcePlan", "plan_resources"]
