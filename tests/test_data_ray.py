"""The Ray Data path on the session's local Ray: ordered stream, both phases, epochs, exact resume with the same
and a different worker count, mask mode, bad input, and errors before any worker starts."""

import json
import os

import numpy as np
import pytest
import torch

from pipeline.config import Config, apply_overrides
from pipeline.corpus import builtin_documents
from pipeline.data import build_source
from pipeline.errors import DataError
from pipeline.tokenizer import load_tokenizer


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


def _check_equal(src, mem, steps, rank, world):
    for t, w in steps:
        m = mem.step_windows(t, rank, world)
        if isinstance(w, tuple):
            assert all(torch.equal(a, b) for a, b in zip(w, m)), f"step {t} rank {rank}/{world} differs"
        else:
            assert torch.equal(w, m), f"step {t} rank {rank}/{world} differs"


def test_ray_stream_is_ordered_exact_and_resumes_with_any_world_size(ray_session, tmp_path):
    cfg = _cfg(_corpus(tmp_path))
    out = str(tmp_path / "out")
    mem = build_source(cfg, out, "memory")
    plan = mem.plan
    assert plan.tokens_needed() > 1.5 * mem.corpus_tokens  # the run crosses epochs
    src = build_source(cfg, out, "ray")
    try:
        # two ranks consume their shares interleaved, as two workers would
        its = [src.iter_steps(0, r, 2) for r in range(2)]
        got = {0: [], 1: []}
        for _ in range(plan.total_steps):
            for r in range(2):
                t, w = next(its[r])
                s = plan.bag_size_at(t)
                assert w.shape == (3, s * 16 + s) and w.dtype == torch.int64
                got[r].append((t, w))
        for r in range(2):
            _check_equal(src, mem, got[r], r, 2)
        # the concatenation of every window (tails dropped) across workers is the tokenized corpus, in order
        body = [torch.cat([got[0][t][1], got[1][t][1]])[:, : -plan.bag_size_at(t)].reshape(-1) for t in range(plan.total_steps)]
        stream = torch.cat(body).numpy()
        n = mem.corpus_tokens
        assert np.array_equal(stream, mem.tokens[np.arange(plan.offset(plan.total_steps)) % n])
        info = src.info()
        assert info["corpus_tokens"] == n and info["epoch"] >= 1  # epochs counted by the dealer
        assert src.epoch_at(plan.total_steps - 1) > 1
        assert torch.equal(src.val_windows(), mem.val_windows())
    finally:
        src.close()
    # resume in a fresh pipeline (a new dealer replays and skips) at an arbitrary step, other worker counts
    for start, world in ((7, 3), (17, 1)):
        res = build_source(cfg, out, "ray")
        try:
            for r in range(world):
                _check_equal(res, mem, list(res.iter_steps(start, r, world)), r, world)
        finally:
            res.close()


def test_ray_mask_mode_and_bad_records_match_memory(ray_session, tmp_path):
    cfg = _cfg(_corpus(tmp_path, n_files=2, docs_per_file=10, bad=True),
               **{"data.doc_boundary": "mask", "train.steps": 10, "data.val_fraction": 0.0,
                  "data.dealer_cache_mb": 0})  # no dealer copy: epoch 2 re-executes the Ray Data pipeline
    out = str(tmp_path / "out")
    mem = build_source(cfg, out, "memory")
    assert mem.stats["skipped"]["malformed_json"] == 1 and mem.stats["skipped"]["empty"] == 1
    assert mem.stats["invalid_utf8"] == 1
    assert mem.epoch_at(cfg.train.steps - 1) > 1  # the run crosses into a second pass
    src = build_source(cfg, out, "ray")
    try:
        steps = list(src.iter_steps(0, 0, 1))
        _check_equal(src, mem, steps, 0, 1)
        w, d = steps[-1][1]
        assert w.shape == d.shape
        st = src.info()["stats"]  # the dealer's counts of its first full pass equal the in-process reader's
        assert st is not None and st["skipped"] == mem.stats["skipped"] and st["invalid_utf8"] == 1
        assert st["documents"] == mem.stats["documents"]
        assert src.info()["epoch"] >= 1 and src.info()["corpus_tokens"] == mem.corpus_tokens
    finally:
        src.close()


def test_ray_errors_come_before_any_worker(ray_session, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_source(_cfg(str(tmp_path / "missing")), str(tmp_path / "out"), "ray")
    (tmp_path / "tiny.jsonl").write_text('{"text": "a few words only"}\n')
    with pytest.raises(DataError, match="fewer than one window"):
        build_source(_cfg(str(tmp_path / "tiny.jsonl"), **{"data.tokenizer": "gpt2", "data.val_fraction": 0.0}),
                     str(tmp_path / "out"), "ray")


def test_sources_ride_to_ray_train_workers_in_train_loop_config(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def _train_loop(config):  # a closure: pickled by value for the workers
        """A Ray Train worker: reads its share of every step from the pickled source and saves it."""
        import numpy as np
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        src = config["source"]
        got = [w.numpy() for _, w in src.iter_steps(config["start"], rank, world)]
        np.save(os.path.join(config["out"], f"rank{rank}.npy"), np.stack(got))
        ray.train.report({"steps": len(got)})

    cfg = _cfg(_corpus(tmp_path, n_files=2, docs_per_file=10), **{"train.steps": 8, "train.switch_fraction": 0.0})
    out = str(tmp_path / "out")
    mem = build_source(cfg, out, "memory")
    src = build_source(cfg, out, "ray")
    try:
        trainer = TorchTrainer(
            _train_loop, train_loop_config={"source": src, "start": 3, "out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="data-shards", storage_path=str(tmp_path / "ray")),
        )
        trainer.fit()
    finally:
        src.close()
    for r in range(2):  # each worker got its own disjoint half of every step, in order, from step 3 on
        got = np.load(tmp_path / f"rank{r}.npy")
        want = np.stack([mem.step_windows(t, r, 2).numpy() for t in range(3, 8)])
        assert np.array_equal(got, want)
