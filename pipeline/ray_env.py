"""What a healthy run prints: our progress lines, the summary and real warnings, nothing else.

Each line a successful `tst train` / `tst demo` / `tst tune` used to print, its cause, and what removes it at
its source (no global change of `log_to_driver` or of Ray's log levels; every line removed from the console
still goes to its log file):

- Ray, WARNING "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out":
  Ray 2.60 turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset, and says so. For
  the Ray we start we set RAY_AUTH_MODE=token ourselves (the same mode, now chosen; Ray does not warn about an
  explicit mode). A user's own RAY_AUTH_MODE wins.
- Ray Train, a 28-line traceback from `PlacementGroupCleaner` ("Found multiple active Ray instances" or "Timed
  out waiting for GCS"): the cleaner asks the state API whether the controller is alive without an address, so
  Ray looks for a cluster in $RAY_ADDRESS, then /tmp/ray/ray_current_cluster (written only by `ray start`),
  then by listing every gcs_server process on the machine; with two Rays on the machine (another run, a test
  session) it cannot choose and the monitor thread dies. A local Ray now starts no cleaner at all (it guards
  placement groups on a cluster that outlives its controller: `ray_internals.lean_local_trainer`), nor, unless
  asked, a dashboard; with one (scaling.ray_dashboard) we start it on a port we pick and export
  RAY_API_SERVER_ADDRESS=http://127.0.0.1:PORT before `ray.init`, so that any state-API call of the raylet's
  workers asks our own cluster.
- Ray core, ERROR "Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object store
  and max_restarts > 0": Ray Train 2.60 starts a watcher for spot-node preemption (max_restarts=-1, the worker
  handles as arguments). A local Ray is one node that cannot be preempted: RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0
  (one actor process fewer at start, too). On a cluster ($RAY_ADDRESS) the watcher stays.
- the same line for "MapWorker(MapBatches(_TokenizeActor))": Ray Data puts the map function in the object
  store and gives its actors max_restarts=-1 by default. On a one-node Ray a tokenizer actor that dies has
  nowhere else to go (an OOM kill would repeat); `pipeline.data.prepare` passes max_restarts=0 there (a killed
  prepare resumes from its committed shards on the next command), and keeps Ray Data's default on a cluster.
- Ray Data, WARNING "Progress bars disabled. To enable, set ...", and INFO "Starting execution of Dataset ...",
  "Execution plan of Dataset ...", "... execution finished in N seconds": we turn the progress bars off on
  purpose (our `[tst] data:` line reports the prepare). RAY_DATA_LOGGING_CONFIG (Ray Data's documented logging
  config) points at `ray_data_logging.yaml` beside this file: Ray Data's own default config with the console
  handler at WARNING and that one notice dropped; ray-data.log in the session's logs keeps every line.
- MLflow, INFO "Creating initial MLflow database tables..." / "Updating database tables" (first use of a new
  SQLite store): the `mlflow.store.db.utils` logger at WARNING.
- Tune, "To visualize your results with TensorBoard, run: `tensorboard --logdir ...`" and its results table:
  Tune adds a TensorBoard logger by default (and prints where to point TensorBoard, which is not installed)
  and its progress reporter prints a table at start even at verbose=0. `tune.search` passes Tune's CSV and JSON
  loggers itself with TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1 (no TensorBoard logger) and our own console lines
  replace the reporter (RAY_AIR_NEW_OUTPUT=0: the legacy reporter, silent at verbose=0).

- Ray Train, every line a worker prints (rank 0's "[tst] resumed from ..." among them) shown twice: Ray Train
  2.60 patches `print` in its processes to log each call through the root logger as well, and the worker's
  stdout reaches the driver too. RAY_TRAIN_ENABLE_PRINT_PATCH=0 (a variable Ray Train propagates from the
  driver to its controller and workers; set by `ray_train_env` before every fit, on a cluster too): a print is
  one line again (measured: 2 copies with the patch, 1 without).
- Ray core, an empty "(TrainController pid=...)" line now and then after a progress line: a Ray worker's stdout
  flushes every write (`Unbuffered`), `print` writes the text and its newline apart, and the log monitor, reading
  between the two, publishes the text and then the newline as a line of its own. Lines printed in Ray's processes
  go through `pipeline.train.metrics.say`, one write each (tests/test_trainer.py).

Kept on purpose: Ray's INFO "Started a local Ray instance." (with scaling.ray_dashboard=true: "View the dashboard
at ...", where it is), and every WARNING or ERROR that is not one of the above.
"""

from __future__ import annotations

import logging
import os
import random
import socket

from pipeline import ray_internals

RAY_DATA_LOGGING_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")

# Ray Data notices that only describe a choice we made on purpose (see the module docstring).
_DROPPED_RAY_DATA_NOTICES = ("Progress bars disabled",)


class DropRayDataNotices(logging.Filter):
    """Ray Data console filter (named in ray_data_logging.yaml): Ray Data's hidden records, as its own
    `HiddenRecordFilter`, and the notices above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hide", False):
            return False
        msg = record.getMessage()
        return not any(msg.startswith(n) for n in _DROPPED_RAY_DATA_NOTICES)


def console_defaults() -> None:
    """Process-wide settings for the `tst` command, before anything imports Ray or MLflow. Each is a default:
    a value the user set in the environment wins."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING_YAML)
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray, if one starts: token auth, as Ray's default, but chosen
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for a port-0 bind or an outgoing connection (Linux: from
    /proc/sys/net/ipv4/ip_local_port_range, 32768 by default; elsewhere the IANA range's 49152)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct loopback ports free right now, for servers started a moment later (a local Ray's dashboard,
    the local autoscaling cluster's servers, the tests' servers).

    Why not bind port 0 and release it: the kernel gives port-0 binds ports from its ephemeral range, and a
    starting Ray binds dozens of them (workers' gRPC servers, outgoing connections). A port we got that way and
    released could be handed to one of those before the dashboard binds it; CI hit exactly that ("Failed to
    find a valid port for dashboard ... address already in use"). We pick random ports below the ephemeral
    range, which the kernel never hands out on its own, and keep the ones that bind (all held at once, so none
    repeats); a port another server owns fails the bind and is skipped.
    """
    hi = min(_ephemeral_low(), 65536)
    lo = max(1024, hi - 12000)
    if hi - lo < 4 * n:  # an unusual ephemeral range leaves no room below it: fall back to the kernel's choice
        lo, hi = 0, 0
    rng = random.SystemRandom()
    socks: list[socket.socket] = []
    try:
        for _ in range(64 * n):
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", rng.randrange(lo, hi) if hi else 0))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise RuntimeError(f"found only {len(socks)} of {n} free loopback ports below {hi}; free some ports "
                               "or widen net.ipv4.ip_local_port_range")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


_SET_BY_US: dict[str, str] = {}


def local_ray_env(dashboard_port: "int | None") -> dict[str, str]:
    """Environment for a local Ray we are about to start (the raylet and every worker inherit the driver's
    environment at `ray.init`); the user's own values win. Returns what was set. dashboard_port: where its
    dashboard (and so the state API) will listen; None: no dashboard."""
    wanted = {
        "RAY_AUTH_MODE": "token",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_DATA_LOGGING_CONFIG": RAY_DATA_LOGGING_YAML,
    }
    if dashboard_port is not None:
        wanted["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    elif os.environ.get("RAY_API_SERVER_ADDRESS") == _SET_BY_US.get("RAY_API_SERVER_ADDRESS"):
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # ours, for an earlier Ray's dashboard: point nowhere now
    set_now = {}
    for k, v in wanted.items():
        if k not in os.environ or os.environ[k] == _SET_BY_US.get(k):  # ours from an earlier ray.init: renew
            os.environ[k] = _SET_BY_US[k] = set_now[k] = v
    if "RAY_AUTH_MODE" in set_now:
        ray_internals.refresh_ray_config()
    if "RAY_DATA_LOGGING_CONFIG" in set_now:
        ray_internals.reconfigure_ray_data_logging()
    return set_now


# Ray Train's controller polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and collects at
# most one `ray.train.report` per worker per poll; a worker's report blocks while its previous one is uncollected
# (a queue of one). So a run that reports (train.log_every / eval / checkpoint) more often than every 2 s is
# throttled to one report per 2 s: a 10-step test run logging every step took >= 20 s of waiting. 0.5 s keeps the
# poll (one small remote call per worker) negligible and the cap out of the way of any sane log interval.
HEALTH_CHECK_INTERVAL_S = "0.5"

# Before restarting a failed group, Ray Train asks every worker to destroy its process group and waits up to
# TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S (30 s by default) for all of them. A hung rank (SIGSTOP, a stuck kernel)
# never answers, so each hang cost its collective timeout plus those 30 s (measured: 50 s from the timeout to the
# next step, tests/test_elastic.py). Healthy ranks destroy a process group in well under a second; whatever has
# not answered after 5 s is killed with its worker anyway.
PROCESS_GROUP_SHUTDOWN_TIMEOUT_S = "5"


def ray_train_env() -> None:
    """Before a TorchTrainer starts (the driver's values are propagated to the controller and the workers:
    Ray Train's ENV_VARS_TO_PROPAGATE). A user's own setting wins."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    os.environ.setdefault("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
