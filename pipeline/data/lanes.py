"""What a batch is: B lanes across the (shuffled) epoch stream, rows drawn from a weighted mixture of stores.

Why lanes: if the B windows of a step were B consecutive windows of one stream, a baseline batch would span a
handful of documents while a superposition batch (s times more raw tokens) spans s times more, and the two arms
would see gradients of different diversity (measured: it flattered TST by ~0.11 nats at our CPU scale).

The rules (docs/interfaces.md states them as the contract):
- **Epoch order.** A store's train stream of N tokens is cut into chunks of C = `data.shuffle_chunk_tokens`
  tokens (the last one shorter). Epoch e reads the chunks in the order of a permutation drawn from (seed, e)
  with Python's `random.Random` (stable across versions and machines); `data.shuffle=false` keeps file order.
  Memory is one int per chunk, never per document; reads stay sequential within a chunk.
- **Lanes.** A component (one store of the mixture) owning n rows of the global batch cuts its permuted epoch
  stream into n lanes of Λ = N // n tokens; row j of every step reads lane j in order. The N - nΛ tokens of the
  remainder (fewer than n) are not read in that epoch.
- **Steps.** All lanes of a component advance together by the step's stride s_t*L (s_t = s in superposition, 1
  in recovery) and a window is s_t*L + s_t tokens (its tail is the next window's head). When the next window
  would cross the lane's end, every lane of the component starts the next epoch (a new permutation) at offset
  0: the lanes' tails (each shorter than one window) are not read in that epoch. Within an epoch, the bodies
  (first s_t*L tokens) of the windows of lane j tile lane j from 0 up to its last window without gap or
  overlap: nothing read twice, and nothing skipped but the tails and the remainder.
- **Mixtures.** `data.sources` gives each store a weight; row b of every step belongs to the component whose
  running share lags its weight most (ties by order), so each step draws n_i ≈ w_i * B rows from component i
  (|n_i / B - w_i| < 1 / B, exactly the same rows at every step) and every component runs its own epochs.
- Everything is a pure function of the step, so any rank of any world size reads its rows of any step in O(1)
  (the per-step lane offsets are precomputed once, O(T) integer arithmetic).

Imports only the standard library.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pipeline.errors import DataError


def seed_of(seed: int, epoch: int, name: str = "") -> int:
    """A 64-bit seed for (seed, epoch[, component]), the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(f"tst-shuffle:{seed}:{epoch}:{name}".encode()).digest()[:8], "little")


class EpochOrder:
    """The chunk permutation of one epoch: maps permuted positions to ranges of the stored stream."""

    def __init__(self, n_tokens: int, chunk: int, seed: int, epoch: int, name: str = "", shuffle: bool = True):
        self.n = n_tokens
        self.shuffle = shuffle and chunk > 0 and n_tokens > chunk
        self.chunk = chunk if self.shuffle else n_tokens
        if not self.shuffle:
            return
        self.k = -(-n_tokens // chunk)
        self.last = n_tokens - (self.k - 1) * chunk  # the only chunk that may be short
        self.order = list(range(self.k))
        random.Random(seed_of(seed, epoch, name)).shuffle(self.order)
        self.j_short = self.order.index(self.k - 1)

    def _locate(self, p: int) -> tuple[int, int]:
        """(permuted chunk index, offset in it) of permuted position p."""
        c = self.chunk
        if p < self.j_short * c:
            return divmod(p, c)
        p2 = p - self.j_short * c
        if p2 < self.last:
            return self.j_short, p2
        k2, off = divmod(p2 - self.last, c)
        return self.j_short + 1 + k2, off

    def pieces(self, p: int, length: int) -> list[tuple[int, int]]:
        """Ranges [a, b) of the stored stream that permuted positions [p, p + length) read, in order."""
        if p < 0 or p + length > self.n:
            raise DataError(f"permuted range [{p}, {p + length}) is outside the epoch of {self.n} tokens")
        if not self.shuffle:
            return [(p, p + length)]
        out = []
        while length > 0:
            k, off = self._locate(p)
            cid = self.order[k]
            size = self.last if cid == self.k - 1 else self.chunk
            take = min(length, size - off)
            a = cid * self.chunk + off
            if out and out[-1][1] == a:  # neighbouring chunks in the same order: one read
                out[-1] = (out[-1][0], a + take)
            else:
                out.append((a, a + take))
            p += take
            length -= take
        return out


def assign_rows(weights: list[float], rows: int) -> list[int]:
    """Component index of each row of the global batch: the component whose share lags its weight most."""
    total = float(sum(weights))
    if rows < 1 or total <= 0 or any(w < 0 for w in weights):
        raise DataError(f"mixture weights {weights} need to be >= 0 with a positive sum")
    w = [x / total for x in weights]
    counts = [0] * len(w)
    out = []
    for b in range(rows):
        lag = [w[i] * (b + 1) - counts[i] for i in range(len(w))]
        i = max(range(len(w)), key=lambda i: (lag[i], -i))
        counts[i] += 1
        out.append(i)
    missing = [i for i in range(len(w)) if w[i] > 0 and counts[i] == 0]
    if missing:
        raise DataError(f"data.sources: a global batch of {rows} rows gives no row to a source of weight "
                        f"{w[missing[0]]:.3g}; raise train.global_batch_size or the weight")
    return out


@dataclass
class LaneSchedule:
    """(epoch, lane offset) of every step for one component: lanes of `lane_len` tokens, advanced in lockstep."""

    lane_len: int
    positions: list  # positions[t] = (epoch, offset) at the start of step t

    @classmethod
    def build(cls, plan, lane_len: int, what: str = "") -> "LaneSchedule":
        L = plan.seq_len
        need_max = plan.max_window_len()
        if lane_len < need_max:
            raise DataError(f"{what}lanes of {lane_len} tokens are shorter than one window ({need_max} = s*L+s); add "
                            f"data, or lower train.global_batch_size, data.seq_len or data.bag_size")
        e, q, pos = 0, 0, []
        for t in range(plan.total_steps):
            s = plan.bag_size_at(t)
            if q + s * L + s > lane_len:
                e, q = e + 1, 0
            pos.append((e, q))
            q += s * L
        return cls(lane_len, pos)

    def at(self, step: int) -> tuple[int, int]:
        return self.positions[step]

    def epoch_fraction(self, step: int) -> float:
        e, q = self.positions[step] if step < len(self.positions) else self._end()
        return e + q / self.lane_len

    def _end(self) -> tuple[int, int]:
        return self.positions[-1] if self.positions else (0, 0)


def check_layout(layout: str) -> None:
    if layout not in ("lanes", "stream"):
        raise DataError(f"data.batch_layout must be 'lanes' or 'stream', got {layout!r}")

