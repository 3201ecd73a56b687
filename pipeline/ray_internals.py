"""Every use of a private Ray API in tst, in one place (checked against Ray 2.60.0, the version pyproject pins).

Each function says what it relies on and what is lost if Ray moves it: all of them only change what the console
shows, re-read a setting or skip an idle process, so a failure here is caught and costs verbosity or a few
CPU-seconds, never correctness. When upgrading
Ray, check each `from ray... import` below still resolves (tests/test_cli.py exercises all of them through a quiet
`tst train`); prefer a public API as soon as one does the job.
"""

from __future__ import annotations

import contextlib
import logging
import sys


def refresh_ray_config() -> None:
    """Re-read Ray's C++-side config (RAY_AUTH_MODE among it), which Ray caches when imported.

    Relies on `ray._raylet.Config.initialize("")`, the call Ray itself makes when it turns token auth on by default
    (`ray._private.authentication.authentication_token_setup._enable_token_auth`). No public API re-reads it.
    If it fails, `ray.init` uses the mode read at import time."""
    try:
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # noqa: BLE001
        pass


def reconfigure_ray_data_logging() -> None:
    """Apply RAY_DATA_LOGGING_CONFIG again when `ray.data` was imported before it was set.

    Relies on `ray.data._internal.logging.configure_logging()` (Ray Data reads the variable only at import; the
    public `ray.data` has no re-configure call). If it fails, only the driver's console is louder."""
    if "ray.data" not in sys.modules:
        return
    try:
        from ray.data._internal.logging import configure_logging

        configure_logging()
    except Exception:  # noqa: BLE001
        pass


def set_train_report_log_level(level: str) -> None:
    """Ray Train 2.60 logs every `ray.train.report` at INFO on a logger named after its own file
    (`ray/train/v2/_internal/execution/context.py`), which `ray.train.LoggingConfig` does not reach.

    Relies on that module's path. If it moves, the per-report INFO lines come back; nothing else changes."""
    try:
        from ray.train.v2._internal.execution import context as _ctx

        logging.getLogger(_ctx.__file__).setLevel(level.upper())
    except Exception:  # noqa: BLE001
        pass


def skip_unused_datasets_callback(trainer) -> bool:
    """Keep a `TorchTrainer` without `datasets` from starting Ray Data's DatasetManager actor.

    Ray Train 2.60's `DataParallelTrainer._create_default_callbacks` always adds a `DatasetsCallback`, whose
    `before_init_train_context` starts a DatasetManager actor (one more Ray worker process: about 4 CPU-seconds on
    2 cores) at every worker-group start, restarts included, even when the trainer has no datasets. tst's ranks
    read the token store themselves and pass no `datasets`, so that actor never serves a shard; without the callback
    the workers' train context gets `dataset_shard_provider=None` (Ray's own default), which only
    `ray.train.get_dataset_shard` would read. Relies on `ray.train.v2._internal.callbacks.DatasetsCallback` and
    the trainer's `_create_default_callbacks` and `datasets`; if Ray moves them, nothing changes (the idle actor
    is started as before). Returns whether the callback is now skipped."""
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback

        if trainer.datasets:
            return False
    except (ImportError, AttributeError):
        return False
    return _drop_default_callbacks(trainer, DatasetsCallback)


def _drop_default_callbacks(trainer, *classes) -> bool:
    """Leave the callbacks of these classes out of what the trainer's `_create_default_callbacks` (Ray 2.60) hands
    its controller, at every `fit`. Returns False (nothing changed) if the trainer has no such method."""
    try:
        make = trainer._create_default_callbacks
    except AttributeError:
        return False

    def create_default_callbacks():
        return [cb for cb in make() if not isinstance(cb, classes)]

    trainer._create_default_callbacks = create_default_callbacks
    return True


def lean_local_trainer(trainer) -> bool:
    """Keep a `TorchTrainer` on a local Ray (one node that ends with the process that started it: `tst`'s own, the
    test session's) from starting two actors that only serve a cluster that outlives its drivers.

    - `PlacementGroupCleaner`: a detached actor that removes the placement groups of a controller that died
      without cleaning up, on a cluster that lives on. A local Ray ends with its driver, and the controller
      removes its placement group itself on every normal or failed end.
    - Ray Data's `AutoscalingCoordinator`, which a fixed-size run's scaling policy asks for its workers'
      resources (forwarded to the autoscaler as demand). A local Ray has no autoscaler.

    Each is a new Ray worker process importing ray.train or ray.data (4.3 and 2.8 CPU-seconds measured on 2 cores)
    on the way to the first step: the controller waits for the coordinator's answer when it starts and for the
    cleaner's registration after each worker-group start, restarts included. Elastic runs keep the coordinator
    (their policy sizes the group from it).

    Relies on (Ray 2.60.0) the trainer's `_create_default_callbacks` (as `skip_unused_datasets_callback`),
    `DataParallelTrainer._initialize_and_run_controller(**kwargs)` receiving `scaling_policy` from `fit`,
    `PlacementGroupCleanerCallback` and `FixedScalingPolicy` with its `_maybe_send_resource_request` /
    `_send_resource_request` / `_cancel_resource_request` hooks. If Ray moves them, nothing changes (both actors
    start as before). Returns whether the trainer is now lean."""
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

        run = trainer._initialize_and_run_controller
        policy_cls = __getattr__("NoAutoscalerFixedPolicy")  # a bare name inside the module skips __getattr__
    except (ImportError, AttributeError):
        return False
    if not _drop_default_callbacks(trainer, PlacementGroupCleanerCallback):
        return False

    def initialize_and_run_controller(**kwargs):
        policy = kwargs.get("scaling_policy")
        if type(policy) is FixedScalingPolicy:
            kwargs["scaling_policy"] = policy_cls(scaling_config=policy.scaling_config)
        return run(**kwargs)

    trainer._initialize_and_run_controller = initialize_and_run_controller
    return True


@contextlib.contextmanager
def lean_local_head(*, api_server: bool):
    """Inside it, `ray.init` of a local Ray starts its head without the processes that only serve a cluster or a
    person: the autoscaler monitor (`monitor.py`; a local Ray has nothing to scale) and, unless `api_server`, the
    dashboard's API server (`dashboard.py`; with `include_dashboard=False` Ray 2.60 still starts it, loading only
    its usage-stats module, which logged "Usage reporting is disabled" here).

    Each is a Python process that imports half of Ray while the head starts on the same cores, and `ray.init`
    waits, polling every 0.1 s, until the API server has written its address (1.6 s of a 5.1 s `ray.init`,
    profiled on 2 cores, 2026-12-03). Without them the local Ray serves drivers, tasks, actors, logs and runtime
    environments as before; `ray status` and the dashboard's state API are what is missing, and
    scaling.ray_dashboard=true brings the API server back.

    Relies on (Ray 2.60.0) `ray._private.node.Node.start_monitor()` and `.start_api_server(...)`, both called by
    the head's `start_head_processes` and both optional there (Ray's own `no_monitor` parameter, not reachable
    from `ray.init`; a head without an API server keeps `webui_url` None). If Ray renames them, nothing changes:
    both processes start as before."""
    try:
        from ray._private.node import Node

        saved = {name: Node.__dict__[name] for name in ("start_monitor", "start_api_server")}
    except (ImportError, KeyError):
        yield
        return
    Node.start_monitor = lambda self: None
    if not api_server:
        Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Node, name, fn)


def set_search_properties_compat(set_search_properties, metric, mode, config, **spec) -> bool:
    """Forward `Searcher.set_search_properties` to a wrapped searcher the way Tune does for its own wrappers
    (`ray.tune.search.util._set_search_properties_backwards_compatible`, which accepts searchers written before
    the `**spec` argument existed). Falls back to the modern signature if Tune drops the helper.

    Used by `tune.schedule.BaselineFirst`, which stays instead of Tune's public `points_to_evaluate` (its
    docstring says why: checked against Ray 2.60.0 and Optuna 5.0.0)."""
    try:
        from ray.tune.search.util import _set_search_properties_backwards_compatible as compat
    except ImportError:
        return set_search_properties(metric, mode, config, **spec)
    return compat(set_search_properties, metric, mode, config, **spec)


COORDINATOR_TICK_ENV = "TST_COORDINATOR_TICK_S"


def coordinator_tick_hook() -> None:
    """A `worker_process_setup_hook` for tests and benches on a local cluster: every Ray worker process sets the
    tick of Ray Data's AutoscalingCoordinator to $TST_COORDINATOR_TICK_S seconds (20 s in Ray 2.60, hard-coded).

    Ray Train's elastic policy sizes a (re)started worker group from the coordinator's view of the cluster, which
    the coordinator refreshes (and forwards as autoscaler resource requests) once per tick; so each resize of an
    elastic run waits up to one tick for the view to catch up. Never used by `tst` itself: a test that shortens it
    measures Ray's machinery, not its 20 s timer. Relies on the class attribute
    `ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator._AutoscalingCoordinatorActor.TICK_INTERVAL_S`,
    read by the actor's tick thread; if Ray moves it, the tick stays 20 s and tests only take longer."""
    import os

    tick = os.environ.get(COORDINATOR_TICK_ENV)
    if not tick:
        return
    try:
        from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coord

        coord._AutoscalingCoordinatorActor.TICK_INTERVAL_S = float(tick)
    except Exception:  # noqa: BLE001
        pass


def train_requester_id(trainer) -> "str | None":
    """The id under which a TorchTrainer's controller will reserve its workers' resources in Ray Data's
    AutoscalingCoordinator (elastic scaling): "train-" + its TrainRunContext's run_id, which the driver creates in
    the trainer's constructor. Relies on (Ray 2.60.0) `DataParallelTrainer.train_run_context.run_id` and the
    format in `ray/train/v2/_internal/execution/scaling_policy/scaling_policy.py` (`after_controller_start`).
    None if Ray moves them: then nothing is released (see `cancel_autoscaling_requests`)."""
    try:
        return f"train-{trainer.train_run_context.run_id}"
    except AttributeError:
        return None


def cancel_autoscaling_requests(requester_ids) -> int:
    """Cancel resource reservations in Ray Data's AutoscalingCoordinator, the detached actor every job of a cluster
    shares (name and namespace "AutoscalingCoordinator"), through its `cancel_request(requester_id)` (what a Ray
    Train controller calls when it ends normally; a no-op for an unknown id). Returns how many calls went through.

    Why: a controller killed with its driver (SIGKILL, a lost head process) never cancels, and its reservation of
    every train node lives for Ray Train's AUTOSCALING_REQUESTS_EXPIRE_TIME_S (180 s in Ray 2.60); an elastic run
    resumed meanwhile is told "ready resources for 0 workers" and waits it out. If Ray moves the actor or the
    method, nothing is cancelled and a resume after a driver kill waits those 180 s again (bench/chaos.py
    --combined measures it)."""
    ids = [r for r in requester_ids if r]
    if not ids:
        return 0
    try:
        import ray

        coord = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except Exception:  # noqa: BLE001 - no coordinator on this cluster: nothing reserved
        return 0
    n = 0
    for rid in ids:
        try:
            ray.get(coord.cancel_request.remote(requester_id=rid), timeout=10)
            n += 1
        except Exception:  # noqa: BLE001
            pass
    return n


# ---------------------------------------------------------------------------------------------------------------
# The local autoscaling cluster (pipeline/local_cluster.py): Ray's autoscaler over its fake multi-node provider
# ---------------------------------------------------------------------------------------------------------------

# The id `ray start --head` gives the head when RAY_FAKE_CLUSTER=1 (ray/scripts/scripts.py sets
# RAY_OVERRIDE_NODE_ID_FOR_TESTING to it), which the fake provider lists as its head instance.
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
# The fake provider tags its head with this node type whatever the config calls it.
FAKE_HEAD_NODE_TYPE = "ray.head.default"
# The provider the local autoscaling cluster names: Ray's FakeMultiNodeProvider with a boot delay (below).
FAKE_PROVIDER_CLASS = "pipeline.ray_internals.BootDelayFakeProvider"


def __getattr__(name: str):
    """`BootDelayFakeProvider` and `NoAutoscalerFixedPolicy` are built on first access (the autoscaler's monitor and
    a Ray Train controller find them by name), so importing this module imports neither Ray's autoscaler nor Ray
    Train."""
    builders = {"BootDelayFakeProvider": _boot_delay_provider, "NoAutoscalerFixedPolicy": _no_autoscaler_policy}
    if name in builders:
        cls = builders[name]()
        globals()[name] = cls  # the same object on every lookup: pickled by reference, found again when unpickled
        return cls
    raise AttributeError(name)


def _no_autoscaler_policy():
    """Ray Train's `FixedScalingPolicy` without the AutoscalingCoordinator (see `lean_local_trainer`): the same
    decisions (start `num_workers`, never resize), no resource requests. Built on first access, as a module
    attribute, so that the controller that unpickles it finds it by name."""
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    class NoAutoscalerFixedPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context):
            pass  # the base class creates the coordinator's client here and sends the first request

        def _maybe_send_resource_request(self):
            pass

        def _send_resource_request(self):
            pass

        def _cancel_resource_request(self):
            pass

    NoAutoscalerFixedPolicy.__module__ = __name__
    NoAutoscalerFixedPolicy.__qualname__ = "NoAutoscalerFixedPolicy"
    return NoAutoscalerFixedPolicy


def _boot_delay_provider():
    """Ray's `FakeMultiNodeProvider` whose nodes take `provider.boot_s` seconds to appear after the autoscaler asks
    for them, as a cloud VM takes to boot (the fake provider starts a raylet at once). Without it, a preempted
    train node was replaced before Ray Train had restarted the run, so the shrink to fewer workers that a real
    replacement (minutes) forces never happened here.

    Relies on (Ray 2.60.0) `ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider` and its
    `create_node_with_resources_and_labels(node_config, tags, count, resources, labels)`, which autoscaler v2
    calls to launch and then matches against `non_terminated_nodes()`; a request stays REQUESTED meanwhile (for up
    to RAY_AUTOSCALER_RECONCILE_REQUEST_STATUS_TIMEOUT_S, 10 min)."""
    import threading
    import time

    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    class BootDelayFakeProvider(FakeMultiNodeProvider):
        def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            boot_s = float(self.provider_config.get("boot_s", 0) or 0)
            if boot_s <= 0:
                return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            launch = super().create_node_with_resources_and_labels

            def boot():
                time.sleep(boot_s)
                launch(node_config, tags, count, resources, labels)

            threading.Thread(target=boot, daemon=True, name="fake-node-boot").start()

    return BootDelayFakeProvider


def fake_multinode_provider(gcs_address: str, boot_s: float = 0.0) -> tuple[dict, dict]:
    """(provider config, env of `ray start --head`) for Ray's fake multi-node provider under autoscaler v2 (the
    autoscaler `ray up` starts since Ray 2.50).

    Relies on (Ray 2.60.0): the class `FakeMultiNodeProvider` (ray/autoscaler/_private/fake_multi_node/
    node_provider.py: each "instance" is a raylet it starts on this machine with the node type's resources and
    labels; `gcs_address` points it at a head that is not on port 6379; `launch_multiple` and `head_node_id` are
    what v2 needs), here through `BootDelayFakeProvider` named as an `external` provider module (the
    `fake_multinode` provider type loads its defaults from fake_multi_node/example.yaml, which the 2.60.0 wheel
    does not ship), and the variables `ray.cluster_utils.AutoscalingCluster.start` sets: RAY_FAKE_CLUSTER (the
    provider refuses to start without it), AUTOSCALER_UPDATE_INTERVAL_S, RAY_enable_autoscaler_v2 and
    RAY_CLOUD_INSTANCE_ID of the head. We do not call AutoscalingCluster itself: its `start()` and `shutdown()`
    run `ray stop --force`, which kills every Ray on the machine, and it reads that missing example.yaml too. If
    Ray changes these, the local exercise fails to start (it cannot pass silently)."""
    provider = {"type": "external", "module": FAKE_PROVIDER_CLASS, "use_node_id_as_ip": True,
                "disable_node_updaters": True, "disable_launch_config_check": True, "gcs_address": gcs_address,
                "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID, "boot_s": boot_s}
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
           "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_NODE_TYPE_NAME": FAKE_HEAD_NODE_TYPE}
    return provider, env


def autoscaler_status(gcs_address: str, timeout_s: int = 10):
    """The autoscaler's own view of the cluster (what `ray status` prints under autoscaler v2): a
    `ray.autoscaler.v2.schema.ClusterStatus` with active/idle/pending nodes by node type, pending and failed
    launches, and the resource demands it is trying to meet.

    Relies on `ray.autoscaler.v2.sdk.get_cluster_status` (Ray 2.60.0; not underscore-private, but not in Ray's
    public API reference either; `ray status` calls it). No public API returns this as data."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    return get_cluster_status(gcs_address, timeout=timeout_s)
