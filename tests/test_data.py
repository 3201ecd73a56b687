"""The in-process data path: sources, the ordered stream read back from the token store, windows of both phases,
bad input (no Ray here). Expected streams come from tokenizing the documents directly, not from the store."""

import json
import os

import numpy as np
import pytest
import torch

from pipeline.config import Config, apply_overrides
from pipeline.data import StreamPlan, build_source, iter_documents, list_files, new_stats
from pipeline.errors import DataError
from pipeline.data.tokenizer import load_tokenizer


def make_cfg(source, **kv):
    """The stream layout in file order: the contract these tests check window by window (lanes and shuffling:
    tests/test_lanes.py)."""
    base = {"data.source": source, "data.tokenizer": "bpe:400", "data.seq_len": 8, "data.bag_size": 3,
            "data.val_fraction": 0.1, "data.val_windows": 4, "train.steps": 10, "train.switch_fraction": 0.4,
            "train.global_batch_size": 4, "data.batch_layout": "stream", "data.shuffle": False}
    base.update(kv)
    return apply_overrides(Config(), {k: v for k, v in base.items()})


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return str(path)


def corpus_texts(n=60, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while dogs ran far away from home and birds sang songs of old".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) + f" doc{i}." for i in range(n)]


def direct_tokens(cfg, out) -> np.ndarray:
    """The train stream of one epoch tokenized directly: documents in order, each + EOS (no store involved)."""
    tok = load_tokenizer(cfg.data, out)
    return tok.encode_documents([t for _, t in iter_documents(cfg.data, "train")])[0]


def expected_stream(tokens: np.ndarray, a: int, b: int) -> np.ndarray:
    return tokens[np.arange(a, b) % len(tokens)].astype(np.int64)


def test_plan_offsets_match_schedule():
    plan = StreamPlan(total_steps=10, switch_fraction=0.35, bag_size=4, seq_len=8, global_batch_size=2)
    assert plan.switch_step == 4  # floor(3.5 + 0.5)
    assert plan.offset(0) == 0 and plan.offset(4) == 4 * 2 * 4 * 8 and plan.offset(5) == plan.offset(4) + 2 * 8
    assert [plan.window_len(t) for t in (0, 3, 4, 9)] == [36, 36, 9, 9]


def test_windows_have_phase_shapes_and_follow_the_stream(tmp_path):
    cfg = make_cfg(write_jsonl(tmp_path / "c.jsonl", corpus_texts(80)))
    src = build_source(cfg, str(tmp_path / "out"), "memory")
    toks = direct_tokens(cfg, str(tmp_path / "out"))
    plan = src.plan
    s, L, B = 3, 8, 4
    for t in range(plan.total_steps):
        st = s if t < plan.switch_step else 1
        full = src.step_windows(t, 0, 1)
        assert full.shape == (B, st * L + st) and full.dtype == torch.int64
        halves = [src.step_windows(t, r, 2) for r in range(2)]
        assert all(h.shape == (B // 2, st * L + st) for h in halves)
        assert torch.equal(torch.cat(halves), full)
        o = plan.offset(t)
        for k in range(B):  # window k of step t starts at o + k*s_t*L of the stream
            a = o + k * st * L
            assert np.array_equal(full[k].numpy(), expected_stream(toks, a, a + st * L + st))
    # concatenating every window minus its tail reproduces the stream in order, nothing lost or duplicated
    body = [w[:, : w.shape[1] - (s if t < plan.switch_step else 1)].reshape(-1) for t, w in src.iter_steps(0, 0, 1)]
    got = torch.cat(body).numpy()
    assert np.array_equal(got, expected_stream(toks, 0, plan.offset(plan.total_steps)))


def test_stream_is_the_tokenized_documents_with_eos_and_epochs_wrap(tmp_path):
    texts = corpus_texts(30)
    cfg = make_cfg(write_jsonl(tmp_path / "c.jsonl", texts), **{"data.val_fraction": 0.0, "train.steps": 40})
    out = str(tmp_path / "out")
    tok = load_tokenizer(cfg.data, out)
    src = build_source(cfg, out, "memory", tokenizer=tok)
    expect = []
    for t in texts:
        expect += tok.encode(t) + [tok.eos_id]
    stored = src.store.read("train", 0, src.corpus_tokens).numpy()
    assert np.array_equal(stored, np.array(expect, dtype=np.int64))
    assert tok.decode(stored[: len(tok.encode(texts[0]))]) == texts[0]
    assert src.epoch_at(39) > 1.0  # the run wraps around the small corpus
    w = src.step_windows(39, 0, 1)
    a = src.plan.offset(39)
    assert np.array_equal(w[0].numpy(), expected_stream(np.array(expect), a, a + w.shape[1]))


def test_val_split_is_held_out_and_never_in_train(tmp_path):
    texts = [f"unique document number {i} " + "word " * (i % 7 + 3) for i in range(200)]
    cfg = make_cfg(write_jsonl(tmp_path / "c.jsonl", texts), **{"data.val_fraction": 0.2})
    st_train, st_val = new_stats(), new_stats()
    train = [t for _, t in iter_documents(cfg.data, "train", st_train)]
    val = [t for _, t in iter_documents(cfg.data, "val", st_val)]
    assert set(train).isdisjoint(val) and len(train) + len(val) == 200
    assert 20 <= len(val) <= 60  # about val_fraction of the documents
    src = build_source(cfg, str(tmp_path / "out"), "memory")
    assert src.val_windows().shape == (4, 9)
    # a separate val path
    vpath = write_jsonl(tmp_path / "v.jsonl", ["held out text " * 20])
    cfg2 = make_cfg(str(tmp_path / "c.jsonl"), **{"data.val_source": vpath})
    assert len([1 for _ in iter_documents(cfg2.data, "train")]) == 200
    assert [t for _, t in iter_documents(cfg2.data, "val")] == ["held out text " * 20]


def test_mask_mode_returns_doc_ids(tmp_path):
    cfg = make_cfg(write_jsonl(tmp_path / "c.jsonl", corpus_texts(40)), **{"data.doc_boundary": "mask", "train.steps": 30})
    src = build_source(cfg, str(tmp_path / "out"), "memory")
    w, d = src.step_windows(0, 0, 1)
    assert w.shape == d.shape and d.dtype == torch.int64
    eos = load_tokenizer(cfg.data, str(tmp_path / "out")).eos_id
    # a document ends with EOS: the doc id changes exactly after each EOS
    flat_w, flat_d = w[0].numpy(), d[0].numpy()
    changes = np.nonzero(np.diff(flat_d))[0]
    assert all(flat_w[i] == eos for i in changes)
    # later epochs get new document ids (a wrapped document is a different document)
    w29, d29 = src.step_windows(29, 0, 1)
    assert src.epoch_at(29) > 1 and int(d29.max()) >= src.store.documents("train")
    vw, vd = src.val_windows()
    assert vw.shape == vd.shape


def test_builtin_corpora_are_real_text():
    from pipeline.data.corpus import builtin_documents

    wiki = builtin_documents("wiki")
    assert len(wiki) == 10033 and sum(len(t.encode()) for t in wiki) >= 5_000_000
    assert wiki == tuple(sorted(wiki, key=lambda t: t.split("\n", 1)[0])) or wiki[0].startswith("0\n")
    bible = builtin_documents("bible")
    assert bible[0].startswith("Genesis 1\nIn the beginning") and len(bible) == 1189
    assert len(builtin_documents("pydoc")) > 50


def test_list_files_folder_glob_and_list(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "d" / ".hidden").write_text("x")
    cfg = make_cfg(str(tmp_path / "d"))
    entries = list_files(str(tmp_path / "d"), cfg.data)
    assert [os.path.basename(e.uri) for e in entries] == ["b.txt", "a.jsonl"] or len(entries) == 2
    assert {e.fmt for e in entries} == {"text", "jsonl"}
    assert len(list_files(str(tmp_path / "d" / "**" / "*.jsonl"), cfg.data)) == 1
    assert len(list_files(f"{tmp_path / 'd' / 'b.txt'},builtin:pydoc", cfg.data)) == 2


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_records_are_counted_or_fatal(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = corpus_texts(30)
    with open(p, "wb") as f:
        for i, t in enumerate(good):
            f.write(json.dumps({"text": t}).encode() + b"\n")
            if i == 3:
                f.write(b'{"text": "broken\n')  # malformed JSON, line 5
            if i == 5:
                f.write(b'{"other": 1}\n')  # no text field
            if i == 7:
                f.write(b'{"text": ""}\n')  # empty document
        f.write(b'{"text": "caf\xe9 latin-1 bytes"}\n')  # invalid UTF-8
        f.write(json.dumps({"text": "nul \x00 inside"}).encode() + b"\n")  # a NUL character: kept, counted
    cfg = make_cfg(str(p))
    stats = build_source(cfg, str(tmp_path / "out"), "memory").stats  # the store's index holds the counts
    sk = stats["skipped"]
    assert sk["malformed_json"] == 1 and sk["missing_field"] == 1 and sk["empty"] == 1
    assert stats["invalid_utf8"] == 1 and stats["nul_documents"] == 1
    assert stats["documents"] + stats["val_documents"] == 32 and stats["records"] == 35
    cfg_fail = make_cfg(str(p), **{"data.on_bad_record": "fail"})
    with pytest.raises(DataError, match=r"bad\.jsonl:5: malformed JSON"):
        list(iter_documents(cfg_fail.data, "train"))


def test_unreadable_parquet_is_skipped_or_fatal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"content": corpus_texts(20)}), d / "a.parquet")
    (d / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    cfg = make_cfg(str(d), **{"data.text_field": "content", "data.val_fraction": 0.0})
    st = new_stats()
    docs = list(iter_documents(cfg.data, "train", st))
    assert len(docs) == 20 and st["skipped"]["unreadable_file"] == 1
    with pytest.raises(DataError, match=r"b\.parquet.*unreadable Parquet"):
        list(iter_documents(make_cfg(str(d), **{"data.text_field": "content", "data.on_bad_record": "fail"}).data, "train"))
    with pytest.raises(DataError, match="has no column 'text'"):
        list(iter_documents(make_cfg(str(d / "a.parquet")).data, "train"))


def test_missing_empty_and_too_small_corpora_fail_before_training(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_source(make_cfg(str(tmp_path / "nope.jsonl")), str(tmp_path / "out"), "memory")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(DataError, match="no training documents"):
        build_source(make_cfg(str(tmp_path / "empty.jsonl"), **{"data.tokenizer": "gpt2"}), str(tmp_path / "out"), "memory")
    write_jsonl(tmp_path / "tiny.jsonl", ["just a few words"])
    with pytest.raises(DataError, match="fewer than one window"):
        build_source(make_cfg(str(tmp_path / "tiny.jsonl"), **{"data.tokenizer": "gpt2", "data.val_fraction": 0.0}),
                     str(tmp_path / "out"), "memory")


def test_text_files_per_file_and_blank_line_blocks(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "a.txt").write_text("first para\nstill first\n\n  \nsecond para\n")
    (d / "b.txt").write_text("other file")
    per_file = [t for _, t in iter_documents(make_cfg(str(d), **{"data.val_fraction": 0.0}).data, "train")]
    assert per_file == ["first para\nstill first\n\n  \nsecond para\n", "other file"]
    blocks = [t for _, t in iter_documents(make_cfg(str(d), **{"data.val_fraction": 0.0, "data.text_split": "blank_line"}).data, "train")]
    assert blocks == ["first para\nstill first", "second para\n", "other file"]
