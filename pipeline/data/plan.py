"""Which stream offsets each step reads: a pure function of the schedule (T, r, s, L, B) and the step.

Step t reads the global batch of B windows starting at offset o = raw_tokens_before(t) (docs/interfaces.md):
window k is stream[o + k*s_t*L : o + k*s_t*L + s_t*L + s_t] (s_t = s in superposition, 1 in recovery), so the same
stream serves both phases and the switch needs no restart. Rank w of W gets windows [floor(w*B/W), floor((w+1)*B/W))
(uneven when W does not divide B). The data
position of a checkpoint is therefore the step alone, and a resume with any worker count is exact and O(1).
Imports nothing but the standard library (and tst_ops.schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import DataError

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

    def rank_rows(self, rank: int, world_size: int) -> tuple[int, int]:
        """[lo, hi) rows of the global batch that rank `rank` of `world_size` trains on: contiguous, as even as B and
        W allow (B % W ranks get one row more). Uneven is fine: the loss is normalised by global per-slot counts."""
        self._check_rank(rank, world_size)
        B = self.global_batch_size
        return rank * B // world_size, (rank + 1) * B // world_size

    def rank_span(self, step: int, rank: int, world_size: int) -> tuple[int, int, int]:
        """(start offset, windows, window stride) of this rank's share of `step`."""
        lo, hi = self.rank_rows(rank, world_size)
        s = self.bag_size_at(step)
        return self.offset(step) + lo * s * self.seq_len, hi - lo, s * self.seq_len

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
        if world_size > self.global_batch_size:
            raise DataError(f"{world_size} workers need train.global_batch_size >= {world_size} (one row each), got "
                            f"{self.global_batch_size}")
