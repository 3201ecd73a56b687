"""Records: one input file -> (record index, text) in order, and the corpus -> the documents of one split.

Bad input is counted, never silent: invalid UTF-8 is decoded with U+FFFD (`invalid_utf8`); empty documents are
skipped (`empty`); a malformed JSON line (`malformed_json`), a JSON record without the text field
(`missing_field`) or an unreadable Parquet file (`unreadable_file`) is logged with its path and line and skipped
when `data.on_bad_record = "skip"` (the default), or raises DataError when "fail". Documents holding NUL characters
are kept and counted (`nul_documents`). The held-out split is a seeded hash of (file index, record index), so a
document's split does not depend on what else is in the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Callable, Iterator, Optional

from pipeline.data.files import FileEntry, _filesystem, _read_bytes, list_files
from pipeline.errors import DataError

log = logging.getLogger("tst.data")

SKIP_REASONS = ("empty", "malformed_json", "missing_field", "unreadable_file")
_MAX_WARNINGS = 10


COUNTERS = ("records", "documents", "val_documents", "invalid_utf8", "nul_documents")


def new_stats() -> dict:
    """What reading the corpus found: records read, documents per split, and bad input by kind."""
    return {**{k: 0 for k in COUNTERS}, "skipped": {r: 0 for r in SKIP_REASONS}}


def merge_stats(a: dict, b: dict) -> dict:
    out = new_stats()
    for k in COUNTERS:
        out[k] = a.get(k, 0) + b.get(k, 0)
    for r in SKIP_REASONS:
        out["skipped"][r] = a["skipped"].get(r, 0) + b["skipped"].get(r, 0)
    return out


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
        from pipeline.data.corpus import builtin_documents

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


# ---------------------------------------------------------------------------------------------------------------
# Rows: the one record loop that both prepares (Ray Data read tasks and the in-process prepare) run
# ---------------------------------------------------------------------------------------------------------------
ROW_TRAIN, ROW_VAL = "", "val"  # row kinds besides the skip reasons


def iter_rows(entries: list, data_cfg, *, held_out_pass: bool = False, start: tuple[int, int] = (0, 0),
              stop: Optional[tuple[int, int]] = None, warn: Optional[Callable] = None, first_index: int = 0
              ) -> Iterator[tuple[int, int, str, str, int]]:
    """(file index, record index, kind, text, invalid-UTF-8 count) for every record of `entries`, in order.

    kind: "" (a training document), "val" (held out: the hashed fraction, or every document of the val_source
    pass when `held_out_pass`), or the skip reason ("empty", "malformed_json", "missing_field",
    "unreadable_file"; text ""). An unreadable file yields one row with record index -1. `start` skips records
    before that (file, record) position (a resumed prepare); `stop` ends before it (the data.max_documents cap).
    `first_index` is the corpus-wide index of entries[0] (a Ray read task gets one file; the split hash needs the
    file's index in the whole corpus).
    Every record yields a row, so whoever consumes the rows counts the same statistics from them alone.
    """
    warn = warn or _Warner()
    for fi, entry in enumerate(entries, first_index):
        if fi < start[0] or (stop is not None and fi > stop[0]):
            continue
        stats = new_stats()
        prev_utf8 = 0
        prev_bad = dict(stats["skipped"])
        for ri, text in iter_file_records(entry, data_cfg, stats, warn):
            if stop is not None and (fi, ri) >= tuple(stop):
                return
            if (fi, ri) < tuple(start):
                prev_utf8, prev_bad = stats["invalid_utf8"], dict(stats["skipped"])
                continue
            if text is None:  # a bad record: its reason is the counter that just moved
                kind = next((r for r in SKIP_REASONS if stats["skipped"][r] > prev_bad[r]), "malformed_json")
                text = ""
            elif not text.strip():
                kind, text = "empty", ""
            elif held_out_pass or is_val_document(fi, ri, data_cfg):
                kind = ROW_VAL
            else:
                kind = ROW_TRAIN
            yield fi, ri, kind, text, stats["invalid_utf8"] - prev_utf8
            prev_utf8, prev_bad = stats["invalid_utf8"], dict(stats["skipped"])
        if stats["skipped"]["unreadable_file"] > prev_bad["unreadable_file"]:
            yield fi, -1, "unreadable_file", "", 0


def count_row(stats: dict, kind: str, bad_utf8: int, has_nul: bool, held_out_pass: bool = False) -> None:
    """Add one row to the statistics (the same arithmetic for every prepare, so their counts agree)."""
    if kind != "unreadable_file":
        stats["records"] += 1
    if kind == ROW_TRAIN:
        stats["documents"] += 1
    elif kind == ROW_VAL:
        stats["val_documents"] += 1
    else:
        stats["skipped"][kind] += 1
    stats["invalid_utf8"] += int(bad_utf8)
    stats["nul_documents"] += int(has_nul)
