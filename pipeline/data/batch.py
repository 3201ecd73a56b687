"""The window source of a run (docs/interfaces.md's WindowSource): the rows of each step's global batch, read
from one or several token stores by offset, laid out as lanes across the shuffled epoch (pipeline/data/lanes.py).

Layouts (`data.batch_layout`):
- "lanes" (default): row b of every step reads its own lane of the (shuffled) epoch; a mixture of stores gives
  each store its share of the rows. Needs each store's size, so training waits for complete stores.
- "stream": the B windows of a step are consecutive windows of one stream at offset raw_tokens_before(t) (the
  contract before lanes; with `data.shuffle=false` the only layout that can train behind a store that is still
  being written). One store only.

Picklable (strings, numbers and the plan), so it rides inside `train_loop_config`; each process opens the stores
itself. Imports only the standard library and PyTorch.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from pipeline.data.lanes import EpochOrder, LaneSchedule, assign_rows, check_layout
from pipeline.data.plan import StreamPlan
from pipeline.data.reader import TokenStore, cut_windows, prefetched
from pipeline.errors import DataError

log = logging.getLogger("tst.data")


@dataclass(frozen=True)
class Component:
    """One store of the mixture (a run on one corpus has one, named "main", of weight 1)."""

    name: str
    uri: str
    weight: float = 1.0
    store_id: Optional[str] = None


class StoreSource:
    """Windows of a run: step t, rank w of W -> this rank's rows of the global batch (see the module docstring)."""

    def __init__(self, uri, plan: StreamPlan, doc_boundary: str = "cross", *, components: Optional[list] = None,
                 layout: str = "lanes", shuffle: bool = True, chunk_tokens: int = 65536, seed: int = 0,
                 s3_endpoint: Optional[str] = None, tokenizer_path: Optional[str] = None,
                 store_id: Optional[str] = None, verify: bool = True, writer_timeout_s: float = 120.0,
                 read_block_mb: float = 1.0):
        check_layout(layout)
        self.components = list(components) if components else [
            Component("main", uri, 1.0, store_id or os.path.basename(str(uri).rstrip("/")))]
        if layout == "stream" and len(self.components) > 1:
            raise DataError("data.sources (a mixture) needs data.batch_layout=lanes")
        self.uri = self.components[0].uri
        self.store_id = "+".join(c.store_id or os.path.basename(c.uri.rstrip("/")) for c in self.components)
        self.plan, self.doc_boundary, self.layout = plan, doc_boundary, layout
        self.shuffle, self.chunk_tokens, self.seed = bool(shuffle), int(chunk_tokens), int(seed)
        self.tokenizer_path = tokenizer_path
        self._opts = {"s3_endpoint": s3_endpoint, "verify": verify, "writer_timeout_s": writer_timeout_s,
                      "read_block_mb": read_block_mb}
        self._reset()

    def _reset(self):
        self._stores: Optional[list] = None
        self._layout_ready = False
        self._orders: collections.OrderedDict = collections.OrderedDict()
        self._last_epoch = -1

    def __getstate__(self):
        st = dict(self.__dict__)
        for k in ("_stores", "_orders", "_layout_ready", "_rows", "_lane_of_row", "_sched", "_lanes"):
            st.pop(k, None)
        st.pop("_prepare", None)
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._reset()

    # -- stores and layout ----------------------------------------------------------------------------------------
    @property
    def stores(self) -> list:
        if self._stores is None:
            self._stores = [TokenStore(c.uri, **self._opts) for c in self.components]
        return self._stores

    @property
    def store(self) -> TokenStore:
        return self.stores[0]

    @property
    def uris(self) -> list[str]:
        return [c.uri for c in self.components]

    @property
    def needs_complete_store(self) -> bool:
        """Lanes and shuffling need each store's size; only stream order can train behind the writer."""
        return self.layout == "lanes" or self.shuffle

    def _ensure_layout(self) -> None:
        if self._layout_ready:
            return
        if self.needs_complete_store:
            for st in self.stores:
                st.wait_for("train", float("inf"))
        B = self.plan.global_batch_size
        if self.layout == "lanes":
            self._rows = assign_rows([c.weight for c in self.components], B)
            self._lane_of_row, seen = [], collections.Counter()
            for i in self._rows:
                self._lane_of_row.append(seen[i])
                seen[i] += 1
            self._lanes = [seen[i] for i in range(len(self.components))]
            self._sched = [LaneSchedule.build(self.plan, st.tokens("train") // n,
                                              f"source {c.name}: " if len(self.components) > 1 else "")
                           for c, st, n in zip(self.components, self.stores, self._lanes)]
        self._layout_ready = True

    def _order(self, i: int, epoch: int) -> EpochOrder:
        key = (i, epoch)
        o = self._orders.get(key)
        if o is None:
            o = EpochOrder(self.stores[i].tokens("train"), self.chunk_tokens, self.seed, epoch,
                           self.components[i].name if len(self.components) > 1 else "", self.shuffle)
            self._orders[key] = o
            while len(self._orders) > 4 * len(self.components):
                self._orders.popitem(last=False)
        else:
            self._orders.move_to_end(key)
        return o

    # -- reading ----------------------------------------------------------------------------------------------------
    @property
    def mask(self) -> bool:
        return self.doc_boundary == "mask"

    def _read(self, i: int, epoch: int, pieces: list[tuple[int, int]]):
        st = self.stores[i]
        toks = [st.read("train", a, b) for a, b in pieces]
        t = toks[0] if len(toks) == 1 else torch.cat(toks)
        if not self.mask:
            return t, None
        base = epoch * st.documents("train")
        docs = [st.read_doc_ids("train", a, b) + base for a, b in pieces]
        return t, (docs[0] if len(docs) == 1 else torch.cat(docs))

    def row_pieces(self, step: int, row: int) -> tuple[int, int, list[tuple[int, int]]]:
        """(component, epoch, stored-stream ranges) of row `row`'s window at `step` (lanes layout)."""
        self._ensure_layout()
        i, j = self._rows[row], self._lane_of_row[row]
        s = self.plan.bag_size_at(step)
        sched = self._sched[i]
        e, q = sched.at(step)
        return i, e, self._order(i, e).pieces(j * sched.lane_len + q, s * self.plan.seq_len + s)

    def _stream_pieces(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """(epoch, start, end) ranges of the stored stream that stream positions [a, b) read (stream layout)."""
        st = self.store
        if not self.needs_complete_store:  # file order, possibly behind the writer: the reader wraps epochs
            return [(-1, a, b)]
        n = st.tokens("train")
        out, pos = [], a
        while pos < b:
            e, p = divmod(pos, n)
            take = min(b - pos, n - p)
            out += [(e, x, y) for x, y in self._order(0, e).pieces(p, take)]
            pos += take
        return out

    def step_windows(self, step: int, rank: int = 0, world_size: int = 1):
        """This rank's rows of `step` (plan.rank_rows): (hi - lo, s_t*L + s_t) int64 (and doc ids in mask mode)."""
        self.plan._check_rank(rank, world_size)
        self._ensure_layout()
        s = self.plan.bag_size_at(step)
        length = s * self.plan.seq_len + s
        if self.layout == "stream":
            a, count, stride = self.plan.rank_span(step, rank, world_size)
            end = a + (count - 1) * stride + length
            st = self.store
            if not self.needs_complete_store and not st.complete:
                # behind the writer, every rank waits for the whole step's span, not only for its own rows: so all
                # ranks wait here together, instead of those whose rows are committed waiting in the step's first
                # collective (and timing out after scaling.collective_timeout_s, a restart) while one rank waits
                st.wait_for("train", self.plan.step_span(step)[1])
            parts, dparts = [], []
            for e, x, y in self._stream_pieces(a, end):
                if e < 0:  # unshuffled: the reader maps stream positions (and their epochs) itself
                    parts.append(st.read("train", x, y))
                    if self.mask:
                        dparts.append(st.read_doc_ids("train", x, y))
                else:
                    t, d = self._read(0, e, [(x, y)])
                    parts.append(t)
                    dparts.append(d)
            seg = parts[0] if len(parts) == 1 else torch.cat(parts)
            w = cut_windows(seg, count, stride, length)
            if not self.mask:
                return w
            dseg = dparts[0] if len(dparts) == 1 else torch.cat(dparts)
            return w, cut_windows(dseg, count, stride, length)
        lo, hi = self.plan.rank_rows(rank, world_size)
        for st in self.stores:
            st.keep_blocks(2 * (hi - lo) + 2)  # one read-ahead block per lane of this rank (object stores)
        rows, drows = [], []
        for b in range(lo, hi):
            i, e, pieces = self.row_pieces(step, b)
            t, d = self._read(i, e, pieces)
            rows.append(t)
            drows.append(d)
        w = torch.stack(rows) if rows else torch.zeros(0, length, dtype=torch.int64)
        if not self.mask:
            return w
        return w, (torch.stack(drows) if drows else w.clone())

    def iter_steps(self, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, Any]]:
        self.plan._check_rank(rank, world_size)
        for t, w in prefetched(lambda t: self.step_windows(t, rank, world_size), range(start_step, self.plan.total_steps),
                               self.plan.prefetch_steps):
            if rank == 0:
                self._log_epoch(t)
            yield t, w

    def _log_epoch(self, step: int) -> None:
        e = int(self.epoch_at(step))
        if e > self._last_epoch:
            if self._last_epoch >= 0:
                log.info("data: epoch %d of the corpus begins at step %d", e + 1, step)
            self._last_epoch = e

    def val_windows(self):
        """Held-out (L+1)-token windows: the first ones of each store's held-out stream (shares by weight for a
        mixture), the same set whatever the world size."""
        L = self.plan.seq_len
        V = self.plan.val_windows
        weights = [c.weight for c in self.components]
        shares = _largest_remainder(weights, V)
        ws, ds = [], []
        for st, k in zip(self.stores, shares):
            need = k * L + 1
            if k > 0 and not st.complete and st.tokens("val") < need:
                st.wait_for("val", need)
            n_val = st.tokens("val")
            k = 0 if n_val <= L else min(k, (n_val - 1) // L)
            if k == 0:
                continue
            seg = st.read("val", 0, (k - 1) * L + L + 1)
            ws.append(cut_windows(seg, k, L, L + 1))
            if self.mask:
                ds.append(cut_windows(st.read_doc_ids("val", 0, (k - 1) * L + L + 1), k, L, L + 1))
        w = torch.cat(ws) if ws else torch.zeros(0, L + 1, dtype=torch.int64)
        if not self.mask:
            return w
        return w, (torch.cat(ds) if ds else w.clone())

    # -- what the data did ------------------------------------------------------------------------------------------
    @property
    def corpus_tokens(self) -> Optional[int]:
        """Training tokens in one epoch of the (first) store; None while it is still being written."""
        st = self.store
        if not st.complete:
            st.refresh()
        return st.tokens("train") if st.complete else None

    @property
    def stats(self) -> dict:
        if len(self.components) == 1:
            return self.store.stats
        from pipeline.data.records import merge_stats, new_stats

        out = new_stats()
        for st in self.stores:
            out = merge_stats(out, st.stats)
        return out

    def epoch_at(self, step: int) -> float:
        """Epochs read before `step` (of the heaviest store in a mixture)."""
        if self.layout == "lanes":
            if not all(st.complete for st in self.stores):
                return 0.0
            self._ensure_layout()
            i = max(range(len(self.components)), key=lambda k: self.components[k].weight)
            sched = self._sched[i]
            if step >= self.plan.total_steps:  # the end of the run: after the last step's stride
                e, q = sched.at(self.plan.total_steps - 1)
                return e + (q + self.plan.bag_size_at(self.plan.total_steps - 1) * self.plan.seq_len) / sched.lane_len
            return sched.epoch_fraction(step)
        n = self.corpus_tokens
        return self.plan.offset(step) / n if n else 0.0

    def data_metrics(self, steps_done: int) -> dict:
        """Per-source training tokens read in the first `steps_done` steps (window bodies), for a mixture."""
        if self.layout != "lanes" or len(self.components) == 1:
            return {}
        self._ensure_layout()
        per_row = self.plan.offset(steps_done) // self.plan.global_batch_size
        return {f"data_tokens_{c.name}": n * per_row for c, n in zip(self.components, self._lanes)}

    def identity(self) -> dict:
        """Everything that decides which tokens step t reads: the stores (content ids) and their weights, the
        layout, the shuffle and its seed, and the schedule. A resume must find the same (pipeline.train.checkpoint)."""
        p = self.plan
        return {"stores": [[c.name, c.store_id or os.path.basename(c.uri.rstrip("/")), c.weight]
                           for c in self.components],
                "layout": self.layout, "shuffle": self.shuffle, "shuffle_chunk_tokens": self.chunk_tokens,
                "shuffle_seed": self.seed, "doc_boundary": self.doc_boundary,
                "plan": [p.total_steps, p.switch_fraction, p.bag_size, p.seq_len, p.global_batch_size]}

    def layout_summary(self) -> dict:
        """Rows per source, lane length and epochs (what `tst data inspect` prints)."""
        self._ensure_layout()
        out = {"layout": self.layout, "shuffle": self.shuffle, "shuffle_chunk_tokens": self.chunk_tokens,
               "seed": self.seed}
        if self.layout == "lanes":
            out["sources"] = {c.name: {"weight": c.weight / sum(x.weight for x in self.components), "rows": n,
                                       "lane_tokens": sch.lane_len, "train_tokens": st.tokens("train"),
                                       "epochs_run": sch.epoch_fraction(self.plan.total_steps - 1) if self.plan.total_steps else 0.0}
                              for c, n, sch, st in zip(self.components, self._lanes, self._sched, self.stores)}
        return out

    def close(self) -> None:
        for prep in self.__dict__.get("_prepare", None) or []:
            prep.detach()
        self._reset()


def _largest_remainder(weights: list[float], total: int) -> list[int]:
    tot = float(sum(weights))
    raw = [w / tot * total for w in weights]
    base = [int(x) for x in raw]
    rest = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in rest[: total - sum(base)]:
        base[i] += 1
    return base
