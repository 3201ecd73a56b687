"""Files: expand a source spec (file, folder, glob, s3://, gs://, builtin:NAME) into an ordered list of inputs,
read their bytes, and fingerprint them (what a token store's id hashes, so a changed source is never mixed in).

Object storage goes through pyarrow filesystems; credentials and endpoints come from the usual AWS_* / GOOGLE_*
variables or `data.s3_endpoint`.
"""

from __future__ import annotations

import fnmatch
import glob as _glob
import gzip
import os
from dataclasses import dataclass

from pipeline.errors import DataError

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")


@dataclass(frozen=True)
class FileEntry:
    """One input file (or a builtin corpus) with its format."""

    uri: str
    fmt: str  # text | jsonl | parquet | builtin
    size: int = 0
    mtime: float = 0.0

    def key(self) -> str:
        if self.fmt == "builtin":
            from pipeline.data.corpus import builtin_key

            return builtin_key(self.uri.split(":", 1)[1])
        return f"{self.uri}:{self.size}:{int(self.mtime)}"

    @property
    def is_remote(self) -> bool:
        return "://" in self.uri


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
            from pipeline.data.corpus import builtin_path

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
