"""A run's data: find (or prepare) the token store for its config, then open a window source over it.

`ensure_store` is what `tst data prepare`, `tst train` and `tst tune` call. It lists the inputs (a missing path
fails here, in a second, before anything slow), computes the store id, and then: reuses a complete store; else
takes the preparer's lock and prepares it (resuming from committed shards); else waits for whoever holds the
lock. With `wait="first"` (what `tst train` does) the prepare runs in a background thread of the driver and
training starts as soon as the first shard is committed, reading behind the writer. When another process is the
writer (a `tst data prepare`, another run), the run reads behind its frontier and a thread of the driver watches
the preparer's lease: if the writer dies (its heartbeat older than `data.writer_timeout_s`), the driver takes the
lease over and resumes the prepare from the committed shards, so the readers only wait (they give up after
twice that timeout, `pipeline/data/reader.py`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from pipeline.data import store as S
from pipeline.data.files import list_files
from pipeline.data.plan import StreamPlan
from pipeline.errors import DataError

log = logging.getLogger("tst.data")


@dataclass
class Prepared:
    """A store that exists or is being written by this process (`thread`) or another one."""

    uri: str
    id: str
    key: dict
    prepared_here: bool = False
    seconds: float = 0.0
    thread: Optional[threading.Thread] = None
    stop: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    lock: Optional[S.PrepareLock] = None

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error

    def detach(self) -> None:
        """Stop a background prepare at its next batch (what is committed stays; a later prepare resumes)."""
        if self.thread is not None and self.thread.is_alive():
            self.stop.set()
            self.thread.join(timeout=60)


def plan_store(data_cfg, tok, output_dir: str):
    """(storage, key, passes) of the store for this data config and tokenizer; lists the inputs (fast errors)."""
    from pipeline.data.prepare import _Pass
    from pipeline.data.records import _position_after

    if int(data_cfg.shard_tokens) < 1:
        raise DataError(f"data.shard_tokens must be >= 1, got {data_cfg.shard_tokens}")
    entries = list_files(data_cfg.source, data_cfg)
    val_entries = list_files(data_cfg.val_source, data_cfg) if data_cfg.val_source else None
    key = S.store_key(data_cfg, entries, val_entries, S.file_sha256(tok.path), tok.vocab_size)
    sid = S.store_id(key)
    storage = S.Storage(f"{S.default_store_root(data_cfg, output_dir)}/{sid}", data_cfg.s3_endpoint)
    stop = _position_after(data_cfg, entries, data_cfg.max_documents) if data_cfg.max_documents is not None else None
    passes = [_Pass(entries, False, stop)] + ([_Pass(val_entries, True)] if val_entries else [])
    return storage, key, passes


def ensure_store(data_cfg, tok, output_dir: str = "outputs", mode: str = "local", wait: str = "complete",
                 console: bool = False) -> Prepared:
    """The store for (source, tokenizer, split settings), prepared if needed (see the module docstring)."""
    if mode not in ("local", "ray"):
        raise DataError(f"data prepare mode {mode!r} is not 'local' or 'ray'")
    storage, key, passes = plan_store(data_cfg, tok, output_dir)
    sid = S.store_id(key)
    prep = Prepared(storage.uri(), sid, key)
    lock = S.PrepareLock(storage, stale_s=data_cfg.writer_timeout_s)
    waiting_said = False
    while True:
        idx = storage.read_json(S.INDEX)
        if idx is not None:
            if idx.get("key") != key:
                raise DataError(f"the token store {storage.uri()} holds other data than this config describes; delete it "
                                f"and prepare again")
            return prep
        if lock.try_acquire():
            break
        progress = storage.read_json(S.PROGRESS)
        if wait == "first" and progress and progress["streams"]["train"]["shards"]:
            # someone else is writing it: read behind their frontier, and take over if that writer dies
            prep.thread = threading.Thread(target=_take_over_if_writer_dies, name="tst-data-takeover", daemon=True,
                                           args=(prep, storage, key, data_cfg, tok, passes, mode, lock, console))
            prep.thread.start()
            return prep
        if not waiting_said:
            h = lock.holder() or {}
            msg = (f"data: waiting for the prepare of {storage.uri()} by {h.get('host', '?')} pid {h.get('pid', '?')} "
                   f"(it will be reused)")
            log.info(msg)
            if console:
                print(f"[tst] {msg[6:]}", flush=True)
            waiting_said = True
        time.sleep(0.5)

    prep.prepared_here, prep.lock = True, lock
    if console:
        print(f"[tst] data: tokenizing {data_cfg.source} once into the token store {storage.uri()} ({mode})", flush=True)

    def work():
        _prepare_holding(prep, storage, key, data_cfg, tok, passes, mode, lock, log_errors=wait == "first")

    if wait == "complete":
        work()
        if prep.error is not None:
            raise prep.error
        return prep
    prep.thread = threading.Thread(target=work, name="tst-data-prepare", daemon=True)
    prep.thread.start()
    while prep.thread.is_alive():
        progress = storage.read_json(S.PROGRESS)
        if progress and progress["streams"]["train"]["shards"]:
            break
        prep.thread.join(0.2)
    if prep.error is not None:
        raise prep.error
    return prep


def _prepare_holding(prep: Prepared, storage, key, data_cfg, tok, passes, mode: str, lock: S.PrepareLock,
                     log_errors: bool) -> None:
    """Run the prepare while holding `lock` (resuming after its committed shards); errors go to `prep.error`."""
    from pipeline.data.prepare import run_prepare

    t0 = time.perf_counter()
    try:
        run_prepare(storage, key, data_cfg, tok, passes, mode, stop_event=prep.stop)
    except BaseException as e:  # noqa: BLE001 - handed to the caller (join) and logged
        prep.error = e
        if log_errors:
            log.error("data: the prepare of %s failed: %s", storage.uri(), e)
    finally:
        prep.seconds = time.perf_counter() - t0
        lock.release()


def _take_over_if_writer_dies(prep: Prepared, storage, key, data_cfg, tok, passes, mode: str, lock: S.PrepareLock,
                              console: bool) -> None:
    """While another process writes the store this run reads behind: once its lease is stale (the writer was
    killed, its node lost), take the lease and finish the prepare here, from the committed shards. Ends when the
    store is complete or the run closes its source (`prep.stop`)."""
    while not prep.stop.is_set():
        if storage.read_json(S.INDEX) is not None:
            return
        holder = lock.holder()
        if lock.try_acquire():
            if storage.read_json(S.INDEX) is not None:  # the writer finished between our two reads
                lock.release()
                return
            h = holder or {}
            age = time.time() - float(h.get("heartbeat", 0)) if holder else None
            msg = (f"data: the prepare of {storage.uri()} by {h.get('host', '?')} pid {h.get('pid', '?')} stopped"
                   + (f" (no heartbeat for {age:.0f}s)" if age is not None else "")
                   + "; resuming it here from its committed shards")
            log.warning(msg)
            if console:
                print(f"[tst] {msg[6:]}", flush=True)
            prep.prepared_here, prep.lock = True, lock
            _prepare_holding(prep, storage, key, data_cfg, tok, passes, mode, lock, log_errors=True)
            return
        prep.stop.wait(0.5)


def check_corpus(stats: dict, n_tokens: int, plan: StreamPlan, source: str) -> None:
    if stats["documents"] == 0:
        sk = ", ".join(f"{k}={v}" for k, v in stats["skipped"].items() if v)
        raise DataError(f"corpus '{source}' has no training documents ({stats['records']} records read"
                        f"{'; skipped: ' + sk if sk else ''}); point data.source at non-empty text")
    if n_tokens < plan.max_window_len():
        raise DataError(
            f"corpus '{source}' has {n_tokens} training tokens, fewer than one window ({plan.max_window_len()} = s*L+s); "
            f"add data or lower data.seq_len / data.bag_size"
        )


SOURCE_KEYS = ("source", "weight", "format", "text_field", "text_split", "val_source", "val_fraction", "split_seed",
               "max_documents", "on_bad_record")


def source_configs(d) -> list[tuple[str, object, float]]:
    """(name, data config, weight) of each store a run reads: `data.sources` (a mixture), else `data.source`."""
    import dataclasses

    if not d.sources:
        return [("main", d, 1.0)]
    out = []
    for name, spec in d.sources.items():
        if isinstance(spec, str):
            spec = {"source": spec}
        if not isinstance(spec, dict) or "source" not in spec:
            raise DataError(f"data.sources.{name} needs a 'source' (and a 'weight'), e.g. "
                            f"data.sources={{web: {{source: s3://b/web/, weight: 0.7}}, ...}}")
        bad = sorted(set(spec) - set(SOURCE_KEYS))
        if bad:
            raise DataError(f"data.sources.{name}: unknown key '{bad[0]}'; a source may set {', '.join(SOURCE_KEYS)}")
        weight = float(spec.get("weight", 1.0))
        if not weight > 0:
            raise DataError(f"data.sources.{name}.weight must be > 0, got {spec.get('weight')!r}")
        over = {k: v for k, v in spec.items() if k != "weight"}
        out.append((str(name), dataclasses.replace(d, sources={}, **over), weight))
    return out


def is_store_folder(path) -> bool:
    """Whether `path` (a data.source) is a prepared token store folder on local disk (`tst data prepare` wrote its
    index.json), rather than text to tokenize."""
    if not isinstance(path, str) or S.is_remote(path) or not os.path.isfile(os.path.join(path, S.INDEX)):
        return False
    try:
        with open(os.path.join(path, S.INDEX)) as f:
            return json.load(f).get("format") == S.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class StoreVocabulary:
    """What a run needs of the tokenizer when data.source is a store folder: the ids, from the store's index. The
    tokenizer file is not needed to train (nor kept in the store: checkpoints of such a run have no tokenizer.json)."""

    vocab_size: int
    eos_id: int
    sha256: str
    path: Optional[str] = None


def store_folder_info(path: str) -> dict:
    """The facts a report records of a complete store folder, from its index (torch and the standard library)."""
    from pipeline.data.reader import TokenStore

    st = TokenStore(path)
    if not st.complete:
        raise DataError(f"{path} is a token store still being written; finish `tst data prepare` first")
    idx = st.index
    return {"format": idx["format"], "version": idx["version"], "store": os.path.basename(os.path.normpath(path)),
            "dtype": idx["dtype"], "vocab_size": int(idx["tokenizer"]["vocab_size"]),
            "eos_id": int(idx["tokenizer"]["eos_id"]), "tokenizer_sha256": idx["tokenizer"]["sha256"],
            "source": idx["source"]["spec"], "train_tokens": st.tokens("train"), "val_tokens": st.tokens("val"),
            "train_documents": st.documents("train"), "val_documents": st.documents("val")}


def store_folder_source(cfg, path: str) -> tuple[StoreVocabulary, StoreSource]:
    """A run's window source over a complete store folder given as data.source: no tokenizer, no prepare, only
    PyTorch and the standard library (what a GPU machine without the data stack runs). The layout, shuffle and
    seed are the config's, exactly as `build_source` sets them for a store it found or prepared itself."""
    from pipeline.data.batch import StoreSource
    from pipeline.data.lanes import check_layout

    d = cfg.data
    if d.sources:
        raise DataError("data.sources (a mixture) cannot name a store folder as data.source; list text sources")
    if d.doc_boundary not in ("cross", "mask"):
        raise DataError(f"data.doc_boundary must be 'cross' or 'mask', got {d.doc_boundary!r}")
    check_layout(d.batch_layout)
    plan = StreamPlan.from_config(cfg)
    plan._check_rank(0, max(1, cfg.scaling.num_workers))
    info = store_folder_info(path)
    idx = S.Storage(path).read_json(S.INDEX)
    src = StoreSource(path, plan, d.doc_boundary, layout=d.batch_layout, shuffle=d.shuffle,
                      chunk_tokens=d.shuffle_chunk_tokens,
                      seed=d.shuffle_seed if d.shuffle_seed is not None else cfg.train.seed,
                      store_id=S.store_id(idx["key"]) if idx.get("key") else None, verify=d.verify_checksums,
                      writer_timeout_s=d.writer_timeout_s, read_block_mb=d.read_block_mb)
    check_corpus(src.store.stats, src.store.tokens("train"), plan, path)
    _log_plan(src, plan, d)
    return StoreVocabulary(info["vocab_size"], info["eos_id"], info["tokenizer_sha256"]), src


def build_source(cfg, output_dir: str = "outputs", mode: str = "local", tokenizer=None, wait: str = "complete",
                 console: bool = False) -> StoreSource:
    """The window source of a run: its token store(s) (prepared once, shared by every run on the same data) read
    by offset, as lanes of the shuffled epoch (pipeline/data/lanes.py). mode: how a missing store is prepared
    ("ray": a Ray Data job, needs ray.init(); "local": in-process; "memory" is accepted as "local"). wait:
    "complete", or "first" to return once the first shard is committed -- honoured only where the layout can
    read behind the writer (data.batch_layout=stream with data.shuffle=false); lanes and shuffling need the
    whole epoch, so they wait for the complete store. Input errors (missing path, empty corpus, corpus smaller
    than a window) raise DataError here, on the driver, before any worker starts.
    """
    from pipeline.data.lanes import check_layout

    if not cfg.data.sources and is_store_folder(cfg.data.source):
        return store_folder_source(cfg, cfg.data.source)[1]
    plan = StreamPlan.from_config(cfg)
    d = cfg.data
    if d.doc_boundary not in ("cross", "mask"):
        raise DataError(f"data.doc_boundary must be 'cross' or 'mask', got {d.doc_boundary!r}")
    check_layout(d.batch_layout)
    plan._check_rank(0, max(1, cfg.scaling.num_workers))
    parts = source_configs(d)
    if d.batch_layout == "stream" and len(parts) > 1:
        raise DataError("data.sources (a mixture) needs data.batch_layout=lanes")
    from pipeline.data.batch import Component, StoreSource  # torch: imported when a run needs it, not to check inputs
    from pipeline.data.tokenizer import load_tokenizer

    tok = tokenizer or load_tokenizer(d, output_dir)
    streaming_ok = d.batch_layout == "stream" and not d.shuffle
    preps = [ensure_store(dc, tok, output_dir, "local" if mode == "memory" else mode,
                          wait=wait if streaming_ok else "complete", console=console) for _, dc, _ in parts]
    comps = [Component(name, p.uri, w, p.id) for (name, _, w), p in zip(parts, preps)]
    src = StoreSource(None, plan, d.doc_boundary, components=comps, layout=d.batch_layout, shuffle=d.shuffle,
                      chunk_tokens=d.shuffle_chunk_tokens,
                      seed=d.shuffle_seed if d.shuffle_seed is not None else cfg.train.seed,
                      s3_endpoint=d.s3_endpoint, tokenizer_path=tok.path, verify=d.verify_checksums,
                      writer_timeout_s=d.writer_timeout_s, read_block_mb=d.read_block_mb)
    src._prepare = preps
    if all(st.complete for st in src.stores):
        for (name, dc, _), st in zip(parts, src.stores):
            check_corpus(st.stats, st.tokens("train"), plan, dc.source)
        _log_plan(src, plan, d)
    else:
        log.info("data: training starts while %s is still being written (%d train tokens committed so far)",
                 src.uri, src.store.tokens("train"))
    return src


def _log_plan(src: StoreSource, plan: StreamPlan, d) -> None:
    n = src.corpus_tokens
    epochs = src.epoch_at(plan.total_steps) if plan.total_steps else 0.0
    log.info("data: %d train tokens, run reads %d tokens = %.2f epoch(s) (%s layout%s)", n, plan.tokens_needed(),
             epochs, d.batch_layout, ", shuffled" if d.shuffle else "")
    if d.max_epochs is not None and epochs > d.max_epochs:
        raise DataError(
            f"the run reads {epochs:.2f} epochs of a {n}-token corpus, more than data.max_epochs={d.max_epochs}; "
            f"add data, lower train.steps, or raise data.max_epochs"
        )
    if epochs > 1:
        log.warning("data: the run makes %.2f passes over the corpus (TST reads s times more data per step)", epochs)
