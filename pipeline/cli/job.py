"""Ray Jobs: the runtime environment for `ray job submit --working-dir . -- tst train ...`.

The job entry point is the ordinary CLI: `tst train` in the job driver finds the cluster through $RAY_ADDRESS
(set by the job supervisor), so the same command runs on a laptop and on any cluster. What this module adds:

- `UPLOAD_EXCLUDES`: what must never be uploaded with the working directory (outputs, checkpoints, MLflow stores,
  corpora, environments). The repo's `.rayignore` holds the same patterns, and Ray 2.60 also honours `.gitignore`,
  so `--working-dir .` from the repo root excludes them with no flags; `runtime_env()` repeats them as the
  runtime env's `excludes` for submissions that do not start from the repo root (the Python SDK, other folders).
- `runtime_env(...)`: a runtime env dict (JSON for `--runtime-env-json`) with those excludes and the env vars a
  run needs on a cluster: `MLFLOW_TRACKING_URI` (the MLflow location, e.g. the head's tracking server) and
  `TST_*` settings (forwarded by the driver to every train worker).

The uploaded working directory is put first on PYTHONPATH of the job driver and of every worker, so the code
that runs is the code you submitted; the project installed on the nodes (cluster.yaml's setup commands) supplies
the `tst` entry point and the dependencies.

    python -m pipeline.cli.job --tracking-uri http://127.0.0.1:5000     # prints the JSON
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from pipeline.ray_env import PROCESS_GROUP_SHUTDOWN_TIMEOUT_S

UPLOAD_EXCLUDES = [
    # outputs: checkpoints, metrics, local MLflow stores, tokenizer/token caches, packed corpora
    "outputs/", "mlruns/", "mlartifacts/", "*.db", "checkpoints/", "ray_results/",
    # data: corpora and shards live in object storage or on NFS
    "/data/", "*.parquet", "*.arrow", "*.safetensors", "*.pt", "*.bin",
    # environments and build debris
    ".venv/", "venv/", ".git/", "__pycache__/", "*.egg-info/", ".pytest_cache/", "build/", "dist/", ".whl/",
]

# Quiet, deterministic defaults for job drivers and workers (tokenizers' fork warning; Ray Train V2).
# TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S is read by the Ray Train controller, which a job's driver does not start
# with its own environment (Ray Train propagates only its v2 variables): the job's runtime env carries it
# (pipeline/ray_env.py says why 5 s).
DEFAULT_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1",
               "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": PROCESS_GROUP_SHUTDOWN_TIMEOUT_S}


def runtime_env(tracking_uri: Optional[str] = None, env: Optional[dict] = None,
                working_dir: Optional[str] = None) -> dict:
    """A Ray runtime env for a `tst train` job: upload excludes, env vars, optionally the working dir."""
    env_vars = dict(DEFAULT_ENV)
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    env_vars.update({k: str(v) for k, v in (env or {}).items()})
    out: dict = {"excludes": list(UPLOAD_EXCLUDES), "env_vars": env_vars}
    if working_dir:
        out["working_dir"] = working_dir
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.cli.job",
        description="Print the runtime env JSON for `ray job submit --runtime-env-json ... -- tst train ...`")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for the job (MLFLOW_TRACKING_URI)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env var (repeatable)")
    args = p.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.env)
    print(json.dumps(runtime_env(args.tracking_uri, env)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
