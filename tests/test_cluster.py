"""cluster.yaml and Ray Jobs, offline: the launcher configs validated against Ray's schema, the exact versions the
nodes install, node types vs the resources the code asks for (the autoscaler's own bin-packing), the upload
excludes, and no node open to the internet.

The live side (a real head with token auth and `ray job submit -- tst train ...`, MLflow, the upload, the code on
PYTHONPATH, autoscaling) is tests/test_autoscale.py, which also uses `_repo_copy` and `JUNK` from here.
"""

import copy
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    # setup installs exact versions (requirements-cluster.txt, a CUDA torch among them), then this project without
    # resolving anything, on every node; every node boots one pinned image, not "latest" or an image family: a node
    # launched later runs the same software
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -q -r ~/tst/requirements-cluster.txt" in setup and "--no-deps -e ~/tst" in setup
    assert not any(c in setup for c in (">=", "~=", "--upgrade")), setup
    for name, t in cfg["available_node_types"].items():
        image = t["node_config"].get("ImageId") or t["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        assert "latest" not in image and "/family/" not in image and "resolve:ssm" not in image, (name, image)
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


def test_cluster_lock_is_exact_and_matches_the_project():
    """requirements-cluster.txt (what the nodes install): name==version only, one line per package, the ray and
    mlflow pyproject pins, and every runtime dependency of the project covered."""
    import re
    import tomllib

    lines = [ln.strip() for ln in open(os.path.join(REPO, "requirements-cluster.txt")) if ln.strip() and
             not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.+]*", ln) for ln in lines), \
        [ln for ln in lines if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.+]*", ln)]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    pins = {norm(ln.split("==")[0]): ln.split("==")[1] for ln in lines}
    assert len(pins) == len(lines)  # no package twice
    deps = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["dependencies"]
    for d in deps:
        name = norm(re.split(r"[\[<>=~! ;]", d, maxsplit=1)[0])
        assert name in pins, f"{name} (pyproject) is not pinned in requirements-cluster.txt"
        if "==" in d:
            assert pins[name] == d.split("==")[1].split(";")[0].strip(), (name, pins[name], d)
    assert pins["ray"] == "2.60.0" and pins["mlflow"] == "3.17.2" and "boto3" in pins  # the head's S3 artifacts


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
# What `ray job submit --working-dir .` uploads
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# ports for the servers a local Ray starts
# ---------------------------------------------------------------------------------------------------------------


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range(monkeypatch):
    """A port handed out by a port-0 bind can be reused by one of Ray's own port-0 binds before the dashboard
    takes it (CI, 2026-12-03: "Failed to find a valid port for dashboard"), so we pick below the kernel's range;
    a port someone already holds is skipped."""
    import socket

    from pipeline import ray_env

    low = ray_env._ephemeral_low()
    ports = ray_env.free_ports(6)
    assert len(set(ports)) == 6 and all(1024 <= p < low for p in ports), (ports, low)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))

    held = socket.socket()
    held.bind(("127.0.0.1", ports[0]))
    held.listen()
    try:
        picks = iter([ports[0], ports[0], ports[1]])

        class Scripted:
            def randrange(self, lo, hi):
                return next(picks)

        monkeypatch.setattr(ray_env.random, "SystemRandom", Scripted)
        assert ray_env.free_ports(1) == [ports[1]]
    finally:
        held.close()
