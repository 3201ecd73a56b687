"""Driver for tests/test_elastic.py, run as its own process (never imported by pytest).

It builds a multi-node Ray cluster on this machine with `ray.cluster_utils.Cluster` (a head with no train_node, plus
two nodes with `train_node: 1` each, all on 127.0.0.1), connects to it, and runs a real `run_training` with
elastic scaling `(min_workers=1, num_workers=2)` and `worker_resources={train_node: 1}`, so each train worker
needs a node of its own. A watcher thread follows the run (a controller-side callback appends every report with
its wall time to events.jsonl) and, per the plan in argv[1]:
  1. faults inside the workers: TST_INJECT_FAILURE SIGKILLs rank 1 (FailureConfig restarts the group), then
     SIGSTOPs it in the restarted group (the collective timeout ends the hang; the group restarts again);
  2. once step REMOVE_AFTER is logged at world size 2 (a checkpoint step), removes one train node;
  3. once SHRUNK_STEPS steps are logged at world size 1, adds a train node back;
then the run goes on to the end. Steps are paced while the group is shrunk (the window source sleeps PACE_S[1] per step, else
PACE_S[0]) so that the run is still going when Ray grows it back; pacing changes timing only, never the data or
the math.

Everything it learns goes to argv[2] (JSON); the cluster is shut down before exit.
"""

import json
import os
import sys
import threading
import time

plan = json.loads(sys.argv[1])
result_path = sys.argv[2]
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1 (loopback only)
os.environ["TOKENIZERS_PARALLELISM"] = "false"
for k, v in plan.get("env", {}).items():
    os.environ[k] = v

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.train import UserCallback  # noqa: E402

EVENTS = os.path.join(plan["out"], "events.jsonl")
PACE = os.path.join(plan["out"], "pace_s")


def set_pace(seconds):
    with open(PACE + ".tmp", "w") as f:
        f.write(str(seconds))
    os.replace(PACE + ".tmp", PACE)


class EventLog(UserCallback):
    """In the Ray Train controller (this machine): each rank-0 report and each worker failure, with wall time."""

    def __init__(self, path):
        self.path = path

    def _write(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        if m and "train_loss" in m:
            self._write({"t": time.time(), "kind": "report", "step": m["step"], "world_size": m["world_size"],
                         "checkpoint": checkpoint is not None})

    def after_exception(self, run_context, worker_exceptions):
        self._write({"t": time.time(), "kind": "worker_error",
                     "errors": {str(r): type(e).__name__ for r, e in worker_exceptions.items()}})


class PacedSource:
    """The real window source with a sleep per step, read from a file the watcher sets (timing only: the windows
    are the inner source's, untouched)."""

    def __init__(self, inner, pace_file):
        self.inner = inner
        self.pace_file = pace_file

    def __getattr__(self, name):
        if name.startswith("__") or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.inner, name)

    def iter_steps(self, start_step, rank, world_size):
        for item in self.inner.iter_steps(start_step, rank, world_size):
            try:
                with open(self.pace_file) as f:
                    time.sleep(float(f.read() or 0))
            except (OSError, ValueError):
                pass
            yield item


def read_events():
    if not os.path.exists(EVENTS):
        return []
    with open(EVENTS) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    import pipeline.runner as runner
    from pipeline.config import apply_overrides, Config

    t_start = time.time()
    # own ports and temp dir: other Ray instances on this machine are left alone
    common = {"temp_dir": plan["temp_dir"]}
    # dashboard_port too: Ray binds it even with include_dashboard=False, and a Ray already serving its dashboard
    # on the default 8265 (a `tst tune` beside the tests) made this head time out at startup
    head_args = {"num_cpus": 2, "include_dashboard": False, "gcs_server_port": plan["ports"][0],
                 "dashboard_agent_listen_port": plan["ports"][1], "dashboard_port": plan["ports"][2], **common}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    train_node = {"num_cpus": 1, "resources": {"train_node": 1}, **common}
    nodes = [cluster.add_node(**train_node) for _ in range(2)]
    # Ray Data's AutoscalingCoordinator, whose view of the cluster sizes each restart of the elastic group, refreshes
    # every 20 s; a 2 s tick (every Ray worker process of this job, set by a setup hook) keeps the resizes short
    from pipeline.cli.job import runtime_env as job_runtime_env
    from pipeline.ray_internals import COORDINATOR_TICK_ENV, coordinator_tick_hook

    ray.init(address=cluster.address, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": coordinator_tick_hook,
                          # what `ray job submit` with pipeline/cli/job.py's runtime env gives a job's processes
                          "env_vars": {**job_runtime_env()["env_vars"],
                                       COORDINATOR_TICK_ENV: str(plan.get("coordinator_tick_s", 20))}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    out = {"cluster_up_s": time.time() - t_start, "marks": {}}

    orig_prepare = runner.prepare_data

    def prepare_data(cfg, output_dir, mode, **kw):
        tok, source = orig_prepare(cfg, output_dir, mode, **kw)
        return tok, PacedSource(source, PACE)

    runner.prepare_data = prepare_data

    # Ray Train's elastic policy re-checks the cluster every scaling.elastic_resize_interval_s (60 s by default)
    # while the group is healthy; a short interval keeps this test short.
    interval = plan.get("resize_interval_s")
    extra = [f"scaling.elastic_resize_interval_s={interval}"] if interval is not None else []
    cfg = apply_overrides(Config(), plan["overrides"] + extra)
    # A node-local store on this multi-node cluster is refused in one line (the run below declares the disk shared)
    from types import SimpleNamespace

    try:
        runner.check_store_reachable(apply_overrides(cfg.copy(), ["data.store_shared=false"]),
                                     SimpleNamespace(uri=os.path.join(plan["out"], "stores", "any")))
        out["node_local_store"] = "accepted"
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["node_local_store"] = f"{type(e).__name__}: {e}"

    def train():
        try:
            summary = runner.run_training(cfg, use_ray=True, name=plan["name"], console=True,
                                          extra_callbacks=[EventLog(EVENTS)])
            out["summary"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}
        except Exception as e:  # reported to the test, which fails with it
            out["error"] = f"{type(e).__name__}: {e}"

    # Training runs in a thread (Ray Train skips its SIGINT handler off the main thread); the main thread watches,
    # because Cluster.add_node() installs signal handlers and so only works there.
    set_pace(plan["pace_s"][0])
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    removed = added = regrown = False
    while trainer.is_alive():
        ev = [e for e in read_events() if e["kind"] == "report"]
        if not removed and any(e["world_size"] == 2 and e["step"] >= plan["remove_after"] for e in ev):
            victim = nodes.pop()
            out["marks"]["remove_t"] = time.time()
            cluster.remove_node(victim)
            out["marks"]["removed_t"] = time.time()
            removed = True
            set_pace(plan["pace_s"][1])  # slow steps while Ray notices the node and grows the group back
            print(f"[elastic-test] removed a train node after step {plan['remove_after']}", flush=True)
        elif removed and not added and sum(e["world_size"] == 1 for e in ev) >= plan["shrunk_steps"]:
            out["marks"]["add_t"] = time.time()
            nodes.append(cluster.add_node(**train_node))
            out["marks"]["added_t"] = time.time()
            added = True
            print("[elastic-test] added a train node back", flush=True)
        elif added and not regrown and ev and ev[-1]["world_size"] == 2:
            regrown = True
            set_pace(plan["pace_s"][0])
        trainer.join(0.1)
    out["events"] = read_events()
    with open(result_path, "w") as f:
        json.dump(out, f)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
