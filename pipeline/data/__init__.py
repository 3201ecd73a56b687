"""The data path, laid out along the data's way: files -> records -> prepare -> store -> reader.

    files.py    list a source (file, folder, glob, s3://, gs://, builtin:NAME), read bytes, fingerprint inputs
    records.py  one file -> records -> rows (train / held out / skipped, with counts); the held-out hash split
    prepare.py  rows -> tokens (one tokenization loop) -> shards, by Ray Data or in-process, byte-identical
    store.py    the store's layout, id, atomic commit and preparer's lock, on local disk or object storage
    reader.py   TokenStore: read any range of a store by offset (mmap / ranged reads); prefetching
    plan.py     StreamPlan: the schedule facts of a step (phase, bag size, stride, raw tokens before it)
    lanes.py    what a batch is: lanes across the shuffled epoch, mixture rows (a pure function of the step)
    batch.py    StoreSource, the WindowSource: a rank's rows of any step, read from one or several stores
    source.py   a run's data: find or prepare its store, open a source over it (`build_source`), or over a
                store folder given as data.source (`store_folder_source`, torch only)

Tokenizing happens once per (source, tokenizer, split settings); every run, resume, retry and Tune trial on the
same data reads the same store. Names are re-exported lazily so that `pipeline.data.reader` (torch and the
standard library only) can be imported where numpy, pyarrow or Ray are absent.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "StreamPlan": "plan",
    "FileEntry": "files", "list_files": "files",
    "new_stats": "records", "merge_stats": "records", "iter_documents": "records", "iter_file_records": "records",
    "is_val_document": "records", "iter_rows": "records", "SKIP_REASONS": "records",
    "tokenize_rows": "prepare", "run_prepare": "prepare",
    "Storage": "store",
    "TokenStore": "reader", "cut_windows": "reader",
    "StoreSource": "batch", "Component": "batch",
    "EpochOrder": "lanes", "LaneSchedule": "lanes", "assign_rows": "lanes",
    "build_source": "source", "ensure_store": "source", "plan_store": "source",
    "source_configs": "source", "is_store_folder": "source", "store_folder_source": "source",
    "store_folder_info": "source",
}


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.data.{mod}"), name)


__all__ = sorted(_EXPORTS)
