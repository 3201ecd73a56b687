"""The Ray Data prepare on the session's local Ray: bad input counted like in-process, errors before any worker
starts, and a store source riding to Ray Train workers, each reading its own windows (no actor in the path)."""

import json
import os

import pytest
import torch

from pipeline.config import Config, apply_overrides
from pipeline.data.corpus import builtin_documents
from pipeline.data import build_source
from pipeline.errors import DataError
from pipeline.data.tokenizer import load_tokenizer


def _corpus(tmp_path, n_files=3, docs_per_file=12, bad=False):
    """A few JSONL shards of real Wikipedia text (a small slice of builtin:wiki)."""
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    wiki = builtin_documents("wiki")
    k = 0
    for f in range(n_files):
        with open(d / f"part-{f}.jsonl", "wb") as fh:
            for i in range(docs_per_file):
                fh.write(json.dumps({"text": wiki[100 + k][:250]}).encode() + b"\n")
                k += 1
                if bad and f == 1 and i == 2:
                    fh.write(b'{"text": "broken json\n')
                    fh.write(b'{"text": ""}\n')
                    fh.write(b'{"text": "caf\xe9 au lait, latin-1 bytes in a UTF-8 file"}\n')
    return str(d)


def _cfg(source, **kv):
    base = {"data.source": source, "data.tokenizer": "bpe:500", "data.seq_len": 16, "data.bag_size": 4,
            "data.val_fraction": 0.1, "data.val_windows": 3, "train.steps": 24, "train.switch_fraction": 0.5,
            "train.global_batch_size": 6, "data.tokenize_batch_size": 8, "data.prefetch_steps": 2}
    base.update(kv)
    return apply_overrides(Config(), base)


def test_ray_prepare_counts_bad_records_and_writes_the_in_process_bytes(ray_session, tmp_path):
    """Malformed JSON, an empty record and invalid UTF-8 in the middle of a file: Ray Data's read tasks and the
    in-process prepare count them identically and write byte-identical stores (index included)."""
    cfg = _cfg(_corpus(tmp_path, n_files=2, docs_per_file=10, bad=True),
               **{"data.doc_boundary": "mask", "train.steps": 10, "data.val_fraction": 0.0, "data.shard_tokens": 300})
    local = build_source(cfg, str(tmp_path / "local"), "local")
    st = local.stats
    assert st["skipped"]["malformed_json"] == 1 and st["skipped"]["empty"] == 1 and st["invalid_utf8"] == 1
    assert st["documents"] == 21 and st["records"] == 23
    assert local.epoch_at(cfg.train.steps - 1) > 1  # the run crosses into a second pass
    ray_src = build_source(cfg, str(tmp_path / "ray"), "ray")
    names = sorted(os.listdir(local.uri))
    assert names == sorted(os.listdir(ray_src.uri)) and len(names) > 4
    for n in names:
        assert open(os.path.join(local.uri, n), "rb").read() == open(os.path.join(ray_src.uri, n), "rb").read(), n
    for t in range(cfg.train.steps):
        w, d = ray_src.step_windows(t, 0, 1)
        assert w.shape == d.shape


def test_ray_errors_come_before_any_worker(ray_session, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_source(_cfg(str(tmp_path / "missing")), str(tmp_path / "out"), "ray")
    (tmp_path / "tiny.jsonl").write_text('{"text": "a few words only"}\n')
    with pytest.raises(DataError, match="fewer than one window"):
        build_source(_cfg(str(tmp_path / "tiny.jsonl"), **{"data.tokenizer": "gpt2", "data.val_fraction": 0.0}),
                     str(tmp_path / "out"), "ray")


# Sources riding to Ray Train workers in train_loop_config, each rank reading its own rows from any start step:
# tests/test_trainer.py::test_ray_runs_read_the_plain_loops_windows_and_match_it_across_a_failure_and_a_resize
# (window digests of 2- and 3-worker runs, resumed at step 4, equal the plain loop's).
