"""The token store: prepare -> store -> reader, byte-identical prepares, resume of a killed prepare, checksums,
changed sources, concurrent prepares, streaming behind the writer, and a dead writer."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.config import Config, apply_overrides
from pipeline.data import build_source, ensure_store, iter_documents, plan_store
from pipeline.data.reader import TokenStore
from pipeline.errors import DataError
from pipeline.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(folder, n_files=3, docs=60, seed=0):
    """A few JSONL files of varied documents (and one empty record per file, skipped and counted)."""
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    os.makedirs(folder, exist_ok=True)
    for f in range(n_files):
        with open(os.path.join(folder, f"part-{f}.jsonl"), "w") as fh:
            for i in range(docs):
                fh.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(3, 60)))) + f" f{f}d{i}."}) + "\n")
            fh.write(json.dumps({"text": ""}) + "\n")
    return str(folder)


def make_cfg(source, out, **kv):
    base = {"data.source": source, "data.tokenizer": "bpe:400", "data.seq_len": 8, "data.bag_size": 3,
            "data.val_fraction": 0.1, "data.val_windows": 4, "train.steps": 12, "train.switch_fraction": 0.5,
            "train.global_batch_size": 4, "data.shard_tokens": 700, "run.output_dir": str(out)}
    base.update(kv)
    return apply_overrides(Config(), base)


def store_files(uri):
    return {f: open(os.path.join(uri, f), "rb").read() for f in sorted(os.listdir(uri))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c")


@pytest.mark.parametrize("boundary", ["cross", "mask"])
def test_store_reads_back_the_direct_tokenization(corpus, tmp_path, boundary):
    """Every token and document boundary of both streams, across many shards, equals a direct tokenization."""
    cfg = make_cfg(corpus, tmp_path, **{"data.doc_boundary": boundary})
    tok = load_tokenizer(cfg.data, str(tmp_path))
    src = build_source(cfg, str(tmp_path), "local", tokenizer=tok)
    store = src.store
    assert len(store.index["streams"]["train"]["shards"]) >= 5  # the test crosses shard boundaries
    for split in ("train", "val"):
        texts = [t for _, t in iter_documents(cfg.data, split)]
        flat, lengths = tok.encode_documents(texts)
        n = store.tokens(split)
        assert n == len(flat) and store.documents(split) == len(texts)
        assert np.array_equal(store.read(split, 0, n).numpy(), flat)
        expect_docs = np.repeat(np.arange(len(lengths)), lengths)
        assert np.array_equal(store.read_doc_ids(split, 0, n).numpy(), expect_docs)
        # an arbitrary range across shards and (for train) across the epoch boundary
        a, b = n - 37, n + 55
        idx = np.arange(a, b)
        assert np.array_equal(store.read(split, a, b).numpy(), flat[idx % n])
        assert np.array_equal(store.read_doc_ids(split, a, b).numpy(),
                              expect_docs[idx % n] + (idx // n) * len(texts))
    assert store.index["dtype"] == "uint16" and store.stats["skipped"]["empty"] == 3
    w = src.step_windows(0, 0, 1)
    if boundary == "mask":
        w, d = w
        assert d.shape == w.shape
    assert w.shape == (4, 3 * 8 + 3)


def test_ray_and_in_process_prepares_are_byte_identical(corpus, tmp_path, ray_session):
    cfg = make_cfg(corpus, tmp_path)
    tok = load_tokenizer(cfg.data, str(tmp_path))
    a = ensure_store(cfg.data, tok, str(tmp_path / "local"), "local")
    b = ensure_store(cfg.data, tok, str(tmp_path / "ray"), "ray")
    assert a.id == b.id and a.prepared_here and b.prepared_here
    fa, fb = store_files(a.uri), store_files(b.uri)
    assert list(fa) == list(fb) and len(fa) > 10
    assert all(fa[k] == fb[k] for k in fa)  # index.json included


PREPARE_SCRIPT = textwrap.dedent("""
    import sys, json
    from pipeline.config import Config, apply_overrides
    from pipeline.data import ensure_store
    from pipeline.data.tokenizer import load_tokenizer
    cfg = apply_overrides(Config(), json.loads(sys.argv[1]))
    tok = load_tokenizer(cfg.data, cfg.run.output_dir)
    p = ensure_store(cfg.data, tok, cfg.run.output_dir, "local")
    print(json.dumps({"uri": p.uri, "here": p.prepared_here}))
""")


def _prepare_proc(cfg_overrides, env_extra=None):
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", PREPARE_SCRIPT, json.dumps(cfg_overrides)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _overrides(corpus, out):
    return {"data.source": corpus, "data.tokenizer": "bpe:400", "data.val_fraction": 0.1, "data.shard_tokens": 700,
            "run.output_dir": str(out)}


def test_killed_prepare_resumes_to_identical_bytes(corpus, tmp_path):
    ov = _overrides(corpus, tmp_path)
    cfg = apply_overrides(Config(), ov)
    tok = load_tokenizer(cfg.data, str(tmp_path))  # the tokenizer first, so the subprocess only prepares
    storage, _, _ = plan_store(cfg.data, tok, str(tmp_path))
    p = _prepare_proc(ov, {"TST_PREPARE_THROTTLE_S": "0.3"})
    deadline = time.time() + 60
    while time.time() < deadline:  # kill it once a few shards are committed
        prog = storage.read_json("progress.json")
        if prog and len(prog["streams"]["train"]["shards"]) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert storage.read_json("index.json") is None and storage.read_json("lock.json") is not None
    partial = len(storage.read_json("progress.json")["streams"]["train"]["shards"])
    # the dead preparer's lease goes stale; a new prepare takes it over and resumes after the committed shards
    cfg.data.writer_timeout_s = 1.0
    time.sleep(1.2)
    resumed = ensure_store(cfg.data, tok, str(tmp_path), "local")
    assert resumed.prepared_here
    fresh = ensure_store(cfg.data, tok, str(tmp_path / "fresh"), "local")
    fr, fa = store_files(fresh.uri), store_files(resumed.uri)
    assert 3 <= partial < len(json.loads(fr["index.json"])["streams"]["train"]["shards"])
    assert list(fr) == list(fa) and all(fr[k] == fa[k] for k in fr)


def test_a_run_reading_behind_a_killed_writer_takes_its_prepare_over(corpus, tmp_path):
    """A run trains behind a `tst data prepare` of another process (stream layout), and that process is SIGKILLed:
    the run's driver takes the stale lease over and finishes the prepare, so reads past the frontier wait instead
    of failing, and the windows and the store's bytes are those of an undisturbed prepare (issue 15)."""
    ov = _overrides(corpus, tmp_path)
    kv = {**ov, "data.seq_len": 8, "data.bag_size": 3, "train.steps": 60, "train.switch_fraction": 0.5,
          "train.global_batch_size": 4, "data.batch_layout": "stream", "data.shuffle": False,
          "data.writer_timeout_s": 1.0}
    cfg = apply_overrides(Config(), kv)
    tok = load_tokenizer(cfg.data, str(tmp_path))
    storage, _, _ = plan_store(cfg.data, tok, str(tmp_path))
    p = _prepare_proc(ov, {"TST_PREPARE_THROTTLE_S": "0.5"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            prog = storage.read_json("progress.json")
            if prog and len(prog["streams"]["train"]["shards"]) >= 2:
                break
            time.sleep(0.05)
        src = build_source(cfg, str(tmp_path), "local", tokenizer=tok, wait="first")
        assert not src.store.complete and not src._prepare[0].prepared_here  # reading behind the other writer
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    frontier = src.store.tokens("train")
    windows = [src.step_windows(t) for t in range(cfg.train.steps)]  # reads past the frontier: waits, then goes on
    assert src.plan.tokens_needed() > frontier
    src._prepare[0].thread.join(60)  # the prepare taken over goes on to the end
    assert src._prepare[0].prepared_here and src._prepare[0].error is None
    assert storage.read_json("index.json") is not None
    src.close()
    fresh_cfg = apply_overrides(Config(), {**kv, "run.output_dir": str(tmp_path / "fresh")})
    fresh = build_source(fresh_cfg, str(tmp_path / "fresh"), "local", tokenizer=tok)
    fr, fa = store_files(fresh.uri), store_files(src.uri)
    assert list(fr) == list(fa) and all(fr[k] == fa[k] for k in fr)
    assert all(torch.equal(a, fresh.step_windows(t)) for t, a in enumerate(windows))


def test_truncated_or_corrupted_shard_is_a_one_line_error(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    src = build_source(cfg, str(tmp_path), "local")
    shard = os.path.join(src.uri, "train-00001.tok")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:  # flip one byte: same size, wrong sha256
        f.write(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])
    n = TokenStore(src.uri).tokens("train")
    with pytest.raises(DataError, match=r"train-00001\.tok fails its sha256 check.*prepare it again") as e:
        TokenStore(src.uri).read("train", 0, n)
    assert "\n" not in str(e.value)
    with open(shard, "wb") as f:
        f.write(data[:-6])
    with pytest.raises(DataError, match=r"train-00001\.tok is \d+ bytes, the index says \d+") as e:
        TokenStore(src.uri).read("train", 0, n)
    assert "\n" not in str(e.value)


def test_modified_source_gets_a_new_store_and_a_resume_refuses_it(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.runner import run_training

    corpus = write_corpus(tmp_path / "c", n_files=2, docs=40)
    over = {"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3, "train.log_every": 3,
            "run.tracking": False, "model.preset": "tiny", "model.hidden_size": 32, "model.num_layers": 1,
            "model.num_heads": 2, "model.num_kv_heads": 2, "model.intermediate_size": 64}
    cfg = make_cfg(corpus, tmp_path / "out", **over)
    first = run_training(cfg, use_ray=False, name="r", console=False)
    old_id = os.path.basename(first["data"]["store"])
    os.remove(os.path.join(first["run_dir"], "summary.json"))  # as if killed after its last checkpoint
    with open(os.path.join(corpus, "part-1.jsonl"), "a") as f:  # the corpus changes after the run
        f.write(json.dumps({"text": "a late addition to the corpus"}) + "\n")
    tok = load_tokenizer(cfg.data, str(tmp_path / "out"))
    storage, _, _ = plan_store(cfg.data, tok, str(tmp_path / "out"))
    assert os.path.basename(storage.root) != old_id  # never silently mixed into the old store
    cfg2 = make_cfg(corpus, tmp_path / "out", **over)  # the same run, resumed
    cfg2.run.allow_resume_changes = False
    with pytest.raises(ConfigError, match=r"cannot resume: the data stream differs.*stores: saved \[\['main', '" + old_id):
        run_training(cfg2, use_ray=False, name="r", console=False)


def test_two_concurrent_prepares_end_with_one_good_store(corpus, tmp_path):
    ov = _overrides(corpus, tmp_path)
    cfg = apply_overrides(Config(), ov)
    tok = load_tokenizer(cfg.data, str(tmp_path))
    procs = [_prepare_proc(ov, {"TST_PREPARE_THROTTLE_S": "0.05"}) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0]["uri"] == outs[1]["uri"] and sorted(o["here"] for o in outs) == [False, True]
    fresh = ensure_store(cfg.data, tok, str(tmp_path / "fresh"), "local")
    fr, got = store_files(fresh.uri), store_files(outs[0]["uri"])
    assert list(fr) == list(got) and all(fr[k] == got[k] for k in fr)


@pytest.mark.parametrize("layout", ["stream", "lanes"])
def test_training_starts_before_the_index_is_committed(corpus, tmp_path, monkeypatch, layout):
    """With the writer throttled, a stream-order run trains its first step on committed shards while the prepare
    goes on; lanes (and shuffling) need the epoch's size, so that run starts once the index is committed."""
    from pipeline.runner import run_training

    monkeypatch.setenv("TST_PREPARE_THROTTLE_S", "0.25")
    over = {"train.steps": 4, "train.checkpoint_every": 100, "train.eval_every": 100, "train.log_every": 1,
            "run.tracking": False, "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
            "model.num_kv_heads": 2, "model.intermediate_size": 64, "train.switch_fraction": 0.0,
            "data.bag_size": 1, "data.val_windows": 1, "data.batch_layout": layout, "data.shuffle": layout == "lanes"}
    cfg = make_cfg(corpus, tmp_path, **over)
    tok = load_tokenizer(cfg.data, str(tmp_path))
    storage, _, _ = plan_store(cfg.data, tok, str(tmp_path))
    first_step = {}

    def watch(rec):
        if rec.get("step") == 1 and "train_loss" in rec:
            first_step["index_existed"] = storage.exists("index.json")
            first_step["committed"] = len((storage.read_json("progress.json") or {"streams": {"train": {"shards": []}}})
                                          ["streams"]["train"]["shards"])

    summary = run_training(cfg, use_ray=False, name=layout, console=False, on_metrics=watch)
    assert summary["status"] == "finished"
    if layout == "stream":
        assert first_step["index_existed"] is False and first_step["committed"] >= 1
    else:
        assert first_step["index_existed"] is True


def _store_with_a_dead_writer(corpus, out):
    """A store whose throttled prepare was SIGKILLed right after its first commit: incomplete, nobody writing."""
    ov = _overrides(corpus, out)
    cfg = apply_overrides(Config(), ov)
    tok = load_tokenizer(cfg.data, str(out))
    storage, _, _ = plan_store(cfg.data, tok, str(out))
    p = _prepare_proc(ov, {"TST_PREPARE_THROTTLE_S": "0.5"})
    while not storage.read_json("progress.json"):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return storage


def test_behind_the_writer_every_rank_waits_for_its_whole_step(corpus, tmp_path):
    """Stream order behind a writer: rank 0 of 2 whose own rows are committed still waits for the rest of the step
    (so no rank enters the step's collectives while another waits for data, and times out there). With the writer
    dead, that wait ends in the dead-writer error instead of returning rank 0's rows."""
    from pipeline.data.batch import StoreSource
    from pipeline.data.plan import StreamPlan

    storage = _store_with_a_dead_writer(corpus, tmp_path)
    n = TokenStore(storage.root).tokens("train")
    L = 16
    B = n // L + 1  # one step of B rows: rank 0's half is committed, the step's end is not
    plan = StreamPlan(total_steps=2, switch_fraction=0.0, bag_size=1, seq_len=L, global_batch_size=B, val_windows=1)
    assert plan.rank_span(0, 0, 2)[0] + plan.rank_span(0, 0, 2)[1] * L + 1 <= n < plan.step_span(0)[1]
    src = StoreSource(storage.root, plan, layout="stream", shuffle=False, writer_timeout_s=1.0)
    t0 = time.time()
    with pytest.raises(DataError, match="stopped: no heartbeat"):
        src.step_windows(0, 0, 2)
    assert time.time() - t0 < 10


def test_a_dead_writer_is_an_error_not_an_endless_wait(corpus, tmp_path):
    storage = _store_with_a_dead_writer(corpus, tmp_path)
    store = TokenStore(storage.root, writer_timeout_s=2.0)
    n = store.tokens("train")
    t0 = time.time()
    with pytest.raises(DataError, match="stopped: no heartbeat"):
        store.read("train", 0, n + 10_000)  # past the frontier: waits for a writer that never comes
    assert time.time() - t0 < 10
