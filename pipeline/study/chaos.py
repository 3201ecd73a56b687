"""Every fault kind of issue 15 in one run on a local multi-node Ray, against an uninterrupted run.

    python bench/chaos.py --combined --seeds 0,1,2      (the bench; tests/test_chaos.py runs one seed)

One `tst train` (a subprocess: the driver, which the schedule signals and resumes) of the tiny test model with 3
Ray Train workers (`scaling.min_workers=2`), each needing a `train_node`, on a `ray.cluster_utils.Cluster` (a head
without `train_node` plus 3 train nodes, all on 127.0.0.1, own ports and temp dir) that the driver joins through
RAY_ADDRESS; tracking to a real `mlflow server`; data from the token store in stream order (file order, so the run
can read behind the writer) while a throttled `tst data prepare --no-ray` (TST_PREPARE_THROTTLE_S) still writes
it. A seed draws each fault's step inside its slot; the faults come in this order, spaced so that each recovery
is seen before the next fault:

  prepare_kill    SIGKILL of the prepare while the run reads behind its frontier (the driver takes the prepare
                  over after data.writer_timeout_s)
  mlflow_restart  SIGKILL of the mlflow server (and its workers), restarted on the same port 3 steps later
  worker_kill     rank 1 SIGKILLs itself before step k (TST_INJECT_FAILURE kill mode)
  worker_stop     rank 2 SIGSTOPs itself before step k (a hung rank: the collective timeout ends it)
  driver_term     SIGTERM of the driver after step k (checkpoint, exit 0), then `tst train --resume`
  driver_kill     SIGKILL of the driver a few ms into a checkpoint write, then `tst train --resume`
  node_remove     a train node removed after step k: 3 -> 2 workers
  node_add        a train node added back after 2 steps at 2 workers: 2 -> 3 (the steps are paced meanwhile,
                  TST_STEP_PACE_FILE, so that the run is still going when Ray grows the group back)

Per fault, from the digests of the windows the workers actually read (TST_WINDOW_DIGESTS, with the process and
the time of each read): time from the fault to the next training step (for faults that restart the workers: the
first step of a new worker process), steps redone (steps read before the fault and again after it), windows lost
(a (step, row) of the reference read differently or never) and repeated (a window read at more positions than in
the reference). Over the run: losses against the reference (bit for bit while the world size is the reference's
and no resize has happened; the largest relative difference after it), final weights, MLflow runs left RUNNING,
processes left in the run's session, staging folders and temp files left.

The run happens in a child process in its own session (`python -m pipeline.study.chaos PLAN RESULT`), so whatever it
leaves behind is found (`session_pids`) and killed by the parent, and counted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("prepare_kill", "mlflow_restart", "worker_kill", "worker_stop", "driver_term", "driver_kill", "node_remove",
         "node_add")
RESTARTS = ("worker_kill", "worker_stop", "driver_term", "driver_kill", "node_remove", "node_add")
T, CKPT, WORKERS = 65, 5, 3
B, L, S, R = 6, 32, 4, 0.3
SWITCH = int(R * T + 0.5)
PACE_S = 2.5  # seconds per step from the node removal until the group is 3 again


def overrides(out: str, tracking_uri: Optional[str], store: str) -> list[str]:
    """The run's config: the tiny test model, TST (s=4, r=0.3), stream order behind the writer, elastic 2..3."""
    return [
        "model.preset=tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=128", "data.source=builtin:wiki", "data.max_documents=300", "data.tokenizer=bpe:512",
        f"data.seq_len={L}", "data.val_windows=4", "data.val_fraction=0.05", f"data.bag_size={S}",
        f"train.switch_fraction={R}", f"train.steps={T}", f"train.global_batch_size={B}", "train.micro_batch_size=1",
        "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=2",
        f"train.checkpoint_every={CKPT}", "train.keep_checkpoints=3", "train.threads=1",
        f"scaling.num_workers={WORKERS}", "scaling.min_workers=2", "scaling.cpus_per_worker=0.5",
        "scaling.max_failures=20", "scaling.collective_timeout_s=10", "scaling.worker_resources={train_node: 1}",
        "scaling.elastic_resize_interval_s=5",
        # behind the writer: file order; the fake nodes share this machine's disk (a real cluster: s3:// or gs://)
        "data.batch_layout=stream", "data.shuffle=false", "data.store_shared=true", "data.shard_tokens=1000",
        "data.writer_timeout_s=5", f"data.store={store}", f"run.output_dir={out}",
        f"run.tracking={'true' if tracking_uri else 'false'}"] + ([f"run.tracking_uri={tracking_uri}"]
                                                                   if tracking_uri else [])


def schedule(seed: int) -> dict:
    """The step of each fault (metrics steps: step k is the k-th step trained), drawn from the seed in fixed slots."""
    rng = random.Random(f"chaos-combined-{seed}")
    return {"prepare_kill": rng.randint(3, 6), "mlflow_restart": rng.randint(8, 10), "worker_kill": rng.randint(14, 17),
            "worker_stop": rng.randint(22, 25), "driver_term": rng.randint(29, 32),
            "driver_kill": rng.choice([35, 40]), "driver_kill_delay_s": rng.choice([0.005, 0.025, 0.05]),
            "node_remove": rng.randint(46, 48)}


# ---------------------------------------------------------------------------------------------------------------
# The child: cluster, servers, the faulted run
# ---------------------------------------------------------------------------------------------------------------
class Watch:
    """Every metrics.jsonl record of a run with its arrival here, kept across a resume's truncation of the file."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.keys, self.records = set(), []

    def poll(self) -> list[dict]:
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except OSError:
            return self.records
        for ln in lines:
            try:
                r = json.loads(ln)
            except ValueError:
                continue  # a line being written
            key = (r.get("step"), r.get("logged_at"), r.get("kind"))
            if key not in self.keys and "train_loss" in r:
                self.keys.add(key)
                self.records.append(r)
        return self.records

    def wait(self, cond, procs=(), timeout: float = 600, what: str = "") -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            hit = next((r for r in self.poll() if cond(r)), None)
            if hit is not None:
                return hit
            for p in procs:
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"the driver exited ({p.returncode}) while waiting for {what}")
            time.sleep(0.05)
        raise TimeoutError(f"not seen in {timeout:.0f} s: {what}")


def _tst(args: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=log, stderr=subprocess.STDOUT)


def _set_pace(path: str, seconds: float) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(str(seconds))
    os.replace(path + ".tmp", path)


def _wait_file(pred, procs=(), timeout: float = 600, what: str = "") -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"not seen in {timeout:.0f} s: {what}")
        for p in procs:
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"a process exited ({p.returncode}) while waiting for {what}")
        time.sleep(0.005)


def child(plan: dict, result_path: str) -> None:
    """Runs in its own process session (see the module docstring); writes what it saw to `result_path`."""
    from ray.cluster_utils import Cluster

    from pipeline.ray_env import free_ports
    from pipeline.ray_internals import COORDINATOR_TICK_ENV
    from pipeline.cli.job import runtime_env

    out, sched = plan["out"], plan["schedule"]
    tmp = os.path.join(out, "tmp")  # TMPDIR of every process of the run: staging folders land here, and only ours
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)  # Ray writes $TMPDIR/ray/ray_current_cluster here
    os.environ.update(TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TOKENIZERS_PARALLELISM="false",
                      RAY_AUTH_MODE="disabled", RAY_TRAIN_V2_ENABLED="1")
    os.environ.pop("RAY_ADDRESS", None)
    res: dict = {"schedule": sched, "faults": [], "t0": time.time()}
    cluster = mlflow = prep = driver = None
    logs = open(os.path.join(out, "run.log"), "w")
    try:
        ports = free_ports(3)
        common = {"temp_dir": plan["ray_temp_dir"]}
        # The dashboard serves the state API, which Ray Train's placement-group cleaner asks whether a controller
        # is alive: without it, the placement group of a SIGKILLed driver's run was never removed and held every
        # train node, so the resumed run waited forever. RAY_API_SERVER_ADDRESS (inherited by every Ray process
        # of this cluster) points the cleaner at it among the other Rays on this machine.
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{ports[2]}"
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "gcs_server_port": ports[0],
            "dashboard_agent_listen_port": ports[1], "dashboard_port": ports[2], **common})
        node_args = {"num_cpus": 1, "resources": {"train_node": 1}, **common}
        nodes = [cluster.add_node(**node_args) for _ in range(WORKERS)]
        cluster.wait_for_nodes()
        res["cluster_up_s"] = round(time.time() - res["t0"], 1)
        mlflow = _mlflow(out)
        if plan.get("check_node_local_store"):
            res["node_local_store"] = _node_local_store_refusal(cluster.address, out)
        renv = runtime_env(env={COORDINATOR_TICK_ENV: "2"})  # Ray Data's coordinator ticks every 2 s, not 20
        renv["worker_process_setup_hook"] = "pipeline.ray_internals.coordinator_tick_hook"
        renv.pop("excludes")
        # no PreemptionWatcher: these nodes are processes on one machine, never spot instances; Ray Train would start
        # one more actor process per worker-group start for nothing (bench/autoscale.py exercises preemption)
        base_env = dict(os.environ, RAY_ADDRESS=cluster.address, RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps(
            {"runtime_env": renv}), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
                        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
        if plan["reference"] == "cluster":  # an uninterrupted run of the same config on the same cluster
            ref_over = overrides(out, None, os.path.join(out, "stores-ref"))
            assert _tst(["data", "prepare", "--no-ray", *ref_over], base_env, logs).wait() == 0, "prepare failed"
            t = time.time()
            rc = _tst(["train", "--name", "reference", *ref_over], dict(base_env, TST_WINDOW_DIGESTS=os.path.join(
                out, "digests-reference")), logs).wait()
            res["reference_s"] = round(time.time() - t, 1)
            assert rc == 0, "the reference run failed"
        over = overrides(out, mlflow.url, os.path.join(out, "stores-chaos"))
        pace = os.path.join(out, "pace_s")
        _set_pace(pace, 0)
        markers = {k: os.path.join(out, f"marker-{k}") for k in ("worker_kill", "worker_stop")}
        env = dict(base_env, TST_WINDOW_DIGESTS=os.path.join(out, "digests"), TST_STEP_PACE_FILE=pace,
                   TST_INJECT_FAILURE=f"{sched['worker_kill'] - 1}:1:kill:{markers['worker_kill']},"
                                      f"{sched['worker_stop'] - 1}:2:stop:{markers['worker_stop']}")
        prep = _tst(["data", "prepare", "--no-ray", *over], dict(base_env, TST_PREPARE_THROTTLE_S=str(
            plan["prepare_throttle_s"])), logs)
        progress = os.path.join(out, "stores-chaos")

        def committed():
            for p in ([os.path.join(progress, d, "progress.json") for d in os.listdir(progress)]
                      if os.path.isdir(progress) else []):
                try:
                    with open(p) as f:
                        return json.load(f)
                except (OSError, ValueError):
                    pass
            return None

        _wait_file(lambda: (committed() or {}).get("streams", {}).get("train", {}).get("shards"), [prep],
                   what="the prepare's first shard")
        run_dir = os.path.join(out, "runs", "chaos")
        watch = Watch(run_dir)
        res["driver_start"] = [time.time()]
        driver = _tst(["train", "--name", "chaos", *over], env, logs)
        t_last = 0.0

        def fault(kind, step, t, **kw):
            res["faults"].append({"kind": kind, "step": step, "t": t, **kw})
            print(f"[chaos] {kind} at step {step}", flush=True)
            return t

        def after(step, t):  # a step >= `step` trained after time t
            return lambda r: r["step"] >= step and r["logged_at"] > t

        # 1. the prepare, while the run reads behind its frontier
        watch.wait(after(sched["prepare_kill"], 0), [driver], what="prepare_kill step")
        st = committed() or {}
        t_last = fault("prepare_kill", sched["prepare_kill"], time.time(), store_complete=any(
            os.path.exists(os.path.join(progress, d, "index.json")) for d in os.listdir(progress)),
            frontier_tokens=st.get("streams", {}).get("train", {}).get("tokens"))
        prep.send_signal(signal.SIGKILL)
        prep.wait()
        # 2. the tracking server, killed and restarted on the same port 3 steps later
        k = sched["mlflow_restart"]
        watch.wait(after(k, t_last), [driver], what="mlflow_restart step")
        mlflow.kill()
        t_last = fault("mlflow_restart", k, time.time())
        watch.wait(after(k + 3, t_last), [driver], what="mlflow restart")
        mlflow = _mlflow(out, port=mlflow.port, wait=False)  # up in the background (a minute under load)
        res["faults"][-1]["restarted_after_s"] = round(time.time() - t_last, 1)
        # 3, 4. the worker faults fire inside the workers; their markers are written just before the signal
        for kind in ("worker_kill", "worker_stop"):
            _wait_file(lambda: os.path.exists(markers[kind]), [driver], what=kind)
            t_last = fault(kind, sched[kind], os.path.getmtime(markers[kind]))
        # 5. SIGTERM of the driver: a checkpoint, exit 0, then --resume
        mlflow.wait()  # a resumed driver checks the tracking server first
        k = sched["driver_term"]
        watch.wait(after(k, t_last), [driver], what="driver_term step")
        driver.send_signal(signal.SIGTERM)
        t_last = fault("driver_term", k, time.time())
        res["faults"][-1]["exit_code"] = driver.wait(timeout=300)
        res["driver_start"].append(time.time())
        driver = _tst(["train", "--resume", run_dir], env, logs)
        # 6. SIGKILL of the driver a few ms into the checkpoint write of step c
        c = sched["driver_kill"]
        staging = os.path.join(tmp, "tst-staging")
        _wait_file(lambda: os.path.isdir(staging) and any(n.startswith(f"step{c:08d}-") for n in os.listdir(staging)),
                   [driver], what=f"the step-{c} checkpoint write")
        time.sleep(sched["driver_kill_delay_s"])
        driver.send_signal(signal.SIGKILL)
        t_last = fault("driver_kill", c, time.time(), delay_s=sched["driver_kill_delay_s"])
        driver.wait()
        res["driver_start"].append(time.time())
        driver = _tst(["train", "--resume", run_dir], env, logs)
        # 7. a train node removed (3 -> 2), then added back (2 -> 3); steps paced until the group is 3 again
        k = sched["node_remove"]
        watch.wait(lambda r: r["step"] >= k and r["logged_at"] > t_last and r["world_size"] == WORKERS, [driver],
                   what="node_remove step")
        cluster.remove_node(nodes.pop())
        t_last = fault("node_remove", k, time.time())
        _set_pace(pace, PACE_S)
        watch.wait(lambda r: r["world_size"] == WORKERS - 1 and r["logged_at"] > t_last and sum(
            x["world_size"] == WORKERS - 1 and x["logged_at"] > t_last for x in watch.records) >= 2, [driver],
                   what="2 steps at world size 2")
        nodes.append(cluster.add_node(**node_args))
        t_last = fault("node_add", max(r["step"] for r in watch.records if r["logged_at"] > t_last), time.time())
        watch.wait(lambda r: r["world_size"] == WORKERS and r["logged_at"] > t_last, [driver], what="world size 3")
        _set_pace(pace, 0)
        res["driver_exit"] = driver.wait(timeout=900)
        watch.poll()
        res["records"] = watch.records
        res["mlflow"] = _mlflow_state(mlflow.url)
        res["staging_left"] = sorted(os.listdir(staging)) if os.path.isdir(staging) else []
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        res["error"] = f"{type(e).__name__}: {e}"
        for p in (driver, prep):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    finally:
        res["t_end"] = time.time()
        with open(result_path, "w") as f:
            json.dump(res, f)
        logs.close()
        if mlflow is not None:
            mlflow.stop()
        if cluster is not None:
            cluster.shutdown()


def _mlflow(out: str, port: Optional[int] = None, wait: bool = True):
    """The tracking server, in a session of its own; its id goes to <out>/sessions so that the parent finds
    anything left of it even if this process dies."""
    from pipeline.local_cluster import MlflowServer

    server = MlflowServer(os.path.join(out, "mlflow.db"), os.path.join(out, "mlartifacts"), port=port)
    with open(os.path.join(out, "sessions"), "a") as f:
        f.write(f"{server.proc.pid}\n")
    return server.wait() if wait else server


def _node_local_store_refusal(address: str, out: str) -> str:
    """A node-local token store on this 3-node cluster is refused in one line (the run itself declares the disk
    shared)."""
    from types import SimpleNamespace

    import ray

    from pipeline import runner
    from pipeline.config import Config, apply_overrides

    ray.init(address=address, log_to_driver=False)
    try:
        cfg = apply_overrides(Config(), overrides(out, None, os.path.join(out, "stores-chaos")) +
                              ["data.store_shared=false"])
        runner.check_store_reachable(cfg, SimpleNamespace(uri=os.path.join(out, "stores", "any")))
        return "accepted"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    finally:
        ray.shutdown()


def _mlflow_state(uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("tst")
    runs = c.search_runs([exp.experiment_id]) if exp else []
    mine = [r for r in runs if r.data.tags.get("tst.run_name") == "chaos"]
    steps = sorted({m.step for m in c.get_metric_history(mine[0].info.run_id, "train_loss")}) if mine else []
    return {"runs": len(runs), "running_left": sum(r.info.status == "RUNNING" for r in runs),
            "status": mine[0].info.status if mine else None, "train_loss_steps": len(steps)}


# ---------------------------------------------------------------------------------------------------------------
# The parent: run the child, clean up after it, compare with the reference
# ---------------------------------------------------------------------------------------------------------------
def run_combined(seed: int, out: str, reference: str = "cluster", timeout_s: float = 1500,
                 check_node_local_store: bool = False, prepare_throttle_s: float = 4.0,
                 started: Optional[list] = None) -> dict:
    """One combined run (seed -> schedule) in `out`; returns the child's record plus the leftovers it found.
    `started` (a list) gets the child's Popen, for a caller that may have to kill its session."""
    from pipeline.local_cluster import session_pids

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ray_tmp = tempfile.mkdtemp(prefix="tstc", dir="/tmp")  # short: Unix socket paths live under it
    plan = {"out": out, "schedule": schedule(seed), "reference": reference, "ray_temp_dir": ray_tmp,
            "check_node_local_store": check_node_local_store, "prepare_throttle_s": prepare_throttle_s}
    result_path = os.path.join(out, "result.json")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(os.path.join(out, "child.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.study.chaos", json.dumps(plan), result_path],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if started is not None:
            started.append(proc)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    time.sleep(1.0)  # the cluster's processes exit after its shutdown
    sessions = [proc.pid]
    if os.path.exists(os.path.join(out, "sessions")):
        sessions += [int(x) for x in open(os.path.join(out, "sessions")).read().split()]
    left, zombies, cmdlines = [], 0, []
    for pid in (p for sid in sessions for p in session_pids(sid)):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # dead, only not reaped (no init reaps here)
                    zombies += 1
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdlines.append(f.read().replace(b"\0", b" ").decode(errors="replace")[:120])
            left.append(pid)
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError, IndexError):
            pass
    _keep_controller_logs(ray_tmp, os.path.join(out, "ray-train-logs"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if not os.path.exists(result_path):
        return {"seed": seed, "error": "the run wrote no result; see " + os.path.join(out, "child.log")}
    with open(result_path) as f:
        res = json.load(f)
    tmp = os.path.join(out, "tmp")  # the run's TMPDIR; Ray's own ray/ray_current_cluster aside
    tmp_left = [os.path.relpath(os.path.join(d, n), tmp) for d, _, files in os.walk(tmp) for n in files]
    res.update(seed=seed, out=out, processes_left=len(left), processes_left_cmd=cmdlines, zombies=zombies,
               tmp_left=[n for n in tmp_left if n != os.path.join("ray", "ray_current_cluster")])
    return res


def _keep_controller_logs(ray_tmp: str, dst: str) -> None:
    """Ray Train's controller logs (one per driver: each worker-group start with its phase timings, each failure
    and the policy's decision) out of the cluster's temp dir, which is removed: where a recovery's seconds went."""
    import glob

    for f in glob.glob(os.path.join(ray_tmp, "session_*", "logs", "train", "ray-train-sys-controller-*.log")):
        os.makedirs(dst, exist_ok=True)
        shutil.copy(f, dst)


def _digest_reads(folder: str) -> list[tuple[int, int, float, dict]]:
    """(pid, step, t, rows) of every window read, from the digest files (step: the metrics step, 1-based)."""
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        pid = int(name.split("-")[1].split(".")[0])
        with open(os.path.join(folder, name)) as f:
            for line in f:
                r = json.loads(line)
                out.append((pid, r["step"] + 1, r.get("t", 0.0), {int(k): v for k, v in r["rows"].items()}))
    return out


def analyse(res: dict, ref_losses: dict, ref_windows: dict, ref_weights: Optional[dict],
            bitwise: bool) -> dict:
    """Per fault and over the run, against the reference: `ref_losses` {step: train_loss}, `ref_windows`
    {(step, row): digest} (metrics steps), `ref_weights` (state dict) or None; `bitwise`: the reference ran at the
    run's world size (so losses before the first resize must be equal bit for bit)."""
    from pipeline.train.loop import read_digests

    out = res["out"]
    reads = _digest_reads(os.path.join(out, "digests"))
    first_seen: dict[int, float] = {}
    for pid, _, t, _ in reads:
        first_seen[pid] = min(first_seen.get(pid, t), t)
    dg = os.path.join(out, "digests")
    trail = {(s + 1, row): d for s, rows in read_digests(dg).items() for row, d in rows.items()} \
        if os.path.isdir(dg) else {}
    ref_count: dict[str, int] = {}
    for d in ref_windows.values():
        ref_count[d] = ref_count.get(d, 0) + 1
    run_count: dict[str, int] = {}
    for d in trail.values():
        run_count[d] = run_count.get(d, 0) + 1
    lost_at = sorted(k for k, d in ref_windows.items() if trail.get(k) != d)
    extra = {d for d, n in run_count.items() if n > ref_count.get(d, 0)}
    repeated_at = sorted(k for k, d in trail.items() if d in extra)
    faults = res["faults"]
    rows = []
    for i, f in enumerate(faults):
        t_f = f["t"]
        t_next_fault = faults[i + 1]["t"] if i + 1 < len(faults) else float("inf")
        if f["kind"] in RESTARTS:
            new = [(t, s) for pid, s, t, _ in reads if first_seen[pid] > t_f and t > t_f and t < t_next_fault]
        else:
            new = [(t, s) for _, s, t, _ in reads if t_f < t < t_next_fault]
        first_t, first_step = min(new) if new else (None, None)
        redone = 0
        if f["kind"] in RESTARTS and first_t is not None:
            old_steps = {s for pid, s, t, _ in reads if first_seen[pid] < t_f}
            new_steps = {s for pid, s, t, _ in reads if first_seen[pid] > t_f and t < t_next_fault}
            redone = len(old_steps & new_steps)
        hi = faults[i + 1]["step"] if i + 1 < len(faults) else T + 1
        lo = first_step if first_step is not None else f["step"]
        rows.append({**{k: v for k, v in f.items() if k != "t"}, "to_next_step_s": round(first_t - t_f, 1)
                     if first_t else None, "first_step_after": first_step, "steps_redone": redone,
                     "windows_lost": sum(lo <= s < hi for s, _ in lost_at),
                     "windows_repeated": sum(lo <= s < hi for s, _ in repeated_at)})
    recs = res.get("records", [])
    t_resize = next((f["t"] for f in faults if f["kind"] == "node_remove"), float("inf"))
    before = [r for r in recs if r["logged_at"] < t_resize and r["world_size"] == WORKERS]
    after = [r for r in recs if r not in before]
    rel = _rel_diffs(after, ref_losses)
    summary = {
        "finished": res.get("driver_exit") == 0 and "error" not in res,
        "steps_logged": len({r["step"] for r in recs}),
        "windows_lost": len(lost_at), "windows_repeated": len(repeated_at),
        "losses_checked_bitwise": len(before) if bitwise else 0,
        "losses_bit_identical": all(r["train_loss"] == ref_losses.get(r["step"]) for r in before) if bitwise else None,
        "max_rel_loss_diff_before_resize": max(_rel_diffs(before, ref_losses), default=None),
        "max_rel_loss_diff_after_resize": max(rel, default=None),
        "world_sizes": sorted({r["world_size"] for r in recs}),
    }
    final = os.path.join(out, "runs", "chaos", f"step_{T:08d}")
    if ref_weights is not None and os.path.isdir(final):
        from pipeline.train.checkpoint import load_model_state

        sd, _ = load_model_state(final)
        summary["weights_max_abs_diff"] = max(float((sd[n].float() - ref_weights[n].float()).abs().max()) for n in sd)
        summary["weights_identical"] = all(bool((sd[n] == ref_weights[n]).all()) for n in sd)
    return {"faults": rows, "summary": summary}


def _rel_diffs(records: list[dict], ref_losses: dict) -> list[float]:
    return [abs(r["train_loss"] - ref_losses[r["step"]]) / abs(ref_losses[r["step"]]) for r in records
            if r["step"] in ref_losses]


def cluster_reference(out: str) -> tuple[dict, dict, dict]:
    """The uninterrupted 3-worker run the child trained first: (losses, windows, final weights)."""
    from pipeline.train.checkpoint import load_model_state
    from pipeline.train.loop import read_digests
    from pipeline.train.metrics import JsonlWriter

    run = os.path.join(out, "runs", "reference")
    losses = {r["step"]: r["train_loss"] for r in JsonlWriter(os.path.join(run, "metrics.jsonl")).read()
              if "train_loss" in r}
    windows = {(s + 1, row): d for s, rows in read_digests(os.path.join(out, "digests-reference")).items()
               for row, d in rows.items()}
    sd, _ = load_model_state(os.path.join(run, f"step_{T:08d}"))
    return losses, windows, sd


COLUMNS = ("kind", "step", "to_next_step_s", "steps_redone", "windows_lost", "windows_repeated")


def table(rows: list[dict]) -> str:
    head = "| seed | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in ("seed",) + COLUMNS) + " |\n" for r in rows)


if __name__ == "__main__":
    child(json.loads(sys.argv[1]), sys.argv[2])
