"""s3:// sources against a local S3-compatible server (moto's server mode on 127.0.0.1), in memory and Ray mode."""

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
from pipeline.corpus import builtin_documents
from pipeline.data import build_source, iter_documents, list_files
from pipeline.errors import DataError
from netutil import free_ports

boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_server():
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
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


def test_s3_in_ray_mode_matches_memory(ray_session, bucket, tmp_path):
    cfg = _cfg("s3://tst-corpus/shards", bucket)
    out = str(tmp_path / "out")
    mem = build_source(cfg, out, "memory")
    src = build_source(cfg, out, "ray")  # the read tasks get the driver's AWS_* variables through the dealer
    try:
        for t, w in src.iter_steps(0, 0, 1):
            assert torch.equal(w, mem.step_windows(t, 0, 1))
    finally:
        src.close()
