"""The TST phase schedule and its warmup-stable-decay learning rate, as pure functions of the step.

Why pure functions: the trainer, the data source (which must know the stream offset of any step to resume
exactly) and the tuner all need the same answers from ``(step, T, r, s)`` alone, with no state to save.

Paper facts implemented (tst-paper.md, "Schedule" and "The method"):
- one run of ``T`` optimizer steps; the first ``switch_step`` steps are superposition (bag size ``s``), the
  rest are recovery (ordinary next-token training, bag size 1);
- the switch step is ``floor(r * T + 0.5)`` (design notes, "Schedules and rounding"): round half up, not
  Python's banker's ``round``;
- one warmup-stable-decay LR schedule spans both phases (2000 warmup steps and decay over the last 10 % of
  steps in the paper), so that the switch falls on the flat stretch; the optimizer and LR continue across it.

Decisions where the paper is silent (tested in tests/test_schedule.py):
- Steps are 0-based. ``wsd_lr`` warms up linearly as ``peak * (step + 1) / warmup_steps``: step 0 already gets
  a small non-zero LR (an LR of exactly 0 would waste a step) and step ``warmup_steps - 1`` reaches the peak.
- The decay is LINEAR over the last ``decay_steps = floor(decay_fraction * T + 0.5)`` steps, reaching
  exactly ``min_lr_ratio * peak`` on the last step ``T - 1``. Where warmup and decay overlap (very short runs)
  the smaller of the two factors wins. Steps past ``T - 1`` stay at the minimum.
- The stable stretch is steps ``[warmup_steps, T - decay_steps)``. The switch "falls on the stable stretch"
  when ``warmup_steps <= switch_step <= T - decay_steps``: the first recovery step is either stable or the
  first decay step. ``r = 0`` (plain training) never warns; ``r = 1`` warns (the paper: no recovery gives an
  unusable model) and is otherwise allowed because the paper's grids include it.
"""

from __future__ import annotations

import math
import warnings

SUPERPOSITION = "superposition"
RECOVERY = "recovery"


def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_fraction(name: str, value) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def switch_step(total_steps: int, switch_fraction: float) -> int:
    """First recovery step: ``floor(r * T + 0.5)`` (steps ``0 .. switch_step - 1`` are superposition)."""
    total_steps = _check_int("total_steps", total_steps)
    r = _check_fraction("switch_fraction", switch_fraction)
    return min(total_steps, int(math.floor(r * total_steps + 0.5)))


def phase_at(step: int, total_steps: int, switch_fraction: float) -> str:
    """``"superposition"`` for 0-based steps before :func:`switch_step`, else ``"recovery"``.

    ``step`` must lie in ``[0, total_steps)``; a step outside the run is a ``ValueError``.
    """
    step = _check_int("step", step)
    if step >= total_steps:
        raise ValueError(f"step {step} is outside a run of {total_steps} steps")
    return SUPERPOSITION if step < switch_step(total_steps, switch_fraction) else RECOVERY


def bag_size_at(step: int, total_steps: int, switch_fraction: float, bag_size: int) -> int:
    """The bag size in force at ``step``: ``bag_size`` in superposition, 1 in recovery."""
    bag_size = _check_int("bag_size", bag_size, 1)
    return bag_size if phase_at(step, total_steps, switch_fraction) == SUPERPOSITION else 1


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """Number of decay steps at the end of the run: ``floor(decay_fraction * T + 0.5)``."""
    total_steps = _check_int("total_steps", total_steps)
    f = _check_fraction("decay_fraction", decay_fraction)
    return min(total_steps, int(math.floor(f * total_steps + 0.5)))


def wsd_lr(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_steps: int,
    decay_fraction: float,
    min_lr_ratio: float,
) -> float:
    """Warmup-stable-decay LR at 0-based ``step`` (linear warmup, flat, linear decay; see module docstring).

    warmup factor ``min(1, (step + 1) / warmup_steps)``; decay factor
    ``1 - (1 - min_lr_ratio) * (step - D0 + 1) / decay_steps`` for ``step >= D0 = T - decay_steps``
    (clamped at ``min_lr_ratio``); the LR is ``peak_lr * min(warmup factor, decay factor)``.
    """
    step = _check_int("step", step)
    total_steps = _check_int("total_steps", total_steps, 1)
    warmup_steps = _check_int("warmup_steps", warmup_steps)
    m = _check_fraction("min_lr_ratio", min_lr_ratio)
    n_decay = decay_steps(total_steps, decay_fraction)
    warm = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
    decay_start = total_steps - n_decay
    if n_decay > 0 and step >= decay_start:
        progress = min(1.0, (step - decay_start + 1) / n_decay)
        decay = 1.0 - (1.0 - m) * progress
    else:
        decay = 1.0
    return float(peak_lr) * min(warm, decay)


def raw_tokens_before(
    step: int, total_steps: int, switch_fraction: float, bag_size: int, positions_per_step: int
) -> int:
    """Stream offset (raw tokens consumed) at the start of ``step`` (0 <= step <= T).

    A superposition step consumes ``positions_per_step * bag_size`` tokens, a recovery step
    ``positions_per_step`` (``positions_per_step = global_batch_size * seq_len``; the ``+ s`` tail of each
    window is the next window's head and is not consumed).
    """
    step = _check_int("step", step)
    total_steps = _check_int("total_steps", total_steps)
    bag_size = _check_int("bag_size", bag_size, 1)
    positions_per_step = _check_int("positions_per_step", positions_per_step, 1)
    if step > total_steps:
        raise ValueError(f"step {step} is past the end of a run of {total_steps} steps")
    sw = switch_step(total_steps, switch_fraction)
    n_sup = min(step, sw)
    n_rec = step - n_sup
    return n_sup * positions_per_step * bag_size + n_rec * positions_per_step


def check_schedule(
    total_steps: int,
    switch_fraction: float,
    bag_size: int,
    warmup_steps: int,
    decay_fraction: float,
) -> list[str]:
    """Validate a schedule: ``ValueError`` on impossible values, a list of warnings (also ``warnings.warn``).

    Warns when r = 1 (no recovery: the paper reports an unusable model, next-token loss 4.6-6.5), when the
    switch falls inside the warmup or inside the decay stretch (the paper puts it on the stable stretch),
    when warmup and decay overlap, and when a superposition phase has bag size 1 (it is plain training).
    """
    total_steps = _check_int("total_steps", total_steps, 1)
    r = _check_fraction("switch_fraction", switch_fraction)
    bag_size = _check_int("bag_size", bag_size, 1)
    warmup_steps = _check_int("warmup_steps", warmup_steps)
    n_decay = decay_steps(total_steps, decay_fraction)
    sw = switch_step(total_steps, r)
    decay_start = total_steps - n_decay
    out: list[str] = []
    if warmup_steps > decay_start:
        out.append(
            f"warmup ({warmup_steps} steps) overlaps the decay (last {n_decay} of {total_steps} steps): "
            "there is no stable stretch"
        )
    if sw == total_steps and total_steps > 0 and r > 0:
        out.append(
            f"switch_fraction={r}: no recovery phase; the paper reports that r = 1 gives an unusable "
            "model (next-token loss 4.6-6.5)"
        )
    elif 0 < sw < warmup_steps:
        out.append(
            f"switch step {sw} falls inside the warmup (first {warmup_steps} steps), not on the stable stretch"
        )
    elif sw > decay_start and sw > 0:
        out.append(
            f"switch step {sw} falls inside the decay stretch (steps {decay_start}..{total_steps - 1}), "
            "not on the stable stretch"
        )
    if sw > 0 and bag_size == 1:
        out.append("bag_size=1: the superposition phase is plain next-token training")
    for msg in out:
        warnings.warn(msg, stacklevel=2)
    return out
