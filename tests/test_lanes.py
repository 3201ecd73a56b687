"""What a batch is: lanes across the shuffled epoch, and weighted mixtures (pipeline/data/lanes.py, batch.py).

Checked on real stores (prepared in-process from small JSONL corpora with a trained BPE): every window is read from
the ranges `row_pieces` names, and those ranges are a permutation of the epoch within the documented policy
(bodies tile each lane; only the lanes' tails and the remainder are not read); reproducible from the seed,
reshuffled per epoch, the same whatever the world size; mixture proportions within 1/B of the weights. Exact
resume through the trainer (kill at step k, resume with 1 and 3 workers) is tests/test_trainer.py's digest test,
which runs on this default layout.
"""

import json
import os

import numpy as np
import pytest
import torch

from pipeline.config import Config, apply_overrides
from pipeline.data import EpochOrder, assign_rows, build_source
from pipeline.errors import DataError


def write_corpus(path, n_docs, tag, seed=0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"{tag} " + " ".join(rng.choice(words, size=int(rng.integers(5, 50)))) + f" {i}."}) + "\n")
    return str(path)


def make_cfg(tmp_path, source, **kv):
    base = {"data.source": source, "data.tokenizer": "bpe:400", "data.seq_len": 8, "data.bag_size": 3,
            "data.val_fraction": 0.05, "data.val_windows": 4, "train.steps": 60, "train.switch_fraction": 0.5,
            "train.global_batch_size": 6, "data.shuffle_chunk_tokens": 200, "run.output_dir": str(tmp_path / "out")}
    base.update(kv)
    return apply_overrides(Config(), base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lanes") / "c.jsonl", 150, "web")


def bodies_by_epoch(src, steps):
    """{epoch: sorted [(a, b)] stored-stream ranges of every window body (the first s_t*L tokens)} of one store."""
    out = {}
    L = src.plan.seq_len
    for t in steps:
        body = src.plan.bag_size_at(t) * L
        for row in range(src.plan.global_batch_size):
            i, e, pieces = src.row_pieces(t, row)
            rem = body
            for a, b in pieces:
                take = min(rem, b - a)
                if take > 0:
                    out.setdefault(e, []).append((a, a + take))
                rem -= take
    return {e: sorted(v) for e, v in out.items()}


def test_lanes_and_shuffle_are_a_permutation_of_each_epoch(corpus, tmp_path):
    cfg = make_cfg(tmp_path, corpus, **{"train.steps": 400})
    src = build_source(cfg, cfg.run.output_dir, "local")
    st, plan = src.store, src.plan
    n, B, L, s = st.tokens("train"), 6, 8, 3
    lane = n // B
    by_epoch = bodies_by_epoch(src, range(plan.total_steps))
    assert len(by_epoch) >= 3  # the run crosses epochs
    orders = set()
    for e, ranges in list(by_epoch.items())[:-1]:  # complete epochs
        # no stored token is read twice within an epoch
        assert all(x[1] <= y[0] for x, y in zip(ranges, ranges[1:])), f"epoch {e}: a token is read twice"
        read = sum(b - a for a, b in ranges)
        # what is not read: each lane's tail (shorter than one window) and the remainder n - B*lane (< B)
        assert 0 <= n - read < B * (s * L + s) + B, (e, n, read)
        orders.add(tuple(EpochOrder(n, 200, cfg.train.seed, e).order))
    assert len(orders) == len(by_epoch) - 1  # reshuffled every epoch
    # every window is what its ranges hold: compare with the store read directly
    for t in (0, 29, 30, 399):
        w = src.step_windows(t, 0, 1)
        for row in range(B):
            _, _, pieces = src.row_pieces(t, row)
            want = torch.cat([st.read("train", a, b) for a, b in pieces])
            assert torch.equal(w[row], want), (t, row)
    # rows read different regions of the epoch (the first windows of the lanes are a lane apart, unshuffled)
    flat = make_cfg(tmp_path, corpus, **{"data.shuffle": False})
    fsrc = build_source(flat, flat.run.output_dir, "local")
    starts = [fsrc.row_pieces(0, r)[2][0][0] for r in range(B)]
    assert starts == [r * lane for r in range(B)]


def test_reproducible_from_the_seed_and_the_same_for_any_world_size(corpus, tmp_path):
    a = build_source(make_cfg(tmp_path, corpus), str(tmp_path / "out"), "local")
    b = build_source(make_cfg(tmp_path, corpus), str(tmp_path / "out"), "local")
    c = build_source(make_cfg(tmp_path, corpus, **{"train.seed": 1}), str(tmp_path / "out"), "local")
    d = build_source(make_cfg(tmp_path, corpus, **{"train.seed": 1, "data.shuffle_seed": 0}), str(tmp_path / "out"),
                     "local")
    for t in (0, 7, 31, 59):
        full = a.step_windows(t, 0, 1)
        assert torch.equal(full, b.step_windows(t, 0, 1))
        assert torch.equal(full, d.step_windows(t, 0, 1))  # data.shuffle_seed pins the data order
        for world in (2, 3, 6):
            assert torch.equal(torch.cat([a.step_windows(t, r, world) for r in range(world)]), full), (t, world)
    assert not torch.equal(a.step_windows(0, 0, 1), c.step_windows(0, 0, 1))  # another seed, another order
    # a baseline and a TST run with the same seed read the same permuted epoch (lanes start alike)
    base = build_source(make_cfg(tmp_path, corpus, **{"data.bag_size": 1, "train.switch_fraction": 0.0}),
                        str(tmp_path / "out"), "local")
    assert [base.row_pieces(0, r)[2][0][0] for r in range(6)] == [a.row_pieces(0, r)[2][0][0] for r in range(6)]


def test_mixture_rows_match_the_weights_and_resume_exactly(tmp_path):
    web = write_corpus(tmp_path / "web.jsonl", 200, "web", seed=1)
    edu = write_corpus(tmp_path / "edu.jsonl", 60, "edu", seed=2)
    sources = {"web": {"source": web, "weight": 0.7}, "edu": {"source": edu, "weight": 0.3}}
    cfg = make_cfg(tmp_path, web, **{"data.sources": sources, "train.global_batch_size": 10, "train.steps": 200})
    src = build_source(cfg, cfg.run.output_dir, "local")
    assert assign_rows([0.7, 0.3], 10).count(0) == 7
    summary = src.layout_summary()["sources"]
    assert summary["web"]["rows"] == 7 and summary["edu"]["rows"] == 3
    for name, w in (("web", 0.7), ("edu", 0.3)):
        assert abs(summary[name]["rows"] / 10 - w) < 1 / 10
    assert summary["edu"]["epochs_run"] > summary["web"]["epochs_run"]  # the small corpus cycles faster
    # realised proportions of the tokens read over the run: rows/B exactly, and the per-source counters agree
    tok_web = tok_edu = 0
    for t in range(cfg.train.steps):
        w = src.step_windows(t, 0, 1)
        body = src.plan.bag_size_at(t) * 8
        for row in range(10):
            comp = src.row_pieces(t, row)[0]
            if comp == 0:
                tok_web += body
            else:
                tok_edu += body
        if t in (0, 150):  # each row reads its own source's store at the ranges it names
            for row in range(10):
                comp, _, pieces = src.row_pieces(t, row)
                want = torch.cat([src.stores[comp].read("train", a, b) for a, b in pieces])
                assert torch.equal(w[row], want), (t, row)
    m = src.data_metrics(cfg.train.steps)
    assert m == {"data_tokens_web": tok_web, "data_tokens_edu": tok_edu}
    assert tok_web / (tok_web + tok_edu) == pytest.approx(0.7)
    # exact on resume: a fresh source (another process after a restart) reads the same rows at any step
    again = build_source(cfg, cfg.run.output_dir, "local")
    for t in (0, 57, 199):
        assert torch.equal(again.step_windows(t, 1, 2), src.step_windows(t, 1, 2))
    # held-out windows come from both, by weight
    assert src.val_windows().shape == (4, 9)
    with pytest.raises(DataError, match="needs data.batch_layout=lanes"):
        build_source(make_cfg(tmp_path, web, **{"data.sources": sources, "data.batch_layout": "stream"}),
                     cfg.run.output_dir, "local")
    with pytest.raises(DataError, match="gives no row to a source"):
        build_source(make_cfg(tmp_path, web, **{"data.sources": {"a": {"source": web, "weight": 0.95},
                                                                  "b": {"source": edu, "weight": 0.05}},
                                                "train.global_batch_size": 6}), cfg.run.output_dir, "local")


def test_epoch_order_maps_every_position_once():
    for n, c in ((1000, 64), (1024, 64), (10, 64), (777, 1)):
        o = EpochOrder(n, c, seed=3, epoch=2)
        got = []
        for p in range(0, n, 37):  # ranges of several lengths cover the epoch exactly once
            for a, b in o.pieces(p, min(37, n - p)):
                got.extend(range(a, b))
        assert sorted(got) == list(range(n)) and (not o.shuffle or got != list(range(n)))
        if o.shuffle:
            assert len(o.order) == -(-n // c)  # memory: one entry per chunk
    with pytest.raises(DataError):
        EpochOrder(100, 10, 0, 0).pieces(95, 10)
