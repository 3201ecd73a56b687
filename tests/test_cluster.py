"""cluster.yaml and Ray Jobs: the launcher config validated offline, node types vs the resources the code asks for,
and a real `ray start --head` (token auth on, loopback only) that runs `ray job submit -- tst train ...`.

This module never touches the session's shared Ray (`ray_session`): the head is a separate `ray start --head
--block` process with its own temp dir and ports, the job driver is a process that Ray's job server starts, and
the test process only talks HTTP to it through the `ray job submit` CLI. Every process is cleaned up by PID.
"""

import copy
import functools
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml
from netutil import free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")

TINY = [
    "model.preset=tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "data.source=builtin:wiki", "data.max_documents=300", "data.tokenizer=bpe:512", "data.seq_len=32",
    "data.val_windows=8",
    "train.steps=4", "train.global_batch_size=4", "train.warmup_steps=1", "train.log_every=1",
    "train.eval_every=2", "train.checkpoint_every=2",
    "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
]


# ---------------------------------------------------------------------------------------------------------------
# cluster.yaml, offline
# ---------------------------------------------------------------------------------------------------------------


def _prepared_cluster_config(path="cluster.yaml") -> dict:
    # Private module of ray, pinned to 2.60.0 in pyproject: prepare_config fills the AWS defaults, validate_config
    # checks the result against ray/autoscaler/ray-schema.json. Both offline, no cloud credentials.
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(REPO, path)) as f:
        raw = yaml.safe_load(f)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", ["cluster.yaml", "cluster-gcp.yaml"])
def test_cluster_yaml_validates_against_rays_schema(path):
    import ray

    assert ray.__version__ == "2.60.0"  # the private validator is pinned with ray
    cfg = _prepared_cluster_config(path)
    types = cfg["available_node_types"]
    assert set(types) == {cfg["head_node_type"], "cpu_data", "gpu_train"}
    for name in ("cpu_data", "gpu_train"):  # autoscaling worker types
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 2
    assert types["gpu_train"]["resources"]["GPU"] == 8
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0  # nothing scheduled on the head
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    # setup installs this project (with a CUDA torch) on every node; no credentials anywhere in the file
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e ~/tst" in setup and "torch" in setup
    text = open(os.path.join(REPO, path)).read()
    for secret in ("aws_secret_access_key", "AKIA", "BEGIN RSA", "RAY_AUTH_TOKEN=", "private_key"):
        assert secret.lower() not in text.lower(), secret
    # token auth on every node; dashboard/job server on loopback of the head only
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in starts
    # shared storage for checkpoints and MLflow artifacts is named in the config
    assert "--artifacts-destination" in " ".join(cfg["head_setup_commands"])
    assert ("s3://" if path == "cluster.yaml" else "gs://") in text


def _requested_resources(cfg) -> dict[str, list[dict]]:
    """What the code asks Ray for under `cfg`: the train worker bundle straight from `build_trainer`'s
    ScalingConfig, and the Ray Data read task / tokenizer actor options of the prepare (pipeline/data/prepare.py)."""
    from pipeline.train.ray_train import build_trainer

    trainer = build_trainer(cfg, source=None, vocab_size=128256, tokenizer_json=None, run_name="x", run_dir="/tmp/x",
                            storage_path="/tmp/x", tracking_uri=None, mlflow_run_id=None, console=False)
    sc = trainer.scaling_config
    worker = dict(sc._resources_per_worker_not_none)
    d = cfg.data
    extra = dict(d.actor_resources)
    data = [{"CPU": d.read_cpus, **extra}, {"CPU": d.tokenize_actor_cpus, **extra}]
    return {"train": [worker] * sc.max_workers, "train_min": [worker] * sc.min_workers,
            "data": data * d.num_tokenize_actors}


def test_node_types_carry_what_the_code_requests():
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    from pipeline.config import load_config

    cluster = _prepared_cluster_config()
    types = cluster["available_node_types"]
    cfg = load_config(os.path.join(REPO, "recipes", "cluster_gpu.yaml"))
    assert cfg.scaling.use_gpu and cfg.scaling.min_workers < cfg.scaling.num_workers  # elastic
    req = _requested_resources(cfg)
    worker = req["train"][0]
    assert worker == {"CPU": 8, "GPU": 1, "train_node": 1}

    def fits(bundle, node):
        return all(node.get(k, 0) >= v for k, v in bundle.items())

    # every resource a train worker asks for exists on gpu_train and on no other type; data work the other way
    assert [n for n, t in types.items() if fits(worker, t["resources"])] == ["gpu_train"]
    for b in req["data"][:3]:
        assert [n for n, t in types.items() if fits(b, t["resources"])] == ["cpu_data"], b
    # the autoscaler's own bin-packing grows the right node type for each kind of pending work
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    head = cluster["head_node_type"]

    def grow(demands):
        add, left = get_nodes_for(types, {head: 1}, head, cluster["max_workers"], demands, scorer)
        assert left == [], left
        return dict(add)

    assert grow(req["train"]) == {"gpu_train": 1}  # 8 workers x 1 GPU = one 8-GPU node
    assert grow(req["train"] * 2) == {"gpu_train": 2}
    assert set(grow(req["data"])) == {"cpu_data"}
    # the elastic minimum fits on what one node gives
    assert grow(req["train_min"]) == {"gpu_train": 1}


# ---------------------------------------------------------------------------------------------------------------
# A real head node: `ray start --head` + `ray job submit`
# ---------------------------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """PIDs below `pid` (from /proc), children first found breadth-first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop a `ray start --block` head that this test started: SIGTERM, a short grace, then SIGKILL for it, its
    process group (its own session) and every descendant that left the group (job drivers, workers)."""
    pids = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    pids += _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in set(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with its own temp dir, ports and auth token; stopped by PID afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="tsth", dir="/tmp")  # short: Unix socket paths live under it
    gcs, dash, client, agent = free_ports(4)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # loopback IP
               TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0", PATH=BIN + os.pathsep + env.get("PATH", ""))
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--disable-usage-stats", "--port", str(gcs), "--num-cpus", "4",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--temp-dir", temp_dir],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                req = urllib.request.Request(url + "/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray start --head failed:\n" + open(log.name).read()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "env": env, "token": token, "temp_dir": temp_dir}
    finally:
        _kill_tree(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head, working_dir, entrypoint, runtime_env=None, timeout=300):
    cmd = [RAY, "job", "submit", "--address", head["url"], "--working-dir", working_dir]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    return subprocess.run(cmd + ["--"] + entrypoint, env=head["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=working_dir)


def _repo_copy(dst: str) -> str:
    """The repo as a user has it: every tracked or unignored file, plus outputs and data that must NOT upload."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))
    for rel, size in JUNK.items():
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        with open(os.path.join(dst, rel), "wb") as f:
            f.write(os.urandom(size))
    return dst


# Outputs, stores, corpora and environments a user's repo folder may hold; none may reach the cluster.
JUNK = {"outputs/runs/old/checkpoints/step_00000100/model.bin": 3 << 20, "outputs/mlflow.db": 1 << 16,
        "mlruns/0/meta.yaml": 100, "data/corpus.jsonl": 2 << 20, "mlflow.db": 1 << 16,
        "checkpoints/step_1/shard.pt": 1 << 20, "shards/part-0.parquet": 1 << 20, ".venv/lib/x.py": 100}


def test_ray_job_submit_trains_and_logs_to_mlflow(ray_head, tmp_path):
    """`RAY_AUTH_MODE=token ray job submit --working-dir . -- tst train ...` against a real head: the job succeeds,
    its logs stream back, its run is in MLflow, and outputs/data/stores were not uploaded."""
    import mlflow

    from pipeline.cli.job import runtime_env

    work = _repo_copy(str(tmp_path / "repo"))
    out = str(tmp_path / "outputs")
    db = str(tmp_path / "mlflow.db")
    uri = f"sqlite:///{db}"
    renv = runtime_env(tracking_uri=uri)  # the MLflow location reaches the job driver through the runtime env

    # without the token the job server refuses the client
    no_token = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN",)}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    r = subprocess.run([RAY, "job", "list", "--address", ray_head["url"]], env=no_token, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "auth" in (r.stdout + r.stderr).lower()

    t0 = time.time()
    r = _submit(ray_head, work, ["tst", "train", "--config", "recipes/tiny.yaml", "--name", "job-run",
                                 f"run.output_dir={out}", *TINY], runtime_env=renv)
    wall = time.time() - t0
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower()
    assert "[tst] done: job-run | steps 4" in logs  # the driver's output streamed back through the job server
    print(f"\njob submit -> succeeded in {wall:.1f}s")

    # the run is in MLflow with its metric history and world size
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tst")
    runs = client.search_runs([exp.experiment_id], "tags.`tst.run_name` = 'job-run'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    hist = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in hist) == list(range(1, 5))
    assert client.get_metric_history(runs[0].info.run_id, "world_size")[-1].value == 2
    assert os.path.exists(os.path.join(out, "runs", "job-run", "step_00000004"))  # Ray Train storage

    # what was uploaded: the package Ray unpacked for the job on the node
    pkgs = [p for p in glob.glob(os.path.join(ray_head["temp_dir"], "session_2*", "runtime_resources",
                                              "working_dir_files", "*")) if os.path.isdir(p)]
    assert len(pkgs) == 1, pkgs
    pkg = pkgs[0]
    uploaded = {os.path.relpath(os.path.join(d, f), pkg) for d, _, fs in os.walk(pkg) for f in fs}
    assert "pipeline/cli/job.py" in uploaded and "recipes/tiny.yaml" in uploaded and "cluster.yaml" in uploaded
    # (the job itself may write into its working dir, e.g. MLflow's default ./mlruns artifact root with a SQLite
    # store, so look for the exact files that were planted before the upload)
    assert not set(JUNK) & uploaded, sorted(set(JUNK) & uploaded)
    assert not any(u.startswith(("outputs/", "data/", ".venv/", ".git/")) for u in uploaded)
    size = sum(os.path.getsize(os.path.join(pkg, u)) for u in uploaded)
    assert size < 3 << 20, size  # the 8 MB of planted outputs and data stayed behind

    # the code that ran is the uploaded copy (first on PYTHONPATH), not the installed package
    r = _submit(ray_head, work, [sys.executable, "-c",
                                 "import os, pipeline; print('PIPELINE_AT', os.path.dirname(pipeline.__file__))"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    at = [line.split("PIPELINE_AT ", 1)[1].strip() for line in r.stdout.splitlines() if "PIPELINE_AT " in line]
    assert at and os.path.realpath(at[0]).startswith(os.path.realpath(pkg)), (at, pkg)


def test_upload_excludes_are_rays_own_matching():
    """.rayignore and `pipeline.cli.job.UPLOAD_EXCLUDES` hold the same patterns, and Ray's own matcher (the one its
    working_dir packaging uses) drops outputs, stores, corpora and environments but keeps every tracked file."""
    from ray._private.thirdparty.pathspec import PathSpec

    from pipeline.cli.job import UPLOAD_EXCLUDES, runtime_env

    with open(os.path.join(REPO, ".rayignore")) as f:
        patterns = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert patterns == UPLOAD_EXCLUDES
    spec = PathSpec.from_lines("gitwildmatch", patterns)
    for rel in JUNK:
        assert spec.match_file(rel), rel
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert tracked and not [t for t in tracked if spec.match_file(t)]
    env = runtime_env(tracking_uri="http://127.0.0.1:5000", env={"TST_X": 1})
    assert env["excludes"] == UPLOAD_EXCLUDES
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000" and env["env_vars"]["TST_X"] == "1"
    out = subprocess.run([sys.executable, "-m", "pipeline.cli.job", "--tracking-uri", "sqlite:////tmp/m.db"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["env_vars"]["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/m.db"


def test_no_node_is_open_to_the_internet():
    """AWS: every node type names its security group, so Ray's bootstrap never creates its default one (whose SSH
    rule is 0.0.0.0/0), and only the head is in a public subnet. GCP: only the head has an external IP."""
    import copy

    import yaml
    from ray.autoscaler._private.aws.config import _configure_security_group

    aws = yaml.safe_load(open(os.path.join(REPO, "cluster.yaml")))
    types = aws["available_node_types"]
    assert all(t["node_config"].get("SecurityGroupIds") for t in types.values())
    before = copy.deepcopy(aws)
    assert _configure_security_group(aws) == before  # returns early: nothing to create, no AWS call
    public = [n for n, t in types.items() if any("PUBLIC" in x for x in t["node_config"].get("SubnetIds", []))]
    assert public == [aws["head_node_type"]]
    gcp = yaml.safe_load(open(os.path.join(REPO, "cluster-gcp.yaml")))
    for name, t in gcp["available_node_types"].items():
        nics = t["node_config"].get("networkInterfaces")
        if name == gcp["head_node_type"]:
            assert "tst-head" in t["node_config"]["tags"]["items"]
        else:
            assert nics and all("accessConfigs" not in nic for nic in nics), name
