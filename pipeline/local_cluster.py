"""cluster.yaml's node types on this machine: Ray's real autoscaler (v2, what `ray up` runs) over its fake
multi-node provider, and a moto S3 server standing in for the bucket. Used by bench/autoscale.py (the full
exercise) and tests/test_autoscale.py.

The node types come from cluster.yaml itself (`local_node_types`): same names, same custom resources and labels,
sizes scaled by the one rule in `SCALE_RULE`. Every fake node is a raylet on 127.0.0.1 that the autoscaler starts
and stops; they all share this machine's disk, which is why the token store goes to S3 (moto): a local store
would pass here and fail on a real cluster.

One more thing the shared disk changes: every fake node unpacks a job's working_dir into the same session folder,
and Ray 2.60's working_dir plugin replaces the folder when a node sets it up for the first time
(`download_and_unpack_package(..., overwrite=True)`), so a process whose current directory is that folder (the job
driver, the Ray Train controller) loses it when a new node starts the job's workers. Nothing in `tst` reads its
current directory after start-up except an MLflow `sqlite:///` store (it resolves its artifact root against it):
use a tracking server, as cluster.yaml does.

Everything runs in one process session that `LocalAutoscalingCluster.stop()` kills; other Ray instances on the
machine are never touched (Ray's own `AutoscalingCluster` runs `ray stop --force`, see pipeline/ray_internals.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional

import yaml

from pipeline.config import ConfigError
from pipeline.ray_env import free_ports

BIN = os.path.dirname(sys.executable)

SCALE_RULE = ("each worker node type of cluster.yaml keeps its name, custom resources and labels, and becomes one "
              "unit of itself: its resources divided by its GPU count (CPU count if it has no GPU), so 8-GPU "
              "gpu_train -> GPU 1, train_node 1 and 32-CPU cpu_data -> data_node 1; CPU is then set to {cpus} "
              "(this machine has 2 cores); {max_nodes} nodes at most per type (min as in the file); the head keeps "
              "its resources (CPU: 0) under the fake provider's head type name")


def local_node_types(cluster_yaml: str, max_nodes: int = 2, cpus: float = 1.0,
                     object_store_mb: int = 100) -> tuple[dict, dict]:
    """(head resources, worker node types for the autoscaler config) from `cluster_yaml`, by `SCALE_RULE`."""
    with open(cluster_yaml) as f:
        cfg = yaml.safe_load(f)
    types = cfg.get("available_node_types") or {}
    head_name = cfg.get("head_node_type")
    if head_name not in types:
        raise ConfigError(f"{cluster_yaml}: head_node_type {head_name!r} is not in available_node_types; name one "
                          f"of {sorted(types)}")
    head = dict(types[head_name].get("resources") or {})
    workers = {}
    for name, t in types.items():
        if name == head_name:
            continue
        res = dict(t.get("resources") or {})
        unit = res.get("GPU") or res.get("CPU")
        if not unit:
            raise ConfigError(f"{cluster_yaml}: node type {name!r} declares neither GPU nor CPU in its resources; "
                              f"give it resources: {{CPU: n}}")
        scaled = {k: v / unit for k, v in res.items() if k not in ("CPU", "memory", "object_store_memory")}
        scaled["CPU"] = cpus
        scaled["object_store_memory"] = object_store_mb << 20
        workers[name] = {"resources": scaled, "node_config": {}, "min_workers": int(t.get("min_workers", 0)),
                         "max_workers": min(int(t.get("max_workers", max_nodes)), max_nodes)}
        if t.get("labels"):
            workers[name]["labels"] = dict(t["labels"])
    return head, workers


def session_pids(sid: int) -> list[int]:
    """Every process in session `sid` (field 6 of /proc/PID/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class LocalAutoscalingCluster:
    """A head (`ray start --head --block`, token auth, loopback, own ports and temp dir) whose autoscaler launches
    and terminates the worker node types of `local_node_types` as raylets on this machine."""

    def __init__(self, head_resources: dict, worker_types: dict, idle_timeout_minutes: float = 0.25,
                 env: Optional[dict] = None, upscaling_speed: float = 1.0, boot_s: float = 0.0):
        self.head_resources = dict(head_resources)
        self.worker_types = worker_types
        self.idle_timeout_minutes = idle_timeout_minutes
        self.extra_env = dict(env or {})
        self.upscaling_speed = upscaling_speed
        self.boot_s = boot_s  # seconds a launched node takes to appear (a cloud VM's boot); 0: at once
        self.proc: Optional[subprocess.Popen] = None
        self.temp_dir = tempfile.mkdtemp(prefix="tsta", dir="/tmp")  # short: Unix socket paths live under it
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dash_port, self.client_port, self.agent_port = free_ports(4)
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dash_port}"

    def config(self) -> dict:
        from pipeline.ray_internals import FAKE_HEAD_NODE_TYPE, fake_multinode_provider

        provider, _ = fake_multinode_provider(self.gcs_address, self.boot_s)
        types = {FAKE_HEAD_NODE_TYPE: {"resources": {k: v for k, v in self.head_resources.items()
                                                       if k != "object_store_memory"},
                                       "node_config": {}, "max_workers": 0}}
        types.update(self.worker_types)
        return {"cluster_name": "tst-local", "max_workers": sum(t["max_workers"] for t in self.worker_types.values()),
                "upscaling_speed": self.upscaling_speed, "idle_timeout_minutes": self.idle_timeout_minutes,
                "provider": provider, "available_node_types": types, "head_node_type": FAKE_HEAD_NODE_TYPE,
                "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
                "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
                "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
                "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}

    @property
    def client_env(self) -> dict:
        """Environment for clients of this cluster (`ray job submit`, the state API, this module's status())."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   PATH=BIN + os.pathsep + env.get("PATH", ""))
        return env

    def start(self, timeout_s: float = 120) -> "LocalAutoscalingCluster":
        from pipeline.ray_internals import fake_multinode_provider

        cfg_path = os.path.join(self.temp_dir, "autoscaler.json")
        with open(cfg_path, "w") as f:
            json.dump(self.config(), f)
        _, fake_env = fake_multinode_provider(self.gcs_address)
        env = self.client_env
        env.update(fake_env)
        # RAY_API_SERVER_ADDRESS: Ray Train's placement-group cleaner finds the state API by address; with
        # several Ray instances on one machine (never on a real cluster node) it would refuse to pick one
        env.update(TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0", RAY_API_SERVER_ADDRESS=self.dashboard_url,
                   **self.extra_env)
        head = dict(self.head_resources)
        cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", "--disable-usage-stats",
               f"--autoscaling-config={cfg_path}", "--port", str(self.gcs_port),
               "--num-cpus", str(int(head.pop("CPU", 0))), "--num-gpus", str(int(head.pop("GPU", 0))),
               "--object-store-memory", str(int(head.pop("object_store_memory", 100 << 20))),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash_port),
               "--ray-client-server-port", str(self.client_port), "--dashboard-agent-listen-port",
               str(self.agent_port), "--temp-dir", self.temp_dir]
        if head:
            cmd += ["--resources", json.dumps(head)]
        self.log_path = os.path.join(self.temp_dir, "head.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while True:
            try:
                req = urllib.request.Request(self.dashboard_url + "/api/version",
                                             headers={"Authorization": f"Bearer {self.token}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.time() > deadline:
                    tail = open(self.log_path).read()[-3000:]
                    self.stop()
                    raise RuntimeError(f"the local autoscaling head did not start:\n{tail}")
                time.sleep(0.5)
        return self

    def status(self):
        """The autoscaler's ClusterStatus (pipeline.ray_internals.autoscaler_status); needs RAY_AUTH_* of
        `client_env` in this process's environment before Ray is imported."""
        from pipeline.ray_internals import autoscaler_status

        return autoscaler_status(self.gcs_address)

    def node_processes(self, node_id: str) -> list[int]:
        """PIDs of one fake node: its raylet (started with RAY_OVERRIDE_NODE_ID_FOR_TESTING=node_id) and every
        process below it (agents, workers)."""
        pids = [p for p in session_pids(self.proc.pid)
                if _environ(p).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id]
        children: dict[int, list[int]] = {}
        for p in session_pids(self.proc.pid):
            try:
                with open(f"/proc/{p}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(p)
            except (OSError, ValueError, IndexError):
                continue
        out, todo = set(pids), list(pids)
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in out:
                    out.add(c)
                    todo.append(c)
        return sorted(out)

    def preempt(self, node_id: str) -> int:
        """What a spot preemption does to a node: every process of it SIGKILLed at once, no drain, no notice.
        Returns how many processes died."""
        pids = self.node_processes(node_id)
        if not pids:
            raise RuntimeError(f"no process of node {node_id} found")
        _kill(pids)
        return len(pids)

    def stop(self) -> None:
        """SIGTERM the head, then SIGKILL everything left in its session (fake nodes, job drivers, workers)."""
        if self.proc is not None:
            sid = self.proc.pid
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            for _ in range(3):
                left = session_pids(sid)
                if not left:
                    break
                _kill(left)
                time.sleep(0.3)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class MotoS3:
    """moto's S3 server on 127.0.0.1 (this interpreter's moto): the bucket every fake node reads and writes."""

    def __init__(self):
        exe = os.path.join(BIN, "moto_server")
        if not os.path.exists(exe):
            raise ConfigError("moto_server is not installed in this environment; pip install 'moto[server]'")
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)

    @property
    def env(self) -> dict:
        """Credentials and endpoint as every node has them (on AWS: the instance profile; here: the environment)."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.url}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def mlflow_server_env() -> dict:
    """The environment for an `mlflow server` that tst starts: tst logs runs, params, metrics and artifacts only,
    so MLflow 3's job runner (a huey consumer pool: eight more processes, each importing mlflow, about 60
    CPU-seconds per server start on 2 cores; a restart took a minute on 2 loaded cores) stays off. A value the
    user set wins."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a SQLite file, as cluster.yaml runs it on the head (artifacts proxied to a
    local folder here, to S3 there)."""

    def __init__(self, db_path: str, artifacts: str, port: Optional[int] = None):
        """Starts the server (on `port`, e.g. a killed server's, or a free one); `wait()` for it (other things can
        start meanwhile)."""
        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        env = mlflow_server_env()
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db_path}", "--host",
             "127.0.0.1", "--port", str(self.port), "--workers", "1", "--artifacts-destination", artifacts],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def wait(self, timeout_s: float = 120) -> "MlflowServer":
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("mlflow server did not start")
                time.sleep(0.5)
        return self

    def kill(self) -> None:
        """SIGKILL the server and its workers at once (a lost tracking host)."""
        _kill(session_pids(self.proc.pid))
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            _kill(session_pids(self.proc.pid), signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                _kill(session_pids(self.proc.pid))
                self.proc.wait(10)
