"""The TST data stream: sources -> documents -> tokens -> one ordered stream -> phase-shaped windows.

The contract (docs/interfaces.md, design notes): the corpus's training documents, each tokenized and followed by
EOS, are concatenated in a fixed order into ONE token stream, repeated for later epochs (stream[i] =
tokens[i % n]). Step t reads the global batch of B windows starting at offset o = raw_tokens_before(t): window k is
stream[o + k*s_t*L : o + k*s_t*L + s_t*L + s_t] (s_t = s in superposition, 1 in recovery), so the same stream
serves both phases and the switch needs no restart. Rank w of W gets windows [w*B/W, (w+1)*B/W). The data
position of a checkpoint is therefore the step alone, and a resume with any worker count is exact.

Two interchangeable sources implement `step_windows / iter_steps / val_windows / epoch_at`:
- `TokenArraySource` (mode "memory"): the tokenized corpus as one int32 numpy array, tokenized in-process with
  HF tokenizers' batched encoder. Unit tests and small runs.
- `RayDataSource` (mode "ray"): Ray Data reads the files (tasks), tokenizes (`map_batches` with a class UDF on an
  `ActorPoolStrategy` of CPU actors) and delivers the token stream in order (`preserve_order=True`) to one ordered
  "dealer" actor, which packs it into windows and serves each (step, rank) request through the object store.
  Workers prefetch the next `data.prefetch_steps` steps in the background. A new dealer (a resumed run, any
  world size) replays the stream and skips to the step's offset, whole epochs at a time when the corpus size is
  known. Ray's `streaming_split` is not used: it hands blocks first-come, which cannot give exact resume.

Document boundaries (the paper is silent): `data.doc_boundary = "cross"` (default) packs documents back to back
with EOS as an ordinary token; bags and next-bag targets run across documents exactly as packed next-token
training does. `"mask"`: every window also comes with a same-shaped int64 `doc_ids` tensor (the ordinal of each
token's document in the stream; EOS belongs to the document it ends) and sources return `(windows, doc_ids)`
tuples; `tst_ops.next_bag_targets(window, s, doc_ids=...)` ignores a target whose document differs from that of
its bag's last token. Nothing is ever padded or dropped inside the stream; only the stream's end (past step T) is
unused ("the documented tail").

Held-out split: `data.val_source` (separate files) or, by default, documents whose (file index, record index)
hash with `data.split_seed` falls below `data.val_fraction`. Held-out documents never enter the train stream;
`val_windows()` returns up to `data.val_windows` non-overlapping (L+1)-token windows of them.

Bad input (counted in `stats`, shown by `tst data inspect`): invalid UTF-8 is decoded with U+FFFD and counted
(`invalid_utf8`); empty documents are skipped (`empty`); a malformed JSON line (`malformed_json`), a JSON record
without the text field (`missing_field`) or an unreadable Parquet file (`unreadable_file`) is logged with its path
and line and skipped when `data.on_bad_record = "skip"` (the default) or raises DataError when "fail". A missing
path, an empty corpus, or a corpus smaller than one window raises DataError in `build_source`, on the driver,
before any worker starts.

Ray, Ray Data and tokenizers are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob as _glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from pipeline.errors import DataError

log = logging.getLogger("tst.data")

PREFLIGHT_FULL_COUNT_CHARS = 1_000_000
STREAM_BLOCK_BYTES = 1 << 20  # Ray Data block size target of the read/tokenize stages  # ray mode: the driver counts a corpus this small completely
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")
SKIP_REASONS = ("empty", "malformed_json", "missing_field", "unreadable_file")
_MAX_WARNINGS = 10


# ---------------------------------------------------------------------------------------------------------------
# The plan: which stream offsets each step reads (a pure function of the schedule)
# ---------------------------------------------------------------------------------------------------------------
def _schedule():
    try:
        from tst_ops import schedule

        return schedule
    except ImportError:  # pragma: no cover - tst_ops.schedule is part of the project
        return None


@dataclass(frozen=True)
class StreamPlan:
    """The schedule facts the data side needs: T, r, s, L, B (global) and the number of held-out windows."""

    total_steps: int
    switch_fraction: float
    bag_size: int
    seq_len: int
    global_batch_size: int
    val_windows: int = 64
    prefetch_steps: int = 2

    @classmethod
    def from_config(cls, cfg) -> "StreamPlan":
        return cls(
            total_steps=cfg.train.steps,
            switch_fraction=cfg.train.switch_fraction,
            bag_size=cfg.data.bag_size,
            seq_len=cfg.data.seq_len,
            global_batch_size=cfg.train.global_batch_size,
            val_windows=cfg.data.val_windows,
            prefetch_steps=cfg.data.prefetch_steps,
        )

    @property
    def switch_step(self) -> int:
        sch = _schedule()
        if sch is not None:
            return sch.switch_step(self.total_steps, self.switch_fraction)
        return min(self.total_steps, int(math.floor(self.switch_fraction * self.total_steps + 0.5)))

    def bag_size_at(self, step: int) -> int:
        self._check_step(step)
        return self.bag_size if step < self.switch_step else 1

    def phase_at(self, step: int) -> str:
        return "superposition" if self.bag_size_at(step) > 1 or step < self.switch_step else "recovery"

    def offset(self, step: int) -> int:
        """Stream offset at the start of `step` (0 <= step <= T): raw_tokens_before(step)."""
        sch = _schedule()
        pps = self.global_batch_size * self.seq_len
        if sch is not None:
            return sch.raw_tokens_before(step, self.total_steps, self.switch_fraction, self.bag_size, pps)
        sw = self.switch_step
        n_sup = min(step, sw)
        return n_sup * pps * self.bag_size + (step - n_sup) * pps

    def window_len(self, step: int) -> int:
        s = self.bag_size_at(step)
        return s * self.seq_len + s

    def max_window_len(self) -> int:
        s = self.bag_size if self.switch_step > 0 else 1
        return s * self.seq_len + s

    def step_span(self, step: int) -> tuple[int, int]:
        """[start, end) of the stream a whole step reads (its windows plus the last one's tail)."""
        s = self.bag_size_at(step)
        o = self.offset(step)
        return o, o + self.global_batch_size * s * self.seq_len + s

    def rank_span(self, step: int, rank: int, world_size: int) -> tuple[int, int, int]:
        """(start offset, windows, window stride) of this rank's share of `step`."""
        self._check_rank(rank, world_size)
        s = self.bag_size_at(step)
        per = self.global_batch_size // world_size
        return self.offset(step) + rank * per * s * self.seq_len, per, s * self.seq_len

    def tokens_needed(self) -> int:
        """Stream tokens the whole run reads (up to the last window's tail)."""
        if self.total_steps == 0:
            return 0
        return self.step_span(self.total_steps - 1)[1]

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.total_steps:
            raise DataError(f"step {step} is outside the run's {self.total_steps} steps (train.steps)")

    def _check_rank(self, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size} workers")
        if self.global_batch_size % world_size:
            raise DataError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by {world_size} workers; "
                f"pick a batch that is a multiple of the worker count"
            )


def cut_windows(seg: np.ndarray, count: int, stride: int, length: int) -> np.ndarray:
    """`count` windows of `length` tokens, `stride` apart, from a contiguous segment (a copy, C-contiguous)."""
    view = np.lib.stride_tricks.as_strided(seg, shape=(count, length), strides=(stride * seg.strides[0], seg.strides[0]),
                                           writeable=False)
    return np.ascontiguousarray(view)


# ---------------------------------------------------------------------------------------------------------------
# Files and documents
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One input file (or a builtin corpus) with its format."""

    uri: str
    fmt: str  # text | jsonl | parquet | builtin
    size: int = 0
    mtime: float = 0.0

    def key(self) -> str:
        if self.fmt == "builtin":
            from pipeline.corpus import builtin_key

            return builtin_key(self.uri.split(":", 1)[1])
        return f"{self.uri}:{self.size}:{int(self.mtime)}"

    @property
    def is_remote(self) -> bool:
        return "://" in self.uri


def new_stats() -> dict:
    return {"records": 0, "documents": 0, "val_documents": 0, "invalid_utf8": 0, "skipped": {r: 0 for r in SKIP_REASONS}}


def merge_stats(a: dict, b: dict) -> dict:
    out = new_stats()
    for k in ("records", "documents", "val_documents", "invalid_utf8"):
        out[k] = a.get(k, 0) + b.get(k, 0)
    for r in SKIP_REASONS:
        out["skipped"][r] = a["skipped"].get(r, 0) + b["skipped"].get(r, 0)
    return out


def _is_glob(p: str) -> bool:
    return any(c in p for c in "*?[")


def _filesystem(uri: str, data_cfg):
    """(pyarrow filesystem, path inside it) for s3:// / gs:// URIs."""
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0].lower()
    if scheme == "s3":
        endpoint = getattr(data_cfg, "s3_endpoint", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {}
        if endpoint:
            sch, _, host = endpoint.rpartition("://")
            kwargs["endpoint_override"] = host.rstrip("/")
            kwargs["scheme"] = sch or "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri.split("://", 1)[1]
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), uri.split("://", 1)[1]
    raise DataError(f"unsupported URI scheme in '{uri}'; use a local path, s3:// or gs://")


def _detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = path.lower()
    if p.endswith(".gz"):
        p = p[:-3]
    if p.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if p.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


def list_files(source: str, data_cfg) -> list[FileEntry]:
    """Expand a source spec (file, folder, glob, s3://, gs://, builtin:NAME; comma-separated list) in order.

    Folders and globs are expanded recursively and sorted; hidden files (.*, _*) are ignored. Raises DataError
    naming the first path that matches nothing.
    """
    if not source or not str(source).strip():
        raise DataError("data.source is empty; set it to a file, folder, glob, s3:// URI or builtin:wiki")
    fmt = data_cfg.format
    if fmt not in ("auto", "text", "jsonl", "parquet"):
        raise DataError(f"data.format={fmt!r} is not one of auto, text, jsonl, parquet")
    out: list[FileEntry] = []
    for item in [s.strip() for s in str(source).split(",") if s.strip()]:
        if item.startswith("builtin:"):
            from pipeline.corpus import builtin_path

            builtin_path(item.split(":", 1)[1])  # validates the name
            out.append(FileEntry(item, "builtin"))
            continue
        found: list[FileEntry] = []
        if "://" in item:
            import pyarrow.fs as pafs

            fs, path = _filesystem(item, data_cfg)
            try:
                if _is_glob(path):
                    base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
                    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                    infos = [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
                else:
                    info = fs.get_file_info(path)
                    if info.type == pafs.FileType.Directory:
                        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
                    elif info.type == pafs.FileType.File:
                        infos = [info]
                    else:
                        infos = []
            except OSError as e:
                raise DataError(f"cannot list '{item}' ({str(e).splitlines()[0]}); check the URI, credentials and data.s3_endpoint") from None
            scheme = item.split("://", 1)[0]
            for i in sorted(infos, key=lambda i: i.path):
                if os.path.basename(i.path).startswith((".", "_")):
                    continue
                mt = i.mtime.timestamp() if i.mtime is not None else 0.0
                found.append(FileEntry(f"{scheme}://{i.path}", _detect_format(i.path, fmt), int(i.size or 0), mt))
        else:
            path = os.path.expanduser(item)
            if _is_glob(path):
                paths = sorted(p for p in _glob.glob(path, recursive=True) if os.path.isfile(p))
            elif os.path.isdir(path):
                paths = []
                for d, dirs, names in os.walk(path):
                    dirs[:] = sorted(x for x in dirs if not x.startswith((".", "_")))
                    paths += [os.path.join(d, n) for n in names if not n.startswith((".", "_"))]
                paths.sort()
            elif os.path.isfile(path):
                paths = [path]
            else:
                raise DataError(f"data source '{item}' does not exist; fix data.source (a file, folder, glob, s3:// URI or builtin:wiki)")
            for p in paths:
                st = os.stat(p)
                found.append(FileEntry(os.path.abspath(p), _detect_format(p, fmt), st.st_size, st.st_mtime))
        if not found:
            raise DataError(f"data source '{item}' matches no files; fix data.source")
        out.extend(found)
    return out


def _read_bytes(entry: FileEntry, data_cfg) -> bytes:
    if entry.is_remote:
        fs, path = _filesystem(entry.uri, data_cfg)
        with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as f:
            return f.read()
    with open(entry.uri, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if entry.uri.endswith(".gz") else data


class _Warner:
    """Logs the first few bad records of each kind with path and line."""

    def __init__(self):
        self.n = 0

    def __call__(self, msg: str):
        self.n += 1
        if self.n <= _MAX_WARNINGS:
            log.warning("data: %s", msg)
        elif self.n == _MAX_WARNINGS + 1:
            log.warning("data: more bad records; see the counts in `tst data inspect`")


def _decode(raw: bytes, stats: dict) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["invalid_utf8"] += 1
        return raw.decode("utf-8", errors="replace")


def _bad(data_cfg, stats: dict, warn: Callable, reason: str, where: str, detail: str) -> None:
    fixes = {
        "malformed_json": "fix or remove the line",
        "missing_field": f"give every record a string field '{data_cfg.text_field}' or set data.text_field",
        "unreadable_file": "replace or remove the file",
    }
    msg = f"{where}: {detail}"
    if data_cfg.on_bad_record == "fail":
        raise DataError(f"{msg}; {fixes[reason]}, or set data.on_bad_record=skip to skip and count such records")
    stats["skipped"][reason] += 1
    warn(msg + " (skipped)")


def iter_file_records(entry: FileEntry, data_cfg, stats: dict, warn: Optional[Callable] = None) -> Iterator[tuple[int, Optional[str]]]:
    """(record index, text or None) for each record of one file; None marks a record skipped as bad.

    Record indices count every record (documents, empty ones and malformed lines alike), so they identify a
    document independently of what was skipped. Text is not yet checked for emptiness.
    """
    warn = warn or _Warner()
    if entry.fmt == "builtin":
        from pipeline.corpus import builtin_documents

        yield from enumerate(builtin_documents(entry.uri.split(":", 1)[1]))
        return
    if entry.fmt == "parquet":
        yield from _iter_parquet(entry, data_cfg, stats, warn)
        return
    try:
        data = _read_bytes(entry, data_cfg)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read '{entry.uri}' ({str(e).splitlines()[0]}); check the path and permissions") from None
    if entry.fmt == "text":
        if data_cfg.text_split == "file":
            yield 0, _decode(data, stats)
        elif data_cfg.text_split == "blank_line":
            import re

            text = _decode(data, stats)
            for i, block in enumerate(re.split(r"\n\s*\n", text)):
                yield i, block
        else:
            raise DataError(f"data.text_split={data_cfg.text_split!r} is not 'file' or 'blank_line'")
        return
    if entry.fmt == "jsonl":
        field = data_cfg.text_field
        lines = data.split(b"\n")
        if lines and lines[-1].strip() == b"":
            lines.pop()
        for i, raw in enumerate(lines):
            line = _decode(raw, stats)
            if not line.strip():
                yield i, ""
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(data_cfg, stats, warn, "malformed_json", f"{entry.uri}:{i + 1}", f"malformed JSON line ({e.msg} at column {e.colno})")
                yield i, None
                continue
            text = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                _bad(data_cfg, stats, warn, "missing_field", f"{entry.uri}:{i + 1}", f"JSON record has no string field '{field}'")
                yield i, None
                continue
            yield i, text
        return
    raise DataError(f"unknown format {entry.fmt!r} for '{entry.uri}'")


def _iter_parquet(entry: FileEntry, data_cfg, stats: dict, warn: Callable):
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = data_cfg.text_field
    try:
        if entry.is_remote:
            fs, path = _filesystem(entry.uri, data_cfg)
            with fs.open_input_file(path) as f:
                buf = f.read()
        else:
            with open(entry.uri, "rb") as f:
                buf = f.read()
        pf = pq.ParquetFile(pa.BufferReader(buf))
        names = pf.schema_arrow.names
        if col not in names:
            raise DataError(f"Parquet file '{entry.uri}' has no column '{col}' (columns: {', '.join(names)}); set data.text_field")
        column = pf.read(columns=[col]).column(col)
    except DataError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        _bad(data_cfg, stats, warn, "unreadable_file", entry.uri, f"unreadable Parquet file ({str(e).splitlines()[0]})")
        return
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        values = (None if v is None else _decode(v, stats) for v in column.to_pylist())
    else:
        values = column.to_pylist()
    for i, v in enumerate(values):
        yield i, ("" if v is None else str(v))


def is_val_document(file_idx: int, rec_idx: int, data_cfg) -> bool:
    """The seeded hash split: a record is held out when its hash falls below data.val_fraction."""
    f = data_cfg.val_fraction
    if data_cfg.val_source or f <= 0:
        return False
    h = hashlib.blake2b(f"{data_cfg.split_seed}:{file_idx}:{rec_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < f


def iter_documents(data_cfg, split: str = "train", stats: Optional[dict] = None, entries: Optional[list] = None,
                   start: tuple[int, int] = (0, 0), stop: Optional[tuple[int, int]] = None) -> Iterator[tuple[tuple[int, int], str]]:
    """((file index, record index), text) of the non-empty documents of one split, in stream order.

    split: "train" (held-out documents removed), "val" (the held-out documents: val_source's, or the hashed
    fraction), or "all". data.max_documents caps the records read (of every kind, in order). `stop` ends before
    that (file, record) position; it is how a Ray read task is given the same cap.
    """
    stats = stats if stats is not None else new_stats()
    if split == "val" and data_cfg.val_source:
        entries = list_files(data_cfg.val_source, data_cfg)
        split = "all"
    elif entries is None:
        entries = list_files(data_cfg.source, data_cfg)
    warn = _Warner()
    cap = data_cfg.max_documents
    for fi, entry in enumerate(entries):
        if fi < start[0]:
            continue
        for ri, text in iter_file_records(entry, data_cfg, stats, warn):
            if (fi, ri) < start:
                continue
            if stop is not None and (fi, ri) >= stop:
                return
            if cap is not None and stats["records"] >= cap:
                return
            stats["records"] += 1
            if text is None:
                continue
            if not text.strip():
                stats["skipped"]["empty"] += 1
                continue
            held_out = is_val_document(fi, ri, data_cfg)
            if held_out:
                stats["val_documents"] += 1
            else:
                stats["documents"] += 1
            if split == "all" or (split == "val") == held_out:
                yield (fi, ri), text


def _tokenize_texts(texts_iter: Iterator[str], tok, batch: int = 512):
    """Encode documents in batches -> (flat int32 tokens with EOS, int64 per-document lengths)."""
    flats, lens, buf = [], [], []
    for t in texts_iter:
        buf.append(t)
        if len(buf) >= batch:
            f, n = tok.encode_documents(buf)
            flats.append(f)
            lens.append(n)
            buf = []
    if buf:
        f, n = tok.encode_documents(buf)
        flats.append(f)
        lens.append(n)
    if not flats:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(flats), np.concatenate(lens)


def _doc_ids_from_lengths(lengths: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Prefetching helper (a background thread that runs a step producer ahead of the consumer)
# ---------------------------------------------------------------------------------------------------------------
def _prefetched(produce: Callable[[int], Any], steps: range, depth: int) -> Iterator[tuple[int, Any]]:
    if depth <= 0:
        for t in steps:
            yield t, produce(t)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    _END = object()

    def run():
        try:
            for t in steps:
                item = (t, produce(t))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    th = threading.Thread(target=run, name="tst-data-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _log_epochs(source, step: int, last_epoch: list) -> None:
    e = int(source.epoch_at(step))
    if e > last_epoch[0]:
        last_epoch[0] = e
        log.info("data: epoch %d of the corpus begins at step %d", e + 1, step)


# ---------------------------------------------------------------------------------------------------------------
# In-memory source
# ---------------------------------------------------------------------------------------------------------------
class TokenArraySource:
    """The tokenized training corpus as one int32 array; epochs wrap around (stream[i] = tokens[i % n]).

    `tokens`: the train stream of one epoch (documents + EOS, in order); `val_tokens`: the held-out stream;
    `plan`: a StreamPlan. `doc_ids` / `val_doc_ids` (int32 document ordinal per token) are required when
    `doc_boundary == "mask"`; then every window method returns `(windows, doc_ids)`.
    """

    def __init__(self, tokens, val_tokens, plan: StreamPlan, doc_ids=None, val_doc_ids=None,
                 doc_boundary: str = "cross", stats: Optional[dict] = None, tokenizer_path: Optional[str] = None):
        self.tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32))
        self.val_tokens = np.ascontiguousarray(np.asarray(val_tokens if val_tokens is not None else [], dtype=np.int32))
        self.plan = plan
        self.doc_boundary = doc_boundary
        self.stats = stats or new_stats()
        self.tokenizer_path = tokenizer_path
        n = len(self.tokens)
        if n == 0:
            raise DataError("the training corpus has no tokens; point data.source at non-empty documents")
        if n < plan.max_window_len():
            raise DataError(
                f"the training corpus has {n} tokens, fewer than one window ({plan.max_window_len()} = s*L+s); "
                f"add data or lower data.seq_len / data.bag_size"
            )
        if doc_boundary == "mask":
            if doc_ids is None:
                raise DataError("doc_boundary='mask' needs doc_ids for the train tokens")
            self.doc_ids = np.asarray(doc_ids, dtype=np.int32)
            self.val_doc_ids = np.asarray(val_doc_ids if val_doc_ids is not None else np.zeros(len(self.val_tokens)), dtype=np.int32)
            self.n_docs = int(self.doc_ids[-1]) + 1
        else:
            self.doc_ids = self.val_doc_ids = None
            self.n_docs = None

    @property
    def corpus_tokens(self) -> int:
        return len(self.tokens)

    def epochs_needed(self) -> float:
        return self.plan.tokens_needed() / len(self.tokens)

    def _segment(self, a: int, b: int):
        n = len(self.tokens)
        idx = np.arange(a, b, dtype=np.int64)
        seg = self.tokens[idx % n] if (b > n or a >= n) else self.tokens[a:b]
        if self.doc_ids is None:
            return seg, None
        docs = self.doc_ids[idx % n].astype(np.int64) + (idx // n) * self.n_docs
        return seg, docs

    def step_windows(self, step: int, rank: int = 0, world_size: int = 1):
        import torch

        s = self.plan.bag_size_at(step)
        a, count, stride = self.plan.rank_span(step, rank, world_size)
        length = s * self.plan.seq_len + s
        seg, docs = self._segment(a, a + (count - 1) * stride + length)
        w = torch.from_numpy(cut_windows(seg.astype(np.int64), count, stride, length))
        if docs is None:
            return w
        return w, torch.from_numpy(cut_windows(docs, count, stride, length))

    def iter_steps(self, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, Any]]:
        last = [int(self.epoch_at(start_step)) if start_step < self.plan.total_steps else 0]
        for t, w in _prefetched(lambda t: self.step_windows(t, rank, world_size), range(start_step, self.plan.total_steps),
                                self.plan.prefetch_steps):
            if rank == 0:
                _log_epochs(self, t, last)
            yield t, w

    def val_windows(self):
        import torch

        L = self.plan.seq_len
        n = 0 if len(self.val_tokens) <= L else min(self.plan.val_windows, (len(self.val_tokens) - 1) // L)
        w = torch.from_numpy(cut_windows(self.val_tokens.astype(np.int64), n, L, L + 1)) if n else torch.zeros(0, L + 1, dtype=torch.int64)
        if self.doc_ids is None:
            return w
        d = torch.from_numpy(cut_windows(self.val_doc_ids.astype(np.int64), n, L, L + 1)) if n else torch.zeros(0, L + 1, dtype=torch.int64)
        return w, d

    def epoch_at(self, step: int) -> float:
        return self.plan.offset(step) / len(self.tokens)

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------------------------
# Building sources
# ---------------------------------------------------------------------------------------------------------------
def _tokens_cache_path(data_cfg, tok, output_dir: str, entries) -> str:
    with open(tok.path, "rb") as f:
        tok_hash = hashlib.sha256(f.read()).hexdigest()[:16]
    key = {
        "files": [e.key() for e in entries], "tok": tok_hash,
        "val_source": [e.key() for e in list_files(data_cfg.val_source, data_cfg)] if data_cfg.val_source else None,
        **{k: getattr(data_cfg, k) for k in ("format", "text_field", "text_split", "val_fraction", "split_seed",
                                             "max_documents", "on_bad_record")},
        "version": 1,
    }
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return os.path.join(output_dir, "tokens", f"{h}.npz")


def tokenize_corpus(data_cfg, tok, output_dir: Optional[str] = None) -> dict:
    """Read and tokenize the whole corpus in-process: train/val tokens, per-document lengths and stats."""
    entries = list_files(data_cfg.source, data_cfg)
    cache = _tokens_cache_path(data_cfg, tok, output_dir, entries) if (output_dir and data_cfg.cache_tokens) else None
    if cache and os.path.isfile(cache):
        z = np.load(cache, allow_pickle=False)
        return {"train": z["train"], "train_lengths": z["train_lengths"], "val": z["val"], "val_lengths": z["val_lengths"],
                "stats": json.loads(str(z["stats"]))}
    stats = new_stats()
    train_texts: list[str] = []
    val_texts: list[str] = []
    split_val = not data_cfg.val_source
    for (fi, ri), text in iter_documents(data_cfg, split="all", stats=stats, entries=entries):
        (val_texts if split_val and is_val_document(fi, ri, data_cfg) else train_texts).append(text)
    if data_cfg.val_source:
        vstats = new_stats()
        val_texts = [t for _, t in iter_documents(data_cfg, split="val", stats=vstats)]
        stats["val_documents"] = len(val_texts)
    train, train_len = _tokenize_texts(iter(train_texts), tok, data_cfg.tokenize_batch_size)
    val, val_len = _tokenize_texts(iter(val_texts), tok, data_cfg.tokenize_batch_size)
    out = {"train": train, "train_lengths": train_len, "val": val, "val_lengths": val_len, "stats": stats}
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = cache + f".{os.getpid()}.tmp.npz"
        np.savez(tmp, train=train, train_lengths=train_len, val=val, val_lengths=val_len, stats=json.dumps(stats))
        os.replace(tmp, cache)
    return out


def _check_corpus(stats: dict, n_tokens: int, plan: StreamPlan, source: str) -> None:
    if stats["documents"] == 0:
        sk = ", ".join(f"{k}={v}" for k, v in stats["skipped"].items() if v)
        raise DataError(f"corpus '{source}' has no training documents ({stats['records']} records read"
                        f"{'; skipped: ' + sk if sk else ''}); point data.source at non-empty text")
    if n_tokens < plan.max_window_len():
        raise DataError(
            f"corpus '{source}' has {n_tokens} training tokens, fewer than one window ({plan.max_window_len()} = s*L+s); "
            f"add data or lower data.seq_len / data.bag_size"
        )


def build_source(cfg, output_dir: str = "outputs", mode: str = "memory", tokenizer=None):
    """The window source for a run, built on the driver from the config and the schedule (picklable).

    mode "memory": TokenArraySource; "ray": RayDataSource (needs a running Ray; starts the dealer actor).
    All input errors (missing path, empty corpus, corpus smaller than one window) raise DataError here.
    """
    plan = StreamPlan.from_config(cfg)
    d = cfg.data
    if d.doc_boundary not in ("cross", "mask"):
        raise DataError(f"data.doc_boundary must be 'cross' or 'mask', got {d.doc_boundary!r}")
    plan._check_rank(0, max(1, cfg.scaling.num_workers))
    from pipeline.tokenizer import load_tokenizer

    tok = tokenizer or load_tokenizer(d, output_dir)
    if mode == "memory":
        c = tokenize_corpus(d, tok, output_dir)
        _check_corpus(c["stats"], len(c["train"]), plan, d.source)
        mask = d.doc_boundary == "mask"
        src = TokenArraySource(
            c["train"], c["val"], plan,
            doc_ids=_doc_ids_from_lengths(c["train_lengths"]) if mask else None,
            val_doc_ids=_doc_ids_from_lengths(c["val_lengths"]) if mask else None,
            doc_boundary=d.doc_boundary, stats=c["stats"], tokenizer_path=tok.path,
        )
        _log_plan(src, plan, d)
        return src
    if mode == "ray":
        return RayDataSource.create(cfg, plan, tok)
    raise DataError(f"data source mode {mode!r} is not 'memory' or 'ray'")


def _log_plan(src, plan: StreamPlan, d) -> None:
    n = src.corpus_tokens
    need = plan.tokens_needed()
    epochs = need / n
    log.info("data: %d train tokens, run reads %d tokens = %.2f epoch(s)", n, need, epochs)
    if d.max_epochs is not None and epochs > d.max_epochs:
        raise DataError(
            f"the run reads {need} tokens = {epochs:.2f} epochs of a {n}-token corpus, more than data.max_epochs="
            f"{d.max_epochs}; add data, lower train.steps, or raise data.max_epochs"
        )
    if epochs > 1:
        log.warning("data: the run makes %.2f passes over the corpus (TST reads s times more data per step)", epochs)


# ---------------------------------------------------------------------------------------------------------------
# Ray mode
# ---------------------------------------------------------------------------------------------------------------
def _read_files_udf(batch: dict, data_cfg_dict: dict, stop: Optional[tuple], batch_docs: int = 1024):
    """Ray Data read stage (a task per file): yields rows (file, rec, text, kind) in file order.

    kind: "" (train document), "val" (held out, text dropped), "empty" / a bad-record reason (text dropped),
    so the consumer can count every record in stream order. Invalid UTF-8 is counted per file in `bad_utf8`.
    """
    from pipeline.config import DataConfig

    data_cfg = DataConfig(**data_cfg_dict)
    for fi, uri, fmt, size, mtime in zip(batch["file_idx"], batch["uri"], batch["fmt"], batch["size"], batch["mtime"]):
        entry = FileEntry(str(uri), str(fmt), int(size), float(mtime))
        fi = int(fi)
        stats = new_stats()
        cols: dict = {"file": [], "rec": [], "text": [], "kind": [], "bad_utf8": []}
        prev_utf8 = 0
        prev_bad = {r: 0 for r in SKIP_REASONS}
        for ri, text in iter_file_records(entry, data_cfg, stats):
            if stop is not None and (fi, ri) >= tuple(stop):
                break
            if text is None:  # a bad record: its reason is the counter that just moved
                kind = next((r for r in SKIP_REASONS if stats["skipped"][r] > prev_bad[r]), "malformed_json")
                prev_bad = dict(stats["skipped"])
                text = ""
            elif not text.strip():
                kind, text = "empty", ""
            elif is_val_document(fi, ri, data_cfg):
                kind, text = "val", ""
            else:
                kind = ""
            cols["file"].append(fi)
            cols["rec"].append(ri)
            cols["text"].append(text)
            cols["kind"].append(kind)
            cols["bad_utf8"].append(stats["invalid_utf8"] - prev_utf8)
            prev_utf8 = stats["invalid_utf8"]
            if len(cols["file"]) >= batch_docs:
                yield _np_cols(cols)
                cols = {k: [] for k in cols}
        if stats["skipped"]["unreadable_file"]:
            cols["file"].append(fi)
            cols["rec"].append(-1)
            cols["text"].append("")
            cols["kind"].append("unreadable_file")
            cols["bad_utf8"].append(0)
        if cols["file"]:
            yield _np_cols(cols)


def _np_cols(cols: dict) -> dict:
    return {
        "file": np.asarray(cols["file"], dtype=np.int64),
        "rec": np.asarray(cols["rec"], dtype=np.int64),
        "text": np.asarray(cols["text"], dtype=object),
        "kind": np.asarray(cols["kind"], dtype=object),
        "bad_utf8": np.asarray(cols["bad_utf8"], dtype=np.int64),
    }


class _TokenizeUDF:
    """Ray Data tokenize stage: a CPU actor holding the tokenizer; appends EOS to every document."""

    def __init__(self, tok_path: str, eos_token: Optional[str], threads: int):
        # Each actor owns `threads` CPUs: size the tokenizers (rayon) pool to it, and allow its parallelism.
        os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
        os.environ["RAYON_RS_NUM_CPUS"] = str(max(1, threads))
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        from pipeline.tokenizer import TSTTokenizer

        self.tok = TSTTokenizer(tok_path, eos_token)

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa

        kinds = batch["kind"]
        texts = batch["text"]
        live = [i for i, k in enumerate(kinds) if k == ""]
        flat, lengths = self.tok.encode_documents([texts[i] for i in live]) if live else (np.zeros(0, np.int32), np.zeros(0, np.int64))
        all_len = np.zeros(len(kinds), dtype=np.int64)
        all_len[live] = lengths
        offsets = np.zeros(len(kinds) + 1, dtype=np.int32)
        np.cumsum(all_len, out=offsets[1:])
        ids = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))
        return pa.table({
            "file": pa.array(batch["file"]), "rec": pa.array(batch["rec"]),
            "kind": pa.array([str(k) for k in kinds], pa.string()), "bad_utf8": pa.array(batch["bad_utf8"]),
            "ids": ids,
        })


def build_ray_dataset(data_cfg, entries: list, tok_path: str, eos_token: Optional[str], stop: Optional[tuple] = None):
    """read (tasks) -> tokenize (actor pool) as an ordered Ray Dataset of per-document token lists."""
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    # Small blocks keep the stream fine-grained: with the default 128 MiB target, all the batches a read task
    # yields are coalesced into one block per file, and the first window waits for a whole file to be tokenized.
    ctx.target_max_block_size = STREAM_BLOCK_BYTES
    items = [{"file_idx": i, "uri": e.uri, "fmt": e.fmt, "size": e.size, "mtime": e.mtime} for i, e in enumerate(entries)
             if stop is None or i <= stop[0]]
    res = dict(data_cfg.actor_resources or {})
    cfg_dict = dataclasses.asdict(data_cfg)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(_read_files_udf, batch_size=1, batch_format="numpy", fn_kwargs={"data_cfg_dict": cfg_dict, "stop": stop},
                        num_cpus=data_cfg.read_cpus, resources=res or None)
    threads = max(1, int(round(data_cfg.tokenize_actor_cpus)))
    ds = ds.map_batches(_TokenizeUDF, fn_constructor_args=(tok_path, eos_token, threads), batch_size=data_cfg.tokenize_batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(size=max(1, data_cfg.num_tokenize_actors)),
                        num_cpus=data_cfg.tokenize_actor_cpus, resources=res or None)
    return ds


class _TokenBuffer:
    """A rolling window of the stream: chunks of (tokens, doc ids) with absolute offsets."""

    def __init__(self, with_docs: bool):
        self.chunks: list[tuple[int, np.ndarray, Optional[np.ndarray]]] = []
        self.start = 0
        self.end = 0
        self.with_docs = with_docs

    def reset(self, offset: int):
        self.chunks, self.start, self.end = [], offset, offset

    def append(self, toks: np.ndarray, docs: Optional[np.ndarray]):
        if len(toks):
            self.chunks.append((self.end, toks, docs))
            self.end += len(toks)

    def trim(self, before: int):
        while self.chunks and self.chunks[0][0] + len(self.chunks[0][1]) <= before:
            self.chunks.pop(0)
        self.start = self.chunks[0][0] if self.chunks else self.end

    def read(self, a: int, b: int):
        assert self.start <= a and b <= self.end, (a, b, self.start, self.end)
        parts, dparts = [], []
        for off, t, d in self.chunks:
            lo, hi = max(a, off), min(b, off + len(t))
            if lo < hi:
                parts.append(t[lo - off: hi - off])
                if self.with_docs:
                    dparts.append(d[lo - off: hi - off])
        toks = np.concatenate(parts) if len(parts) != 1 else parts[0]
        docs = (np.concatenate(dparts) if len(dparts) != 1 else dparts[0]) if self.with_docs else None
        return toks, docs


class _Dealer:
    """The ordered dealer (a Ray actor): consumes the ordered token stream from Ray Data and serves windows.

    It keeps a rolling buffer of the stream; a request for a step before the buffer restarts the stream and skips
    to the offset (whole epochs are skipped without reading once the corpus size is known). Epochs are
    re-executions of the dataset.
    """

    def __init__(self, data_cfg_dict: dict, entries: list, tok_path: str, eos_token: Optional[str], plan: StreamPlan,
                 stop: Optional[tuple], corpus_tokens: Optional[int] = None, corpus_docs: Optional[int] = None):
        from pipeline.config import DataConfig

        logging.basicConfig(level=logging.INFO)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-execution plan banners drown the progress
        self.cfg = DataConfig(**data_cfg_dict)
        self.entries = [FileEntry(**e) for e in entries]
        self.tok_path, self.eos_token, self.plan, self.stop = tok_path, eos_token, plan, stop
        self.mask = self.cfg.doc_boundary == "mask"
        self.buf = _TokenBuffer(self.mask)
        self.corpus_tokens, self.corpus_docs = corpus_tokens, corpus_docs
        self.keep_behind = 2 * max(1, plan.prefetch_steps) + 4
        self.max_step = -1
        self.epoch = 0
        self._producer = None
        self.queue_batches = 32
        self._epoch_tokens = 0
        self._epoch_docs = 0
        self._doc_base = 0  # doc ordinal of the first document of the current epoch
        self.stats = new_stats()
        self.stats_epochs = 0  # stats are those of the first complete pass
        # a corpus that fits in data.dealer_cache_mb is recorded during one full pass and later epochs are
        # served from that copy instead of re-executing the Ray Data pipeline
        self._cache_cap = int(self.cfg.dealer_cache_mb * 1e6)
        self._rec: Optional[list] = [] if self._cache_cap > 0 else None
        self._rec_bytes = 0
        self.cache = None
        self.created, self.first_batch_s = time.time(), None
        # start the pipeline now (epoch 0), so that its start-up overlaps the trainer's; a resume elsewhere restarts it
        self._start_producer(0)
        self.restarts = 0
        self.delivered = 0

    def ready(self) -> bool:
        return True

    # -- the stream -------------------------------------------------------------------------------------------
    def _start_producer(self, epoch: int):
        """A background thread that runs the Ray Data stream epoch after epoch into a bounded queue, so the
        next epoch's pipeline starts while the dealer still serves the end of the previous one."""
        self._stop_producer()
        q: queue.Queue = queue.Queue(maxsize=self.queue_batches)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        need = self.plan.tokens_needed()

        def run():
            e = epoch
            try:
                while not stop.is_set():
                    ds = build_ray_dataset(self.cfg, self.entries, self.tok_path, self.eos_token, self.stop)
                    n = 0
                    for tbl in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
                        if self.first_batch_s is None:
                            self.first_batch_s = time.time() - self.created
                        n += sum(len(c.flatten()) for c in tbl.column("ids").chunks)
                        if not put(("batch", e, tbl)):
                            return
                    if not put(("end", e, None)):
                        return
                    e += 1
                    if n and e * n >= need:  # the run ends within the epochs streamed so far
                        put(("done", e, None))
                        return
            except BaseException as ex:  # noqa: BLE001 - handed to the consumer
                put(("error", e, ex))

        th = threading.Thread(target=run, name="tst-dealer-producer", daemon=True)
        th.start()
        self._producer = (th, q, stop)

    def _stop_producer(self):
        if self._producer is not None:
            th, q, stop = self._producer
            stop.set()
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            self._producer = None

    def _restart(self, offset: int):
        """Position the stream at the start of the epoch that contains `offset` (or at 0)."""
        self.restarts += 1
        if not self.stats_epochs:
            self.stats = new_stats()  # counted again from the start of the first pass
        e = offset // self.corpus_tokens if (self.corpus_tokens and self.corpus_docs is not None) else 0
        self.epoch = e
        self.buf.reset(e * (self.corpus_tokens or 0))
        self._epoch_tokens = 0
        self._epoch_docs = 0
        self._doc_base = e * (self.corpus_docs or 0)
        if self.cache is None:
            if self._rec is not None:
                self._rec, self._rec_bytes = [], 0
            self._start_producer(e)

    def _pull(self) -> None:
        """Append the next batch of the stream to the buffer, crossing epochs (the stream never ends)."""
        if self.cache is not None:  # a whole epoch from the dealer's copy of a small corpus
            toks, docs = self.cache
            self.buf.append(toks, None if docs is None else docs + self.epoch * self.corpus_docs)
            self._next_epoch()
            return
        while True:
            if self._producer is None:
                self._start_producer(self.epoch)
            kind, e, item = self._producer[1].get()
            if kind == "error":
                self._producer = None
                raise item
            if kind == "batch":
                self._consume(item)
                return
            if kind == "done":
                self._producer = None
                raise DataError(f"the token stream ended at offset {self.buf.end}, before the run's last window; "
                                f"was data.source modified during the run?")
            # end of an epoch
            if self._epoch_tokens == 0:
                raise DataError("the corpus produced no training tokens in a pass; check data.source")
            if self.corpus_tokens is None or self.corpus_docs is None:
                self.corpus_tokens, self.corpus_docs = self._epoch_tokens, self._epoch_docs
            elif self.corpus_tokens != self._epoch_tokens:
                raise DataError(f"the corpus changed during the run ({self.corpus_tokens} tokens in one pass, "
                                f"{self._epoch_tokens} in another); do not modify data.source while training")
            self.stats_epochs = 1
            if self._rec is not None and self.cache is None:
                toks = np.concatenate([t for t, _ in self._rec])
                docs = np.concatenate([d for _, d in self._rec]) - self._doc_base if self.mask else None
                self.cache = (toks, docs)
                self._rec = None
                self._stop_producer()
            self._next_epoch()
            if self.cache is not None:
                return

    def _next_epoch(self):
        self.epoch += 1
        log.info("data: epoch %d of the corpus starts at stream offset %d", self.epoch + 1, self.buf.end)
        if self.cfg.max_epochs is not None and self.epoch >= self.cfg.max_epochs:
            raise DataError(f"the run needs more than data.max_epochs={self.cfg.max_epochs} passes over the corpus; "
                            f"add data, lower train.steps, or raise data.max_epochs")
        self._epoch_tokens = 0
        self._epoch_docs = 0
        self._doc_base = self.epoch * self.corpus_docs

    def _consume(self, tbl):
        kinds = tbl.column("kind").to_pylist()
        if self.stats_epochs == 0:
            st = self.stats
            for k in kinds:
                if k != "unreadable_file":
                    st["records"] += 1
                if k == "":
                    st["documents"] += 1
                elif k == "val":
                    st["val_documents"] += 1
                else:
                    st["skipped"][k] += 1
            st["invalid_utf8"] += int(np.asarray(tbl.column("bad_utf8")).sum())
        ids = tbl.column("ids").combine_chunks()
        toks = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        docs = None
        if self.mask:
            lens = np.diff(np.asarray(ids.offsets))
            lens = lens[lens > 0]
            docs = np.repeat(np.arange(self._doc_base + self._epoch_docs, self._doc_base + self._epoch_docs + len(lens), dtype=np.int64), lens)
            self._epoch_docs += len(lens)
        else:
            self._epoch_docs += sum(1 for k in kinds if k == "")
        self._epoch_tokens += len(toks)
        self.buf.append(toks, docs)
        if self._rec is not None:
            self._rec.append((toks, docs))
            self._rec_bytes += toks.nbytes + (docs.nbytes if docs is not None else 0)
            if self._rec_bytes > self._cache_cap:
                self._rec = None  # too big to keep: later epochs re-execute the pipeline

    def _ensure(self, a: int, b: int):
        if a < self.buf.start:
            self._restart(a)
        elif self.corpus_tokens and a - self.buf.end > self.corpus_tokens:  # far ahead: skip whole epochs
            self._restart(a)
        while self.buf.end < b:
            self._pull()
            # drop what lies before the request while skipping forward
            if self.buf.end < a:
                self.buf.trim(self.buf.end)
            else:
                self.buf.trim(min(a, self._keep_from()))

    def _keep_from(self) -> int:
        return self.plan.offset(max(0, self.max_step - self.keep_behind)) if self.max_step >= 0 else 0

    # -- requests ----------------------------------------------------------------------------------------------
    def windows(self, step: int, rank: int, world_size: int):
        s = self.plan.bag_size_at(step)
        a, count, stride = self.plan.rank_span(step, rank, world_size)
        length = s * self.plan.seq_len + s
        b = a + (count - 1) * stride + length
        self._ensure(a, b)
        self.max_step = max(self.max_step, step)
        seg, docs = self.buf.read(a, b)
        w = cut_windows(seg, count, stride, length)
        self.delivered += count * stride
        self.buf.trim(min(a, self._keep_from()))
        if self.mask:
            return w, cut_windows(docs, count, stride, length)
        return w

    def info(self) -> dict:
        return {"corpus_tokens": self.corpus_tokens, "corpus_docs": self.corpus_docs, "epoch": self.epoch,
                "stats": self.stats if self.stats_epochs else None, "restarts": self.restarts,
                "buffer_tokens": self.buf.end - self.buf.start, "delivered": self.delivered,
                "queued_batches": self._producer[1].qsize() if self._producer else 0,
                "first_batch_after_s": self.first_batch_s}


class RayDataSource:
    """Window source fed by Ray Data through one ordered dealer actor (see the module docstring).

    Created on the driver by `build_source(cfg, output_dir, mode="ray")`; pickles as the dealer's name, the plan
    and the held-out windows, so it can ride inside `train_loop_config` to Ray Train workers.
    """

    def __init__(self, plan: StreamPlan, dealer_name: str, namespace: str, val: np.ndarray, val_docs: Optional[np.ndarray],
                 doc_boundary: str, stats: dict, tokenizer_path: str, corpus_tokens: Optional[int] = None):
        self.plan, self.dealer_name, self.namespace = plan, dealer_name, namespace
        self._val, self._val_docs = val, val_docs
        self.doc_boundary, self.stats, self.tokenizer_path = doc_boundary, stats, tokenizer_path
        self._corpus_tokens = corpus_tokens
        self._dealer = None

    # -- construction on the driver -----------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg, plan: StreamPlan, tok) -> "RayDataSource":
        import ray

        if not ray.is_initialized():
            raise DataError("mode='ray' needs a running Ray; call ray.init() (or use mode='memory')")
        d = cfg.data
        entries = list_files(d.source, d)
        # Preflight on the driver: enough training tokens for one window (reads only the start of the corpus).
        stats = new_stats()
        need = plan.max_window_len()
        n_tok, stop, buf = 0, None, []
        full_pass = True
        stats_chars = [0]
        for _, text in iter_documents(d, "train", stats, entries):
            buf.append(text)
            stats_chars[0] += len(text)
            if len(buf) >= 64:
                n_tok += len(tok.encode_documents(buf)[0])
                buf = []
            if n_tok >= need and d.max_documents is None and stats_chars[0] > PREFLIGHT_FULL_COUNT_CHARS:
                full_pass = False
                break
        if buf:
            n_tok += len(tok.encode_documents(buf)[0])
        if full_pass:
            _check_corpus(stats, n_tok, plan, d.source)
        if d.max_documents is not None:
            # the same cap for the read tasks: stop before the record after the cap'th
            stop = _position_after(d, entries, d.max_documents)
        # Held-out windows, read on the driver up to what val_windows needs.
        val, val_docs = _val_stream(d, tok, plan, entries)
        name = f"tst-data-dealer-{uuid.uuid4().hex[:12]}"
        namespace = ray.get_runtime_context().namespace
        res = dict(d.actor_resources or {})
        Dealer = ray.remote(_Dealer)
        # object-store credentials and endpoints of the driver reach the read tasks (they inherit the dealer's env)
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        dealer = Dealer.options(name=name, num_cpus=d.dealer_cpus, resources=res or None, max_concurrency=1,
                                runtime_env={"env_vars": env} if env else None).remote(
            dataclasses.asdict(d), [dataclasses.asdict(e) for e in entries], tok.path, tok.eos_token, plan, stop,
            n_tok if full_pass else None, stats["documents"] if full_pass else None,
        )
        ray.get(dealer.ready.remote())
        src = cls(plan, name, namespace, val, val_docs, d.doc_boundary, stats if full_pass else None, tok.path,
                  n_tok if full_pass else None)
        src._dealer = dealer
        src._owner_handle = dealer
        return src

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_dealer"] = None
        st.pop("_owner_handle", None)
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)

    def _get_dealer(self):
        if self._dealer is None:
            import ray

            try:
                self._dealer = ray.get_actor(self.dealer_name, namespace=self.namespace)
            except ValueError:
                raise DataError(f"the data dealer '{self.dealer_name}' is gone (its driver ended); rebuild the source "
                                f"with build_source(..., mode='ray')") from None
        return self._dealer

    # -- the contract -------------------------------------------------------------------------------------------
    def _to_torch(self, out):
        import torch

        if isinstance(out, tuple):
            return tuple(torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in out)
        return torch.from_numpy(np.asarray(out, dtype=np.int64))

    def step_windows(self, step: int, rank: int = 0, world_size: int = 1):
        import ray

        self.plan._check_rank(rank, world_size)
        return self._to_torch(ray.get(self._get_dealer().windows.remote(step, rank, world_size)))

    def iter_steps(self, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, Any]]:
        """Steps start..T-1 of this rank; keeps `prefetch_steps` requests in flight ahead of the consumer."""
        import collections

        import ray

        self.plan._check_rank(rank, world_size)
        dealer = self._get_dealer()
        T = self.plan.total_steps
        depth = max(1, self.plan.prefetch_steps)
        pending: collections.deque = collections.deque()
        nxt = start_step
        last = [-1]
        while nxt < T and len(pending) < depth + 1:
            pending.append((nxt, dealer.windows.remote(nxt, rank, world_size)))
            nxt += 1
        while pending:
            t, ref = pending.popleft()
            out = ray.get(ref)
            if nxt < T:
                pending.append((nxt, dealer.windows.remote(nxt, rank, world_size)))
                nxt += 1
            if rank == 0 and self._corpus_tokens:
                _log_epochs(self, t, last)
            yield t, self._to_torch(out)

    def val_windows(self):
        import torch

        w = torch.from_numpy(self._val.astype(np.int64))
        if self.doc_boundary == "mask":
            return w, torch.from_numpy(self._val_docs.astype(np.int64))
        return w

    def corpus_tokens(self) -> Optional[int]:
        """Tokens in one pass (known after the dealer's first full pass, or from the preflight)."""
        if self._corpus_tokens is None:
            import ray

            self._corpus_tokens = ray.get(self._get_dealer().info.remote())["corpus_tokens"]
        return self._corpus_tokens

    def epoch_at(self, step: int) -> float:
        """Epochs of the corpus read before `step`; counts whole epochs only until the corpus size is known."""
        n = self.corpus_tokens()
        o = self.plan.offset(step)
        if n:
            return o / n
        import ray

        return float(ray.get(self._get_dealer().info.remote())["epoch"])

    def info(self) -> dict:
        import ray

        return ray.get(self._get_dealer().info.remote())

    def close(self):
        import ray

        try:
            ray.kill(self._get_dealer())
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._dealer = None


def _position_after(d, entries, cap: int) -> Optional[tuple[int, int]]:
    """(file, record) of the record after the first `cap` records, or None when the corpus has fewer."""
    n = 0
    st = new_stats()
    import copy

    d2 = copy.copy(d)
    d2.on_bad_record = "skip"
    d2.max_documents = None
    for fi, e in enumerate(entries):
        for ri, _ in iter_file_records(e, d2, st, lambda m: None):
            if n == cap:
                return (fi, ri)
            n += 1
    return None


def _val_stream(d, tok, plan: StreamPlan, entries) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Held-out (L+1)-token windows (non-overlapping, stride L), read until enough or the corpus ends."""
    L = plan.seq_len
    need = plan.val_windows * L + 1
    if plan.val_windows <= 0 or (not d.val_source and d.val_fraction <= 0):
        z = np.zeros((0, L + 1), np.int64)
        return z, (z.copy() if d.doc_boundary == "mask" else None)
    flats, lens, buf, n = [], [], [], 0
    for _, text in iter_documents(d, "val", new_stats(), None if d.val_source else entries):
        buf.append(text)
        if len(buf) >= 64:
            f, ln = tok.encode_documents(buf)
            flats.append(f), lens.append(ln)
            n += len(f)
            buf = []
            if n >= need:
                break
    if buf:
        f, ln = tok.encode_documents(buf)
        flats.append(f), lens.append(ln)
    toks = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    docs = _doc_ids_from_lengths(np.concatenate(lens)) if lens else np.zeros(0, np.int32)
    k = 0 if len(toks) <= L else min(plan.val_windows, (len(toks) - 1) // L)
    w = cut_windows(toks.astype(np.int64), k, L, L + 1) if k else np.zeros((0, L + 1), np.int64)
    if d.doc_boundary != "mask":
        return w, None
    return w, (cut_windows(docs.astype(np.int64), k, L, L + 1) if k else np.zeros((0, L + 1), np.int64))
