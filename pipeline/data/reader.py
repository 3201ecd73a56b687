"""The reader: every rank maps its windows' stream offsets to (shard, offset) and reads them itself.

No actor, no coordinator: the data position is a pure function of the step (`StreamPlan`), the index says where
each stream offset lives, so any rank of any world size reads exactly its windows of any step in O(1) — a
resumed run reads no token it does not train on. Local stores are memory-mapped (the page cache is the only
buffer); object stores are read with ranged GETs of `data.read_block_mb` aligned blocks, a few kept per reader, so
sequential steps cost one request per block, not per window. A background thread prefetches the next
`data.prefetch_steps` steps. Memory grows with the number of shards (their index rows, a bounded set of open
maps), never with the number of documents.

While a store is still being written, a read past its committed frontier waits for the writer's next commit;
a writer whose heartbeat stops is an error, never an endless wait: after twice `data.writer_timeout_s`, since a
run's driver takes a dead writer's lease over after `data.writer_timeout_s` and resumes the prepare
(pipeline/data/source.py), and the readers must not give up before that.

The stream (docs/interfaces.md): the train documents with EOS, in corpus order, repeated for later epochs
(stream[i] = tokens[i % n]); with `data.doc_boundary = "mask"` every window comes with the ordinal of each token's
document (a later epoch's copy of a document gets a new ordinal). Imports only the standard library and PyTorch
(pyarrow for object storage), so the GPU check and any other torch-only process can read a store.
"""

from __future__ import annotations

import bisect
import collections
import logging
import mmap
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch

from pipeline.data import store as S
from pipeline.errors import DataError

log = logging.getLogger("tst.data")

_DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32}
_ITEMSIZE = {"uint16": 2, "uint32": 4}


class StoreMissing(DataError):
    pass


class TokenStore:
    """Read access to one store: the index (or, while it is written, the progress record) and its shards."""

    def __init__(self, uri: str, s3_endpoint: Optional[str] = None, verify: bool = True,
                 writer_timeout_s: float = 120.0, read_block_mb: float = 1.0, max_open: int = 64):
        self.uri = uri
        self.storage = S.Storage(uri, s3_endpoint)
        self.verify = verify
        self.writer_timeout_s = writer_timeout_s
        self.block = max(1 << 16, int(read_block_mb * (1 << 20)))
        self.max_open = max_open
        self.bytes_read = 0  # object storage: bytes and GET requests so far (bench/data.py reads these)
        self.requests = 0
        self._maps: collections.OrderedDict = collections.OrderedDict()  # shard -> (mmap, tensor view) local
        self._blocks: collections.OrderedDict = collections.OrderedDict()  # (shard, block) -> bytes remote
        self._docs: collections.OrderedDict = collections.OrderedDict()  # shard -> int64 document ends
        self._sized: set = set()
        # object stores: blocks kept. Each lane a rank reads streams through its own block, so the source raises
        # this to two per row of the rank (`keep_blocks`): a lane's next step is then served from memory.
        self.max_blocks = 8
        self._lock = threading.RLock()  # the prefetch thread and the trainer share maps and caches
        self.index: dict = {}
        self.complete = False
        self.refresh()

    def __getstate__(self):
        return {"uri": self.uri, "s3_endpoint": self.storage.s3_endpoint, "verify": self.verify,
                "writer_timeout_s": self.writer_timeout_s, "read_block_mb": self.block / (1 << 20),
                "max_open": self.max_open}

    def __setstate__(self, st):
        self.__init__(**st)

    # -- the index ------------------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Reload the index (complete) or the progress record (being written). Returns completeness."""
        idx = self.storage.read_json(S.INDEX)
        complete = idx is not None
        if idx is None:
            idx = self.storage.read_json(S.PROGRESS)
        if idx is None:
            if self.index:
                return self.complete  # between the last progress record and the index: keep what we know
            raise StoreMissing(f"no token store at {self.uri} (no {S.INDEX}); run `tst data prepare` with the run's "
                               f"config, or check data.store")
        if idx.get("format") != S.FORMAT or idx.get("version") != S.VERSION:
            raise DataError(f"{self.uri} is not a version-{S.VERSION} {S.FORMAT} (format {idx.get('format')!r}, "
                            f"version {idx.get('version')!r}); prepare it again with this version of tst")
        with self._lock:
            self.index, self.complete = idx, complete
            self.dtype = idx["dtype"]
            self._starts = {n: [sh["first_token"] for sh in idx["streams"][n]["shards"]] for n in S.STREAMS}
        return complete

    def tokens(self, stream: str) -> int:
        return int(self.index["streams"][stream]["tokens"])

    def documents(self, stream: str) -> int:
        return int(self.index["streams"][stream]["documents"])

    @property
    def stats(self) -> dict:
        return self.index.get("stats", {})

    def wait_for(self, stream: str, end: int) -> None:
        """Block until `end` tokens of `stream` are committed or the store is complete (streaming reads)."""
        last_progress = time.time()
        seen = self.tokens(stream)
        no_writer = 0  # consecutive polls that saw neither a lease nor an index (a takeover swaps the lease file)
        while not self.complete and self.tokens(stream) < end:
            time.sleep(0.2)
            if self.refresh() or self.tokens(stream) >= end:
                return
            if self.tokens(stream) > seen:
                seen, last_progress = self.tokens(stream), time.time()
            holder = self.storage.read_json(S.LOCK)
            beat = float(holder.get("heartbeat", 0)) if holder else 0.0
            if self.refresh():
                return
            stalled = time.time() - max(beat, last_progress)
            no_writer = no_writer + 1 if holder is None and self.storage.read_json(S.INDEX) is None else 0
            if no_writer >= 10:
                raise DataError(f"the token store {self.uri} is incomplete and no prepare is writing it (it stopped at "
                                f"{self.tokens(stream):,} {stream} tokens); run `tst data prepare` with the run's config "
                                f"(it resumes from the committed shards), then train again")
            if stalled > 2 * self.writer_timeout_s:
                raise DataError(f"the writer of token store {self.uri} stopped: no heartbeat for {stalled:.0f}s "
                                f"(data.writer_timeout_s={self.writer_timeout_s:g}); rerun `tst data prepare` to resume it")

    # -- shards ---------------------------------------------------------------------------------------------------
    def _shard(self, stream: str, i: int) -> dict:
        return self.index["streams"][stream]["shards"][i]

    def _check_size(self, sh: dict, name: str, size: Optional[int], want: int) -> None:
        if size != want:
            raise DataError(f"token store shard {self.storage.uri(name)} is {'missing' if size is None else f'{size} bytes'}, "
                            f"the index says {want}: the store is damaged; delete {self.uri} and prepare it again")

    def _local_view(self, sh: dict) -> torch.Tensor:
        name = sh["name"] + ".tok"
        v = self._maps.get(name)
        if v is not None:
            self._maps.move_to_end(name)
            return v[1]
        path = self.storage.path(name)
        want = sh["tokens"] * _ITEMSIZE[self.dtype]
        self._check_size(sh, name, self.storage.size(name), want)
        if self.verify and S.file_sha256(path) != sh["sha256"]:
            raise DataError(f"token store shard {path} fails its sha256 check (corrupted); delete {self.uri} and prepare "
                            f"it again")
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if want else None  # private map: lazy, no copy
        t = torch.frombuffer(mm, dtype=_DTYPES[self.dtype]) if want else torch.zeros(0, dtype=_DTYPES[self.dtype])
        self._maps[name] = (mm, t)
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return t

    def _remote_bytes(self, name: str, lo: int, hi: int) -> bytes:
        out = []
        b = lo // self.block
        while b * self.block < hi:
            key = (name, b)
            data = self._blocks.get(key)
            if data is None:
                data = self.storage.read(name, b * self.block, self.block)
                self.bytes_read += len(data)
                self.requests += 1
                self._blocks[key] = data
                while len(self._blocks) > self.max_blocks:
                    self._blocks.popitem(last=False)
            else:
                self._blocks.move_to_end(key)
            s0 = max(lo - b * self.block, 0)
            s1 = min(hi - b * self.block, len(data))
            out.append(data[s0:s1])
            b += 1
        return b"".join(out)

    def keep_blocks(self, n: int) -> None:
        self.max_blocks = max(self.max_blocks, int(n))

    def _shard_tokens(self, stream: str, i: int, lo: int, hi: int) -> torch.Tensor:
        sh = self._shard(stream, i)
        if not self.storage.remote:
            return self._local_view(sh)[lo:hi]
        isz = _ITEMSIZE[self.dtype]
        name = sh["name"] + ".tok"
        if name not in self._sized:  # size check once per shard (full checksums: `tst data prepare --verify`)
            self._check_size(sh, name, self.storage.size(name), sh["tokens"] * isz)
            self._sized.add(name)
        raw = self._remote_bytes(name, lo * isz, hi * isz)
        return torch.frombuffer(bytearray(raw), dtype=_DTYPES[self.dtype]) if raw else torch.zeros(0, dtype=_DTYPES[self.dtype])

    def _doc_ends(self, stream: str, i: int) -> torch.Tensor:
        sh = self._shard(stream, i)
        name = sh["name"] + ".doc"
        t = self._docs.get(name)
        if t is None:
            raw = self.storage.read(name)
            self._check_size(sh, name, len(raw), sh["documents"] * 8)
            if self.verify and S.sha256(raw) != sh["doc_sha256"]:
                raise DataError(f"token store file {self.storage.uri(name)} fails its sha256 check (corrupted); delete "
                                f"{self.uri} and prepare it again")
            t = torch.frombuffer(bytearray(raw), dtype=torch.int64) if raw else torch.zeros(0, dtype=torch.int64)
            self._docs[name] = t
            while len(self._docs) > self.max_open:
                self._docs.popitem(last=False)
        return t

    # -- reading the stream ---------------------------------------------------------------------------------------
    def _pieces(self, stream: str, a: int, b: int) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, shard, lo, hi) pieces of stream positions [a, b); epochs wrap once the store is complete."""
        if b > self.tokens(stream) and not self.complete:
            self.wait_for(stream, b)
        n = self.tokens(stream)
        if n == 0:
            raise DataError(f"the {stream} stream of token store {self.uri} is empty")
        starts = self._starts[stream]
        shards = self.index["streams"][stream]["shards"]
        pos = a
        while pos < b:
            e, p = divmod(pos, n) if self.complete else (0, pos)
            i = bisect.bisect_right(starts, p) - 1
            sh = shards[i]
            take = min(b - pos, sh["first_token"] + sh["tokens"] - p)
            lo = p - sh["first_token"]
            yield e, i, lo, lo + take
            pos += take

    def read(self, stream: str, a: int, b: int) -> torch.Tensor:
        """Tokens [a, b) of `stream` as int64 (a copy)."""
        with self._lock:
            parts = [self._shard_tokens(stream, i, lo, hi) for _, i, lo, hi in self._pieces(stream, a, b)]
        return parts[0].to(torch.int64) if len(parts) == 1 else torch.cat([p.to(torch.int64) for p in parts])

    def read_doc_ids(self, stream: str, a: int, b: int) -> torch.Tensor:
        """The document ordinal of each token in [a, b) (EOS belongs to the document it ends)."""
        out = []
        n_docs = self.documents(stream)
        with self._lock:
            for e, i, lo, hi in self._pieces(stream, a, b):
                ends = self._doc_ends(stream, i)
                pos = torch.arange(lo, hi, dtype=torch.int64)
                local = torch.searchsorted(ends, pos, right=True)
                out.append(local + self._shard(stream, i)["first_doc"] + e * n_docs)
        return out[0] if len(out) == 1 else torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# Helpers of the window source (pipeline/data/batch.py)
# ---------------------------------------------------------------------------------------------------------------
def cut_windows(seg: torch.Tensor, count: int, stride: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens, `stride` apart, from a contiguous segment (a contiguous copy)."""
    if count == 0:
        return seg.new_zeros((0, length))
    return seg[: (count - 1) * stride + length].unfold(0, length, stride).contiguous()


def prefetched(produce: Callable[[int], Any], steps: range, depth: int) -> Iterator[tuple[int, Any]]:
    """(t, produce(t)) for t in steps, computed `depth` steps ahead in a background thread."""
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
        th.join(timeout=30)  # no reader thread outlives its consumer (torch work at interpreter exit aborts)
