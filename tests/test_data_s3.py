"""s3:// sources and an s3:// token store against a local S3-compatible server (moto's server mode on 127.0.0.1)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from pipeline.config import Config, apply_overrides
from pipeline.data.corpus import builtin_documents
from pipeline.data import build_source, iter_documents, list_files
from pipeline.errors import DataError
from pipeline.ray_env import free_ports

boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_server():
    # this interpreter's moto (a moto_server found first on PATH may be another install, e.g. 5.2, whose
    # CompleteMultipartUpload answers break pyarrow's S3 writes)
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    (port,) = free_ports(1)
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def bucket(s3_server, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="tst-corpus")
    wiki = builtin_documents("wiki")
    for f in range(2):
        body = "".join(json.dumps({"text": wiki[200 + f * 15 + i][:300]}) + "\n" for i in range(15))
        s3.put_object(Bucket="tst-corpus", Key=f"shards/part-{f}.jsonl", Body=body.encode())
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [w[:300] for w in wiki[300:310]]}), buf)
    s3.put_object(Bucket="tst-corpus", Key="pq/a.parquet", Body=buf.getvalue())
    return s3_server


def _cfg(source, endpoint, **kv):
    base = {"data.source": source, "data.s3_endpoint": endpoint, "data.tokenizer": "gpt2", "data.seq_len": 16,
            "data.bag_size": 2, "data.val_fraction": 0.0, "train.steps": 6, "train.switch_fraction": 0.5,
            "train.global_batch_size": 2}
    base.update(kv)
    return apply_overrides(Config(), base)


def test_s3_folder_glob_and_parquet_in_memory_mode(bucket, tmp_path):
    cfg = _cfg("s3://tst-corpus/shards", bucket)
    entries = list_files(cfg.data.source, cfg.data)
    assert [e.uri for e in entries] == ["s3://tst-corpus/shards/part-0.jsonl", "s3://tst-corpus/shards/part-1.jsonl"]
    assert len(list_files("s3://tst-corpus/shards/*-1.jsonl", cfg.data)) == 1
    docs = [t for _, t in iter_documents(cfg.data, "train")]
    wiki = builtin_documents("wiki")
    assert docs == [w[:300] for w in wiki[200:230]]
    pq_docs = [t for _, t in iter_documents(_cfg("s3://tst-corpus/pq/a.parquet", bucket).data, "train")]
    assert pq_docs == [w[:300] for w in wiki[300:310]]
    src = build_source(cfg, str(tmp_path / "out"), "memory")
    assert src.step_windows(0, 0, 1).shape == (2, 2 * 16 + 2)
    with pytest.raises(DataError, match="matches no files|does not exist"):
        list_files("s3://tst-corpus/nothing-here/", cfg.data)


def test_store_on_s3_prepared_by_ray_equals_a_local_store(ray_session, bucket, tmp_path):
    """Ray Data reads s3:// inputs and writes the store to s3:// (the index object is the commit); ranks read it
    with ranged GETs, a few block requests per step, and get the windows of a local store of the same data."""
    import boto3

    boto3.client("s3", endpoint_url=bucket, region_name="us-east-1").create_bucket(Bucket="tst-stores")
    cfg = _cfg("s3://tst-corpus/shards", bucket, **{"data.shard_tokens": 1000, "data.read_block_mb": 0.0625})
    out = str(tmp_path / "out")
    local = build_source(cfg, out, "local")
    cfg.data.store = "s3://tst-stores/stores"
    remote = build_source(cfg, out, "ray")  # the read tasks get the driver's AWS_* variables
    assert remote.uri.startswith("s3://tst-stores/stores/") and remote.store_id == local.store_id
    s3 = boto3.client("s3", endpoint_url=bucket, region_name="us-east-1")
    keys = {o["Key"].rsplit("/", 1)[1]: o["Size"] for o in s3.list_objects_v2(Bucket="tst-stores")["Contents"]}
    assert "index.json" in keys and "progress.json" not in keys and "lock.json" not in keys
    for name in os.listdir(local.uri):
        body = s3.get_object(Bucket="tst-stores", Key=f"stores/{remote.store_id}/{name}")["Body"].read()
        assert body == open(os.path.join(local.uri, name), "rb").read(), name
    for t in range(cfg.train.steps):
        assert torch.equal(remote.step_windows(t, 0, 1), local.step_windows(t, 0, 1))
    st = remote.store
    assert 0 < st.requests <= 2 * cfg.train.steps and st.bytes_read > 0
    # the credentials reached the read tasks, but not through their runtime_env (readable by the state API)
    from ray.util.state import list_tasks

    here = ray_session.get_runtime_context().gcs_address  # this session's Ray (others may run on the machine)
    envs = [str(t.runtime_env_info) for t in list_tasks(address=here, detail=True, raise_on_missing_output=False,
                                                        limit=10000)]
    assert any("AWS_ENDPOINT_URL" in e for e in envs)  # the read tasks' plain settings do travel there
    assert not any("AWS_SECRET_ACCESS_KEY" in e or "AWS_ACCESS_KEY_ID" in e for e in envs)
