"""Which Ray a command runs on: the cluster in $RAY_ADDRESS, or a local Ray started with only what a run needs, and
how any process of that Ray knows it is on one.

Apart from the Ray Train edge (pipeline/train/ray_train.py) because `tst data prepare` and `tst tune` start Ray too
and need none of Ray Train: importing this module imports no Ray at all (each function imports what it uses),
where importing the Ray Train edge costs ~1.8 s (Ray Train and pandas).
"""

from __future__ import annotations

import os

from pipeline import ray_internals

LOCAL_RAY_LABEL = "tst-local-ray"  # node label of a Ray started by `start_local_ray` (value "1")


def start_local_ray(num_cpus: int, *, dashboard: bool = False, **init_kwargs) -> None:
    """`ray.init` of a local Ray (one node that ends with this process) with only what a run needs, as `tst` starts
    it when $RAY_ADDRESS is unset (the test session's Ray too).

    - No dashboard unless asked (scaling.ray_dashboard): its web server and its eight module processes cost ~1.5 s
      of `ray.init` and ~5 CPU-seconds on 2 cores (measured 2026-12-03), and a local run reads its progress from
      the console and MLflow. With the dashboard, its port is picked here and exported for the state API
      (pipeline/ray_env.py).
    - No autoscaler monitor, no usage-stats API server (`ray_internals.lean_local_head`) and no prestarted idle
      workers: processes that only serve a cluster, or that nothing here uses.
    - The node is labelled LOCAL_RAY_LABEL, so that any process of this Ray (the driver, a Tune trial) knows it
      is on such a Ray (`on_local_ray`) and starts its trainers lean (`ray_internals.lean_local_trainer`).
    """
    import ray

    from pipeline.ray_env import free_port, local_ray_env, ray_train_env

    ray_train_env()  # before ray.init: the local raylet, and so the Ray Train controller, inherit it
    port = free_port() if dashboard else None
    local_ray_env(port)
    kwargs = {"dashboard_host": "127.0.0.1", "dashboard_port": port} if dashboard else {}
    # No idle workers prestarted for the first driver: Ray Train's controller and workers carry their own runtime
    # env (env_vars), so they never reuse them, and a `tst data prepare` measured no slower without them (23.7-27.6 s
    # with either, 2026-12-03); on 2 cores their two imports of Ray slowed `ray.init` and the controller's start.
    system_config = {"prestart_worker_first_driver": False, **init_kwargs.pop("_system_config", {})}
    with ray_internals.lean_local_head(api_server=dashboard):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, labels={LOCAL_RAY_LABEL: "1"},
                 _system_config=system_config, **kwargs, **init_kwargs)


def on_local_ray() -> bool:
    """Whether this process is connected to a Ray that `start_local_ray` started (its node carries the label)."""
    import ray

    try:
        return ray.get_runtime_context().get_node_labels().get(LOCAL_RAY_LABEL) == "1"
    except Exception:  # noqa: BLE001 - not connected, or an older Ray without labels
        return False


def ensure_ray(cfg) -> None:
    """Connect to the cluster in $RAY_ADDRESS, or start a local Ray sized for this machine.

    The 2-core trap (stack notes): `ray.init()` on 2 cores reports 2 CPUs and 1-CPU train workers then starve
    Ray Data. Locally we start Ray with max(4, cores) logical CPUs, so the trainer's CPUs (one 1-CPU worker in
    recipes/tiny.yaml) leave room for the Ray Data tasks and actors.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        start_local_ray(cfg.scaling.ray_num_cpus or max(4, os.cpu_count() or 1), dashboard=cfg.scaling.ray_dashboard)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
