"""The token store on disk or object storage: layout, id, atomic commit, the preparer's lock, checksums.

A store is a folder (local path, `s3://bucket/prefix`, `gs://bucket/prefix`) named by its id:

    <data.store>/<id>/
      train-00000.tok   raw little-endian token ids of whole documents, each followed by EOS (uint16 when the
      train-00000.doc   vocabulary fits, else uint32); .doc: little-endian int64 end offsets of its documents
      val-00000.tok ... the held-out stream, the same way
      progress.json     while preparing: the shards committed so far and where the reader resumes (deleted at the end)
      lock.json         while preparing: who prepares, and a heartbeat (deleted at the end)
      index.json        the commit, written last: shards with tokens, documents and sha256, the tokenizer and its
                        hash, the source fingerprint, the split settings, skip counts, the format version

Commit is atomic on both kinds of storage: every file is written whole before it becomes visible (a temporary
name then `os.replace` locally; one object PUT on object storage, where there is no rename), shards before the
progress record that lists them, and the index last: a store without `index.json` is not complete, whatever else
is there. The id hashes everything that determines the content (source fingerprint, tokenizer hash, split and
sharding settings, format version), so every run and Tune trial on the same data shares one store and a changed
source gets a new one. Shards are a deterministic function of that content, so two preparers that both write
produce the same bytes: the lock only saves the second one the work.

Read with the standard library and PyTorch alone (`pipeline.data.reader`); pyarrow only for object storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from pipeline.errors import DataError

FORMAT = "tst-token-store"
VERSION = 1
INDEX, PROGRESS, LOCK = "index.json", "progress.json", "lock.json"
STREAMS = ("train", "val")


def is_remote(uri: str) -> bool:
    return "://" in uri


class Storage:
    """Whole-object writes, ranged reads and listing over a local folder or a pyarrow filesystem."""

    def __init__(self, root: str, s3_endpoint: Optional[str] = None):
        self.root = root.rstrip("/")
        self.remote = is_remote(root)
        self.s3_endpoint = s3_endpoint
        self._fs = None
        self._base = None
        if not self.remote:
            self.root = os.path.abspath(os.path.expanduser(self.root))

    def __getstate__(self):
        return {"root": self.root, "remote": self.remote, "s3_endpoint": self.s3_endpoint, "_fs": None, "_base": None}

    def __setstate__(self, st):
        self.__dict__.update(st)

    @property
    def fs(self):
        if self._fs is None:
            from types import SimpleNamespace

            from pipeline.data.files import _filesystem

            self._fs, self._base = _filesystem(self.root, SimpleNamespace(s3_endpoint=self.s3_endpoint))
        return self._fs

    def path(self, name: str) -> str:
        if self.remote:
            _ = self.fs
            return f"{self._base}/{name}"
        return os.path.join(self.root, name)

    def uri(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        if not self.remote:
            return os.path.exists(self.path(name))
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def size(self, name: str) -> Optional[int]:
        if not self.remote:
            try:
                return os.path.getsize(self.path(name))
            except OSError:
                return None
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(name))
        return int(info.size) if info.type == pafs.FileType.File else None

    def write(self, name: str, data: bytes) -> None:
        """Atomic whole write: readers see the old object or the new one, never a part."""
        if not self.remote:
            p = self.path(name)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            return
        with self.fs.open_output_stream(self.path(name)) as f:  # one PUT (multipart commits at close)
            f.write(data)

    def read(self, name: str, offset: int = 0, length: Optional[int] = None) -> bytes:
        if not self.remote:
            with open(self.path(name), "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        with self.fs.open_input_file(self.path(name)) as f:
            if length is None:
                f.seek(offset)
                return f.read()
            return f.read_at(length, offset)

    def read_json(self, name: str) -> Optional[dict]:
        try:
            return json.loads(self.read(name))
        except FileNotFoundError:
            return None
        except OSError as e:
            if self.remote and ("not found" in str(e).lower() or "NoSuchKey" in str(e)):
                return None
            raise
        except json.JSONDecodeError:
            return None

    def write_json(self, name: str, obj: dict) -> None:
        self.write(name, json.dumps(obj, indent=1, sort_keys=True).encode())

    def delete(self, name: str) -> None:
        try:
            if self.remote:
                self.fs.delete_file(self.path(name))
            else:
                os.remove(self.path(name))
        except (FileNotFoundError, OSError):
            pass

    def listdir(self) -> list[str]:
        if not self.remote:
            try:
                return sorted(os.listdir(self.root))
            except FileNotFoundError:
                return []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path("").rstrip("/"), allow_not_found=True))
        return sorted(os.path.basename(i.path) for i in infos)


def shard_name(stream: str, i: int) -> str:
    return f"{stream}-{i:05d}"


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def store_key(data_cfg, entries: list, val_entries: Optional[list], tokenizer_sha: str, vocab_size: int) -> dict:
    """Everything that determines a store's bytes (its id is a hash of this)."""
    return {
        "format": FORMAT, "version": VERSION,
        "source": [e.key() for e in entries],
        "val_source": [e.key() for e in val_entries] if val_entries is not None else None,
        "tokenizer_sha256": tokenizer_sha, "vocab_size": vocab_size,
        "split": split_settings(data_cfg),
        "shard_tokens": int(data_cfg.shard_tokens),
    }


def split_settings(data_cfg) -> dict:
    return {k: getattr(data_cfg, k) for k in ("format", "text_field", "text_split", "val_fraction", "split_seed",
                                               "max_documents", "on_bad_record")}


def store_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_store_root(data_cfg, output_dir: str) -> str:
    root = data_cfg.store or os.path.join(output_dir, "stores")
    return root if is_remote(root) else os.path.abspath(os.path.expanduser(root))


# ---------------------------------------------------------------------------------------------------------------
# The preparer's lock: one writer per store; the others wait and reuse
# ---------------------------------------------------------------------------------------------------------------
class PrepareLock:
    """A lease in `lock.json`: owner id, host, pid and a heartbeat the holder refreshes every few seconds.

    Locally the lease is taken with O_CREAT|O_EXCL (atomic); on object storage (no exclusive create through
    pyarrow) it is written, then read back after a settle delay: of two writers the last PUT wins and only its
    owner goes on. A lease whose heartbeat is older than `stale_s` belongs to a dead preparer and is taken over;
    the new holder resumes from the committed shards. Content is deterministic, so a double writer could only
    ever rewrite identical bytes.
    """

    HEARTBEAT_S = 2.0

    def __init__(self, storage: Storage, stale_s: float):
        self.storage = storage
        self.stale_s = stale_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None

    def _record(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def holder(self) -> Optional[dict]:
        return self.storage.read_json(LOCK)

    def is_stale(self, rec: Optional[dict]) -> bool:
        return rec is None or time.time() - float(rec.get("heartbeat", 0)) > self.stale_s

    def try_acquire(self) -> bool:
        st = self.storage
        if not st.remote:
            os.makedirs(st.root, exist_ok=True)
            p = st.path(LOCK)
            cur = st.read_json(LOCK)
            if cur is not None and self.is_stale(cur):
                # take over a dead preparer's lease: rename it away atomically, so only one taker succeeds
                try:
                    os.replace(p, f"{p}.{self.owner}.stale")
                    os.remove(f"{p}.{self.owner}.stale")
                except FileNotFoundError:
                    return False
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
        else:
            if not self.is_stale(self.holder()):
                return False
            st.write_json(LOCK, self._record())
            time.sleep(1.0)  # settle: a concurrent taker's PUT lands after ours or before our read
            cur = self.holder()
            if cur is None or cur.get("owner") != self.owner:
                return False
        self._start_heartbeat()
        return True

    def _start_heartbeat(self):
        def beat():
            while not self._stop.wait(self.HEARTBEAT_S):
                try:
                    self.storage.write_json(LOCK, self._record())
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="tst-store-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        cur = self.holder()
        if cur is not None and cur.get("owner") == self.owner:
            self.storage.delete(LOCK)
