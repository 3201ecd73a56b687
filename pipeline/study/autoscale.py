"""The autoscaling exercise (issue 21): a `tst train` submitted with `ray job submit` to the local autoscaling
cluster of pipeline/local_cluster.py (cluster.yaml's node types, Ray's autoscaler v2), watched from the
autoscaler's own state.

What it does, in order (`run_exercise`; bench/autoscale.py is its command line, tests/test_autoscale.py runs a
short plan):
1. a moto S3 server with the corpus (a few JSONL shards) and buckets for the token store and the checkpoints;
   every node gets the endpoint and credentials in its environment (what an instance profile gives on AWS);
2. the cluster with no worker node; `ray job submit` of an elastic `tst train` (tiny model, min_workers below
   num_workers, each worker asking {CPU, GPU: 1 (declared), train_node: 1} and training on CPU; the prepare's read
   tasks and tokenizer actors asking {data_node}); the store and the checkpoints on S3;
3. a watcher that polls the autoscaler's ClusterStatus (pending launches, nodes by type and state) and the run's
   metrics.jsonl, and writes a timeline in seconds from the submit;
4. optionally a spot preemption: once the run has trained `preempt_after` steps at full size, every process of
   one train node is SIGKILLed; the run must go on with fewer workers, the autoscaler must replace the node and
   the run must grow back;
5. after the job: worker nodes must be terminated within the idle timeout; where each tokenizer actor, read task
   and train worker ran (Ray's state API) against the node types;
6. optionally an uninterrupted one-process reference of the same config: every logged loss and the windows each
   step trained on (TST_WINDOW_DIGESTS) compared with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = ["model.preset=tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2", "model.intermediate_size=128"]


@dataclass
class Plan:
    out: str  # results, outputs, digests (this machine's disk, which every fake node shares)
    steps: int = 120
    preempt_after: Optional[int] = 30  # None: no preemption
    reference: bool = True
    idle_timeout_minutes: float = 0.25
    boot_s: float = 0.0  # seconds a launched node takes to appear (a cloud VM boots in minutes; the fake one at once)
    resize_interval_s: float = 5.0
    mlflow_db: Optional[str] = None  # an MLflow server over this SQLite file for the run (None: no MLflow)
    working_dir: str = REPO
    name: str = "autoscale"
    max_nodes: int = 2
    min_workers: Optional[int] = 1  # elastic between this and 2 workers; None: exactly 2 (no elastic range)
    job_timeout_s: float = 1200
    extra_overrides: list = field(default_factory=list)
    extra_env: dict = field(default_factory=dict)  # the job's env vars (reach the driver, controller, workers)
    probes: bool = False  # after the job: a client without the token, and a job printing where its code came from


def job_overrides(plan: Plan, tracking_uri: Optional[str] = None) -> list[str]:
    """The `tst train` overrides of the exercise (on top of recipes/tiny.yaml)."""
    return [*MODEL,
            "data.source=s3://tst-corpus/wiki/*.jsonl", "data.tokenizer=bpe:512", "data.seq_len=32",
            "data.val_windows=8", "data.bag_size=4", "data.store=s3://tst-stores/stores",
            "data.num_tokenize_actors=2", "data.read_cpus=0.25", "data.tokenize_actor_cpus=0.25",
            "data.actor_resources={data_node: 0.001}",
            f"train.steps={plan.steps}", "train.switch_fraction=0.3", "train.global_batch_size=4",
            "train.micro_batch_size=1", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1",
            f"train.eval_every={max(5, plan.steps // 4)}", "train.checkpoint_every=5", "train.keep_checkpoints=3",
            "train.threads=1",
            "scaling.num_workers=2", f"scaling.min_workers={plan.min_workers or 'null'}", "scaling.cpus_per_worker=0.5",
            "scaling.worker_resources={train_node: 1, GPU: 1}", "scaling.max_failures=10",
            f"scaling.elastic_resize_interval_s={plan.resize_interval_s}", "scaling.collective_timeout_s=60",
            "run.storage_path=s3://tst-runs/runs", f"run.output_dir={os.path.join(plan.out, 'outputs')}",
            f"run.tracking={'true' if tracking_uri else 'false'}",
            *([f"run.tracking_uri={tracking_uri}"] if tracking_uri else []), *plan.extra_overrides]


def upload_corpus(s3, files: int = 4, docs_per_file: int = 75) -> None:
    """The bundled Wikipedia sample as JSONL shards in s3://tst-corpus/wiki/; buckets for stores and runs."""
    from pipeline.data.corpus import builtin_documents

    client = s3.client()
    for b in ("tst-corpus", "tst-stores", "tst-runs"):
        client.create_bucket(Bucket=b)
    wiki = builtin_documents("wiki")
    for f in range(files):
        body = "".join(json.dumps({"text": wiki[f * docs_per_file + i]}) + "\n" for i in range(docs_per_file))
        client.put_object(Bucket="tst-corpus", Key=f"wiki/part-{f}.jsonl", Body=body.encode())


class Timeline:
    """Events in seconds from the submit, and what the watcher learned about nodes and the run."""

    def __init__(self):
        self.t0 = time.time()
        self.events: list[dict] = []
        self.nodes: dict[str, dict] = {}  # ray node id -> {type, launched, terminated}
        self.requests: set = set()
        self.records: list[dict] = []
        self._seen_lines = 0
        self.world_size = None

    def add(self, what: str, **kw) -> None:
        ev = {"t": round(time.time() - self.t0, 1), "what": what, **kw}
        self.events.append(ev)
        print(f"[autoscale] {ev['t']:7.1f}s  {what}" + "".join(f"  {k}={v}" for k, v in kw.items()), flush=True)

    def poll_cluster(self, cluster) -> None:
        from pipeline.ray_internals import FAKE_HEAD_NODE_TYPE

        try:
            st = cluster.status()
        except Exception as e:  # noqa: BLE001 - the GCS busy for a moment: next poll
            self.add("status unavailable", error=type(e).__name__)
            return
        for lr in st.pending_launches:
            key = (lr.ray_node_type_name, lr.request_ts_s)
            if key not in self.requests:
                self.requests.add(key)
                self.add("requested", type=lr.ray_node_type_name, count=lr.count)
        alive, state = {}, {}
        for n in st.active_nodes + st.idle_nodes:
            if n.node_id and n.ray_node_type_name:
                alive[n.node_id] = n.ray_node_type_name
                state[n.node_id] = (n.node_status, (n.node_activity or [""])[0])
        for nid, typ in alive.items():
            if nid not in self.nodes:
                self.nodes[nid] = {"type": typ, "launched": time.time() - self.t0, "terminated": None, "status": None}
                self.add("launched", type=typ, node=nid[-5:])
            info = self.nodes[nid]
            if state[nid][0] != info["status"] and typ != FAKE_HEAD_NODE_TYPE:
                info["status"] = state[nid][0]
                self.add("node " + str(state[nid][0]).lower(), type=typ, node=nid[-5:],
                         **({"activity": state[nid][1][:100]} if state[nid][1] else {}))
        for nid, info in self.nodes.items():
            if info["terminated"] is None and nid not in alive:
                info["terminated"] = time.time() - self.t0
                self.add("terminated", type=info["type"], node=nid[-5:])

    def poll_run(self, run_dir: str) -> None:
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.read().splitlines()
        for ln in lines[self._seen_lines:]:
            try:
                rec = json.loads(ln)
            except ValueError:
                return  # a line being written
            self._seen_lines += 1
            if "train_loss" not in rec:
                continue
            self.records.append(rec)
            if rec["world_size"] != self.world_size:
                self.world_size = rec["world_size"]
                self.add("workers", n=rec["world_size"], step=rec["step"])
            elif rec["step"] % 10 == 0:
                self.add("step", step=rec["step"], workers=rec["world_size"])

    def alive(self, typ: Optional[str] = None) -> list[str]:
        return [nid for nid, i in self.nodes.items() if i["terminated"] is None and (typ is None or i["type"] == typ)]

    def alive_workers(self) -> list[str]:
        from pipeline.ray_internals import FAKE_HEAD_NODE_TYPE

        return [n for n in self.alive() if self.nodes[n]["type"] != FAKE_HEAD_NODE_TYPE]


def submit(cluster, plan: Plan, runtime_env: dict, log_path: str, tracking_uri: Optional[str]) -> subprocess.Popen:
    """`ray job submit --working-dir ... -- tst train ...` (blocking, its output to log_path)."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", plan.working_dir,
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "tst", "train", "--config", "recipes/tiny.yaml", "--name", plan.name, *job_overrides(plan, tracking_uri)]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=cluster.client_env, stdout=log, stderr=subprocess.STDOUT, cwd=plan.working_dir)


def placement(cluster, node_types: dict[str, str]) -> dict[str, list[str]]:
    """Node types where the tokenizer actors, the read tasks and the train workers ran (Ray's state API)."""
    from ray.util.state import list_actors, list_tasks

    actors = list_actors(address=cluster.dashboard_url, limit=10000, detail=True, raise_on_missing_output=False)
    tasks = list_tasks(address=cluster.dashboard_url, limit=10000, detail=True, raise_on_missing_output=False)
    out: dict[str, list[str]] = {"tokenizer_actors": [], "read_tasks": [], "train_workers": [], "never_placed": []}

    def where(nid):
        return node_types.get(nid, "unknown")

    for a in actors:
        name = f"{a.class_name} {getattr(a, 'repr_name', '') or ''}"
        kind = "tokenizer_actors" if "_TokenizeActor" in name else "train_workers" if "RayTrainWorker" in name else None
        if kind is None:
            continue
        if not a.node_id:
            # Ray Data asked for the actor but the reads finished before a node had room for it: it ran nowhere
            # (seen in CI once: one of the two tokenizer actors, node_id None); listed, not placed
            out["never_placed"].append(f"{kind}:{a.state}")
        else:
            out[kind].append(where(a.node_id))
    for t in tasks:
        if "_read_task" in (t.name or "") and t.node_id:
            out["read_tasks"].append(where(t.node_id))
    return out


def alive_on(cluster, node_types: dict[str, str]) -> dict[str, list[str]]:
    """{node type: classes of the actors alive there} (Ray's state API)."""
    from ray.util.state import list_actors

    out: dict[str, list[str]] = {}
    for a in list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10000, detail=True,
                         raise_on_missing_output=False):
        out.setdefault(node_types.get(a.node_id or "", "unknown"), []).append(a.repr_name or a.class_name)
    return out


def _job_env(plan: Plan, digests: Optional[str]) -> dict:
    # Ray Train collects reports every 2 s by default and a worker's next report waits for it: 0.5 s keeps the
    # tiny steps short (timing only)
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", **plan.extra_env}
    if digests:
        env["TST_WINDOW_DIGESTS"] = digests
    return env


def run_exercise(plan: Plan, cluster_yaml: str = os.path.join(REPO, "cluster.yaml")) -> dict:
    """Run the exercise of this module's docstring; returns the timeline and the findings (also written to
    <out>/result.json)."""
    from pipeline.cli.job import runtime_env
    from pipeline.local_cluster import LocalAutoscalingCluster, MlflowServer, MotoS3, local_node_types

    os.makedirs(plan.out, exist_ok=True)
    digests = os.path.join(plan.out, "digests", plan.name) if plan.reference else None
    result: dict = {"plan": dict(plan.__dict__), "preempted": None}
    s3 = MotoS3()
    cluster = mlflow = None
    done = False
    tl = Timeline()
    try:
        if plan.mlflow_db:  # the head's tracking server of cluster.yaml (a sqlite:/// URI: see local_cluster)
            mlflow = MlflowServer(plan.mlflow_db, os.path.join(plan.out, "mlartifacts"))  # starts meanwhile
        _write_sessions(plan.out, s3, mlflow, None)
        upload_corpus(s3)
        head, workers = local_node_types(cluster_yaml, max_nodes=plan.max_nodes)
        result["node_types"] = {"head": head, **{k: v["resources"] for k, v in workers.items()}}
        cluster = LocalAutoscalingCluster(head, workers, idle_timeout_minutes=plan.idle_timeout_minutes,
                                          env=s3.env, boot_s=plan.boot_s)
        t_up = time.time()
        cluster.start()
        if mlflow is not None:
            mlflow.wait()
        _write_sessions(plan.out, s3, mlflow, cluster)
        result["cluster_up_s"] = round(time.time() - t_up, 1)
        os.environ.update({k: v for k, v in cluster.client_env.items() if k.startswith("RAY_")})
        os.environ.update(s3.env)
        from pipeline.ray_internals import refresh_ray_config

        refresh_ray_config()  # RAY_AUTH_MODE=token for this process's GCS and state API clients
        run_dir = os.path.join(plan.out, "outputs", "runs", plan.name)
        tracking_uri = mlflow.url if mlflow else None
        renv = runtime_env(tracking_uri=tracking_uri, env=_job_env(plan, digests))
        job_log = os.path.join(plan.out, "job.log")
        cluster.status()  # the GCS client and its imports ready before the clock starts
        tl.t0 = time.time()
        tl.add("submit", job=plan.name)
        job = submit(cluster, plan, renv, job_log, tracking_uri)
        while job.poll() is None:
            tl.poll_cluster(cluster)
            tl.poll_run(run_dir)
            for key, at in (("alive_at_first_step", 1), ("alive_mid_run", plan.steps // 2)):
                if tl.records and tl.records[-1]["step"] >= at and key not in result:  # what holds which node
                    result[key] = alive_on(cluster, {n: i["type"] for n, i in tl.nodes.items()})
                    tl.add("actors alive", step=tl.records[-1]["step"], **{k: len(v) for k, v in result[key].items()})
            if (plan.preempt_after is not None and result["preempted"] is None and tl.world_size == 2
                    and tl.records[-1]["step"] >= plan.preempt_after):
                victim = sorted(tl.alive("gpu_train"))[-1]
                n = cluster.preempt(victim)
                result["preempted"] = {"node": victim, "t": round(time.time() - tl.t0, 1),
                                       "after_step": tl.records[-1]["step"]}
                tl.add("preempted", type="gpu_train", node=victim[-5:], processes=n, after_step=tl.records[-1]["step"])
            if time.time() - tl.t0 > plan.job_timeout_s:
                job.kill()
                tl.add("job timed out")
                break
            time.sleep(0.5)
        tl.poll_run(run_dir)
        result["job_rc"] = job.wait()
        with open(job_log) as f:
            result["job_log"] = f.read()
        job_end = time.time() - tl.t0
        tl.add("job ended", rc=result["job_rc"])
        if plan.probes:
            result["probes"] = probes(cluster, plan)
        deadline = time.time() + plan.idle_timeout_minutes * 60 + 60
        while tl.alive_workers() and time.time() < deadline:
            tl.poll_cluster(cluster)
            time.sleep(1)
        from pipeline.ray_internals import FAKE_HEAD_NODE_TYPE

        worker_nodes = {n: i for n, i in tl.nodes.items() if i["type"] != FAKE_HEAD_NODE_TYPE}
        left = tl.alive_workers()
        last_term = max([i["terminated"] for i in worker_nodes.values() if i["terminated"]] or [job_end])
        tl.add("scaled down" if not left else "nodes left", after_job_s=round(last_term - job_end, 1),
               left=len(left))
        result["job_end_s"] = round(job_end, 1)
        result["scale_down_s"] = None if left else round(max(0.0, last_term - job_end), 1)
        result["placement"] = placement(cluster, {n: i["type"] for n, i in tl.nodes.items()})
        result["uploaded"] = _uploaded(cluster.temp_dir)
        result["checkpoints"] = sorted({o["Key"].split("/")[2] for o in s3.client().list_objects_v2(
            Bucket="tst-runs", Prefix=f"runs/{plan.name}/").get("Contents", []) if o["Key"].count("/") > 2})
        done = True
    finally:
        if not done:  # an error on the way: nothing follows, so moto goes too
            s3.stop()
        if cluster is not None:
            _save_head_logs(cluster, plan.out)
            cluster.stop()
        if mlflow is not None:
            mlflow.stop()
        result["events"] = tl.events
        result["nodes"] = tl.nodes
        result["records"] = tl.records
        with open(os.path.join(plan.out, "result.json"), "w") as f:
            json.dump(result, f, default=str)
    try:
        if plan.reference and result.get("job_rc") == 0:
            result["reference"] = compare_with_reference(plan, digests, result["records"])
    finally:
        s3.stop()
    with open(os.path.join(plan.out, "result.json"), "w") as f:
        json.dump(result, f, default=str)
    return result


def _write_sessions(out: str, s3, mlflow, cluster) -> None:
    """The process sessions this exercise started, for a caller that must clean up after killing it."""
    procs = {"moto": s3.proc, "mlflow": getattr(mlflow, "proc", None), "cluster": getattr(cluster, "proc", None)}
    with open(os.path.join(out, "sessions.json"), "w") as f:
        json.dump({k: p.pid for k, p in procs.items() if p is not None}, f)


def probes(cluster, plan: Plan) -> dict:
    """What the job server lets in and what code a job runs: a client without the token is refused; a second job
    prints where `pipeline` is imported from (the uploaded working dir must come first on PYTHONPATH)."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    out = {}
    no_token = {k: v for k, v in cluster.client_env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["HOME"] = plan.out  # no ~/.ray/auth_token either
    r = subprocess.run([ray, "job", "list", "--address", cluster.dashboard_url], env=no_token, capture_output=True,
                       text=True, timeout=120)
    out["no_token_rc"], out["no_token_output"] = r.returncode, (r.stdout + r.stderr)[-2000:]
    r = subprocess.run([ray, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", plan.working_dir,
                        "--", sys.executable, "-c",
                        "import os, pipeline; print('PIPELINE_AT', os.path.dirname(pipeline.__file__))"],
                       env=cluster.client_env, capture_output=True, text=True, timeout=300, cwd=plan.working_dir)
    out["code_rc"] = r.returncode
    at = [ln.split("PIPELINE_AT ", 1)[1].strip() for ln in r.stdout.splitlines() if "PIPELINE_AT " in ln]
    out["pipeline_at"] = at[0] if at else (r.stdout + r.stderr)[-2000:]
    return out


def compare_with_reference(plan: Plan, digests: str, records: list[dict]) -> dict:
    """An uninterrupted one-process run of the same config (same token store on S3): losses per step and the
    windows each step trained on, against the exercise's run."""
    from pipeline.config import apply_overrides, load_config
    from pipeline.runner import run_training
    from pipeline.train.loop import read_digests
    from pipeline.train.metrics import JsonlWriter

    ref_dg = os.path.join(plan.out, "digests", "reference")
    over = [o for o in job_overrides(plan) if not o.startswith(("scaling.", "run.storage_path", "run.tracking"))]
    cfg = apply_overrides(load_config(os.path.join(REPO, "recipes", "tiny.yaml")),
                          over + ["scaling.num_workers=0", "run.tracking=false"])
    os.environ["TST_WINDOW_DIGESTS"] = ref_dg
    try:
        run_training(cfg, use_ray=False, name="reference", console=False)
    finally:
        os.environ.pop("TST_WINDOW_DIGESTS", None)
    ref = {r["step"]: r for r in JsonlWriter(os.path.join(plan.out, "outputs", "runs", "reference",
                                                          "metrics.jsonl")).read() if "train_loss" in r}

    def windows(folder):
        if not os.path.isdir(folder):
            return {}
        return {(st, row): d for st, rows in read_digests(folder).items() for row, d in rows.items()}

    run_w, ref_w = windows(digests), windows(ref_dg)
    # tokens of one window at step k: the step's raw tokens (s*B*L while superposed, B*L after) over its B rows
    per_window = {k: (ref[k]["raw_tokens"] - (ref[k - 1]["raw_tokens"] if k > 1 else 0)) / len(
        [1 for (st, _) in ref_w if st == k] or [1]) for k in ref}
    lost_keys = [k for k, d in ref_w.items() if run_w.get(k) != d]
    ref_count: dict = {}
    run_count: dict = {}
    for d in ref_w.values():
        ref_count[d] = ref_count.get(d, 0) + 1
    for k, d in run_w.items():
        run_count.setdefault(d, []).append(k)
    repeated_keys = [ks[-1] for d, ks in run_count.items() for _ in range(max(0, len(ks) - ref_count.get(d, 0)))]
    worst = max((abs(r["train_loss"] - ref[r["step"]]["train_loss"]) / abs(ref[r["step"]]["train_loss"])
                 for r in records if r["step"] in ref), default=None)
    last = max(ref)
    final = [r for r in records if r["step"] == last]
    drift = [r["step"] for r in records if r["step"] in ref and
             abs(r["train_loss"] - ref[r["step"]]["train_loss"]) > 1e-4 * abs(ref[r["step"]]["train_loss"])]
    return {"first_step_over_1e-4": min(drift) if drift else None, "windows": len(ref_w),
            "windows_lost": len(lost_keys), "windows_repeated": len(repeated_keys),
            "tokens_trained_reference": ref[last]["raw_tokens"],
            "tokens_trained": final[-1]["raw_tokens"] if final else None,
            "tokens_lost": int(sum(per_window.get(k[0], 0) for k in lost_keys)),
            "tokens_repeated": int(sum(per_window.get(k[0], 0) for k in repeated_keys)),
            "steps_compared": sum(1 for r in records if r["step"] in ref), "max_rel_loss_diff": worst,
            "final_step": last, "final_loss": final[-1]["train_loss"] if final else None,
            "final_loss_reference": ref[last]["train_loss"]}


def _uploaded(temp_dir: str) -> dict[str, dict[str, int]]:
    """{package folder: {file: bytes}} of the working dirs Ray unpacked for the jobs."""
    import glob

    out = {}
    for pkg in glob.glob(os.path.join(temp_dir, "session_2*", "runtime_resources", "working_dir_files", "*")):
        if os.path.isdir(pkg):
            out[pkg] = {os.path.relpath(os.path.join(d, f), pkg): os.path.getsize(os.path.join(d, f))
                        for d, _, fs in os.walk(pkg) for f in fs}
    return out


def _save_head_logs(cluster, out: str) -> None:
    import glob
    import shutil

    dst = os.path.join(out, "ray-logs")
    os.makedirs(dst, exist_ok=True)
    for pat in ("monitor.*", "job-driver-*.log", "gcs_server.out"):
        for p in glob.glob(os.path.join(cluster.temp_dir, "session_latest", "logs", pat)):
            shutil.copy(p, dst)
