"""Prepare: read and tokenize the corpus once, writing the token store's shards and, last, its index.

Two drivers feed one writer, so their stores are byte-identical:
- Ray Data (`mode="ray"`, the default under `tst train` / `tst tune` / `tst data prepare`): read tasks (one per
  file) -> a tokenizer actor pool (`ActorPoolStrategy`, placed on CPU data nodes through `data.actor_resources`)
  -> ordered batches (`preserve_order`) into the writer on the driver. Tokenizing is the work; writing raw ids is
  cheap, so one ordered writer costs little and keeps shard boundaries deterministic.
- In-process (`mode="local"`): the same rows, tokenized in batches by the same function (`tokenize_rows`) in this
  process. For `--no-ray`, tests and the GPU machine.

Shards are cut deterministically: whenever the train or the held-out buffer reaches `data.shard_tokens` at a
document boundary, both buffers are written (empty ones skipped) and `progress.json` records the shards so far,
the statistics, and the last record consumed. A killed prepare resumes after that record and writes the same bytes
an uninterrupted one would have. Readers may follow the progress record while the writer goes on (streaming).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from pipeline.data import store as S
from pipeline.data.files import FORWARDED_ENV, FileEntry, list_files
from pipeline.data.records import ROW_TRAIN, ROW_VAL, _position_after, count_row, iter_rows, new_stats
from pipeline.errors import DataError

log = logging.getLogger("tst.data")

STREAM_BLOCK_BYTES = 1 << 20  # Ray Data block size target: a fine-grained stream, so the first shard comes early
THROTTLE_ENV = "TST_PREPARE_THROTTLE_S"  # tests and drills: seconds the writer sleeps after each commit


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing rows (the one tokenization loop: the Ray actor and the in-process prepare both call it)
# ---------------------------------------------------------------------------------------------------------------
def tokenize_rows(tok, kinds, texts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-row token counts incl. EOS, flat int32 ids of the documents with EOS, per-row has-NUL flags).

    Rows of kind train or val are documents; every other row (a skip) has 0 tokens."""
    live = [i for i, k in enumerate(kinds) if k in (ROW_TRAIN, ROW_VAL)]
    lengths = np.zeros(len(kinds), dtype=np.int64)
    nul = np.fromiter(("\x00" in t for t in texts), dtype=bool, count=len(texts))
    if not live:
        return lengths, np.zeros(0, np.int32), nul
    flat, n = tok.encode_documents([texts[i] for i in live])
    lengths[live] = n
    return lengths, flat, nul


# ---------------------------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Stream:
    shards: list = field(default_factory=list)
    tokens: int = 0
    documents: int = 0
    buf: list = field(default_factory=list)  # token arrays of whole documents
    buf_lens: list = field(default_factory=list)
    buf_tokens: int = 0

    def record(self) -> dict:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}


class ShardWriter:
    """Cuts the two streams into shards and commits them (see the module docstring)."""

    def __init__(self, storage: S.Storage, key: dict, dtype: str, shard_tokens: int, progress: Optional[dict] = None):
        self.storage, self.key, self.dtype, self.shard_tokens = storage, key, np.dtype(dtype).newbyteorder("<"), shard_tokens
        self.streams = {name: _Stream() for name in S.STREAMS}
        self.stats = new_stats()
        self.last = None  # (pass, file, record) of the last row consumed and committed
        self.throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)
        self.commits = 0
        if progress:
            for name in S.STREAMS:
                st = progress["streams"][name]
                self.streams[name] = _Stream(list(st["shards"]), st["tokens"], st["documents"])
            self.stats = progress["stats"]
            self.last = tuple(progress["last"]) if progress.get("last") else None

    def resume_start(self, pass_idx: int) -> Optional[tuple[int, int]]:
        """Where pass `pass_idx` starts reading: (0, 0), after the last committed record, or None (pass done)."""
        if self.last is None or self.last[0] < pass_idx:
            return (0, 0)
        if self.last[0] > pass_idx:
            return None
        _, fi, ri = self.last
        return (fi + 1, 0) if ri < 0 else (fi, ri + 1)

    def add(self, pass_idx: int, files, recs, kinds, bad_utf8, nul, lengths, flat: np.ndarray) -> None:
        """Consume a batch of rows in stream order (with their token counts and the batch's flat ids)."""
        ends = np.cumsum(lengths)
        for j in range(len(kinds)):
            kind = kinds[j]
            count_row(self.stats, kind, bad_utf8[j], bool(nul[j]))
            if kind not in (ROW_TRAIN, ROW_VAL):
                continue
            n = int(lengths[j])
            st = self.streams["train" if kind == ROW_TRAIN else "val"]
            st.buf.append(flat[int(ends[j]) - n:int(ends[j])])
            st.buf_lens.append(n)
            st.buf_tokens += n
            if st.buf_tokens >= self.shard_tokens:
                self.commit((pass_idx, int(files[j]), int(recs[j])))

    def commit(self, last: tuple) -> None:
        """Write both buffers as shards (empty ones skipped), then the progress record that lists them."""
        for name in S.STREAMS:
            st = self.streams[name]
            if not st.buf_tokens:
                continue
            toks = np.concatenate(st.buf).astype(self.dtype, copy=False)
            ends = np.cumsum(np.asarray(st.buf_lens, dtype=np.int64)).astype("<i8")
            sname = S.shard_name(name, len(st.shards))
            tb, db = toks.tobytes(), ends.tobytes()
            self.storage.write(sname + ".tok", tb)
            self.storage.write(sname + ".doc", db)
            st.shards.append({"name": sname, "tokens": int(len(toks)), "documents": int(len(ends)),
                              "first_token": st.tokens, "first_doc": st.documents,
                              "sha256": S.sha256(tb), "doc_sha256": S.sha256(db)})
            st.tokens += int(len(toks))
            st.documents += int(len(ends))
            st.buf, st.buf_lens, st.buf_tokens = [], [], 0
        self.last = last
        self.storage.write_json(S.PROGRESS, self._progress())
        self.commits += 1
        if self.throttle:
            time.sleep(self.throttle)

    def _progress(self) -> dict:
        return {"format": S.FORMAT, "version": S.VERSION, "key": self.key, "dtype": self.dtype.name,
                "streams": {n: self.streams[n].record() for n in S.STREAMS}, "stats": self.stats,
                "last": list(self.last) if self.last else None, "time": time.time()}

    def finish(self, extra: dict) -> dict:
        """Commit what is buffered, then the index (the store's commit), then drop the progress record."""
        if any(self.streams[n].buf_tokens for n in S.STREAMS):
            self.commit(self.last or (0, -1, -1))
        index = {"format": S.FORMAT, "version": S.VERSION, "key": self.key, "dtype": self.dtype.name,
                 "streams": {n: self.streams[n].record() for n in S.STREAMS}, "stats": self.stats, **extra}
        self.storage.write_json(S.INDEX, index)
        self.storage.delete(S.PROGRESS)
        return index


# ---------------------------------------------------------------------------------------------------------------
# Row batches: in-process and Ray Data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Pass:
    """One read over a list of files: pass 0 the source (hash split), pass 1 data.val_source (all held out)."""

    entries: list
    held_out: bool
    stop: Optional[tuple] = None


def _local_batches(p: _Pass, data_cfg, tok, start, batch_docs: int) -> Iterator[tuple]:
    rows = iter_rows(p.entries, data_cfg, held_out_pass=p.held_out, start=start, stop=p.stop)
    while True:
        chunk = [r for _, r in zip(range(batch_docs), rows)]
        if not chunk:
            return
        files, recs, kinds, texts, bad = zip(*chunk)
        lengths, flat, nul = tokenize_rows(tok, kinds, texts)
        yield files, recs, kinds, bad, nul, lengths, flat


SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _split_env() -> tuple[dict, dict]:
    """The driver's storage settings for the read tasks: (plain, secret). Plain ones (endpoint, region, profile)
    travel in the tasks' runtime_env; secret ones never do (a runtime_env is readable by anyone with the
    cluster's state API): they go through the object store and are set in the task's process only."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return ({k: v for k, v in env.items() if k not in SECRET_ENV}, {k: v for k, v in env.items() if k in SECRET_ENV})


def _read_task(batch: dict, data_cfg_dict: dict, held_out: bool, start, stop, batch_docs: int = 1024,
               secrets=None):
    """Ray Data read stage (one task per file): the rows of that file, in order, with their text."""
    from pipeline.config import DataConfig

    if secrets is not None:  # an ObjectRef of the driver's credentials (see _split_env)
        import ray

        os.environ.update(ray.get(secrets))

    data_cfg = DataConfig(**data_cfg_dict)
    for fi, uri, fmt, size, mtime in zip(batch["file_idx"], batch["uri"], batch["fmt"], batch["size"], batch["mtime"]):
        entry = FileEntry(str(uri), str(fmt), int(size), float(mtime))
        cols: dict = {"file": [], "rec": [], "kind": [], "text": [], "bad_utf8": []}
        for row in iter_rows([entry], data_cfg, held_out_pass=held_out, start=tuple(start), stop=stop,
                             first_index=int(fi)):
            for k, v in zip(cols, row):
                cols[k].append(v)
            if len(cols["file"]) >= batch_docs:
                yield _np_cols(cols)
                cols = {k: [] for k in cols}
        if cols["file"]:
            yield _np_cols(cols)


def _np_cols(cols: dict) -> dict:
    return {"file": np.asarray(cols["file"], dtype=np.int64), "rec": np.asarray(cols["rec"], dtype=np.int64),
            "kind": np.asarray(cols["kind"], dtype=object), "text": np.asarray(cols["text"], dtype=object),
            "bad_utf8": np.asarray(cols["bad_utf8"], dtype=np.int64)}


class _TokenizeActor:
    """Ray Data tokenize stage: a CPU actor holding the tokenizer (`tokenize_rows`, as in-process).

    It gets the tokenizer.json's text, not the driver's path to it: on a cluster the actor runs on a data node,
    where a file under the driver's output_dir (a trained or cached tokenizer) does not exist. (The fake nodes of
    tests/test_autoscale.py share one disk, so only reading the code shows this.)"""

    def __init__(self, tok_json: str, eos_token: Optional[str], threads: int):
        # Each actor owns `threads` CPUs: size the tokenizers (rayon) pool to it.
        os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
        os.environ["RAYON_RS_NUM_CPUS"] = str(max(1, threads))
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        import hashlib
        import tempfile

        from pipeline.data.tokenizer import TSTTokenizer

        path = os.path.join(tempfile.gettempdir(),
                            f"tst-tokenizer-{hashlib.sha256(tok_json.encode()).hexdigest()[:16]}.json")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(tok_json)
            os.replace(tmp, path)
        self.tok = TSTTokenizer(path, eos_token)

    def __call__(self, batch: dict):
        import pyarrow as pa

        kinds = [str(k) for k in batch["kind"]]
        lengths, flat, nul = tokenize_rows(self.tok, kinds, list(batch["text"]))
        offsets = np.zeros(len(kinds) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return pa.table({"file": pa.array(batch["file"]), "rec": pa.array(batch["rec"]),
                         "kind": pa.array(kinds, pa.string()), "bad_utf8": pa.array(batch["bad_utf8"]),
                         "nul": pa.array(nul), "ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))})


def _actor_restarts() -> dict:
    """On a one-node Ray, no restarts for the tokenizer actors: a dead one has nowhere else to go (an OOM kill
    would repeat) and a killed prepare resumes from its committed shards; Ray Data's default (max_restarts=-1,
    with its map function in the object store) also makes Ray core log an error-level line per actor
    (ray-project/ray#53727). On a cluster, Ray Data's default stays (a lost node's actors move)."""
    import ray

    return {"max_restarts": 0} if len([n for n in ray.nodes() if n.get("Alive")]) <= 1 else {}


def _ray_batches(p: _Pass, data_cfg, tok, start, batch_docs: int) -> Iterator[tuple]:
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = STREAM_BLOCK_BYTES
    items = [{"file_idx": i, "uri": e.uri, "fmt": e.fmt, "size": e.size, "mtime": e.mtime} for i, e in enumerate(p.entries)
             if i >= start[0] and (p.stop is None or i <= p.stop[0])]
    if not items:
        return
    res = dict(data_cfg.actor_resources or {}) or None
    env, secret = _split_env()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_task, batch_size=1, batch_format="numpy", num_cpus=data_cfg.read_cpus, resources=res,
                        fn_kwargs={"data_cfg_dict": dataclasses.asdict(data_cfg), "held_out": p.held_out,
                                   "start": list(start), "stop": p.stop, "batch_docs": batch_docs,
                                   "secrets": ray.put(secret) if secret else None},
                        runtime_env={"env_vars": env} if env else None)
    threads = max(1, int(round(data_cfg.tokenize_actor_cpus)))
    with warnings.catch_warnings():  # max_restarts has no named parameter yet: Ray Data 2.60's own advice
        # (actor_pool_map_operator: "map_batches(..., max_restarts=0) to disable") is the deprecated **ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        with open(tok.path) as f:
            tok_json = f.read()
        ds = ds.map_batches(_TokenizeActor, fn_constructor_args=(tok_json, tok.eos_token, threads),
                            batch_size=data_cfg.tokenize_batch_size, batch_format="numpy",
                            compute=ActorPoolStrategy(size=max(1, data_cfg.num_tokenize_actors)),
                            num_cpus=data_cfg.tokenize_actor_cpus, resources=res, **_actor_restarts())
    for tbl in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
        ids = tbl.column("ids").combine_chunks()
        flat = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        lengths = np.diff(np.asarray(ids.offsets))
        yield (np.asarray(tbl.column("file")), np.asarray(tbl.column("rec")), tbl.column("kind").to_pylist(),
               np.asarray(tbl.column("bad_utf8")), np.asarray(tbl.column("nul")), lengths, flat)


# ---------------------------------------------------------------------------------------------------------------
# Prepare one store (the caller holds its lock)
# ---------------------------------------------------------------------------------------------------------------
def run_prepare(storage: S.Storage, key: dict, data_cfg, tok, passes: list, mode: str,
                stop_event: Optional[threading.Event] = None) -> dict:
    """Write (or finish writing) the store at `storage`; returns its index."""
    if mode == "ray":
        import ray

        if not ray.is_initialized():
            raise DataError("data prepare in Ray mode needs a running Ray; call ray.init() (or prepare with --no-ray)")
    progress = storage.read_json(S.PROGRESS)
    if progress is not None and progress.get("key") != key:
        progress = None  # left by a different content under the same id: cannot happen unless the id scheme changed
    writer = ShardWriter(storage, key, S.token_dtype(tok.vocab_size), int(data_cfg.shard_tokens), progress)
    if progress:
        log.info("data: resuming the prepare of %s after %d committed shard(s)", storage.root,
                 len(writer.streams["train"].shards) + len(writer.streams["val"].shards))
    t0 = time.perf_counter()
    batches = _ray_batches if mode == "ray" else _local_batches
    for pi, p in enumerate(passes):
        start = writer.resume_start(pi)
        if start is None:
            continue
        for b in batches(p, data_cfg, tok, start, 1024 if mode == "ray" else max(64, data_cfg.tokenize_batch_size)):
            writer.add(pi, *b)
            if stop_event is not None and stop_event.is_set():
                return {}
        # a pass ends without a commit: what it buffered is committed later (or by `finish`); a prepare killed before
        # that resumes after the last committed record, in this pass, and rewrites the same bytes
    _check_unchanged(key, data_cfg, passes)
    index = writer.finish({"tokenizer": {"file": os.path.basename(tok.path), "sha256": key["tokenizer_sha256"],
                                         "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
                           "source": {"spec": data_cfg.source, "val_source": data_cfg.val_source,
                                      "files": [dataclasses.asdict(e) for e in passes[0].entries]}})
    log.info("data: prepared %s: %d train tokens in %d shard(s), %d held-out tokens (%.1fs, %s)", storage.root,
             index["streams"]["train"]["tokens"], len(index["streams"]["train"]["shards"]),
             index["streams"]["val"]["tokens"], time.perf_counter() - t0, mode)
    return index


def _check_unchanged(key: dict, data_cfg, passes: list) -> None:
    now = [e.key() for e in list_files(data_cfg.source, data_cfg)]
    if now != key["source"]:
        raise DataError(f"data.source '{data_cfg.source}' changed while it was being prepared; do not modify the corpus "
                        f"during a prepare, then run it again")
