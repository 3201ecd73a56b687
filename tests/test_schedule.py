"""The TST phase schedule and the warmup-stable-decay LR, pinned at their boundaries (tst_ops/schedule.py)."""

import math
import warnings

import pytest

from tst_ops.schedule import (
    bag_size_at,
    check_schedule,
    decay_steps,
    phase_at,
    raw_tokens_before,
    switch_step,
    wsd_lr,
)


@pytest.mark.parametrize(
    "T,r,expected",
    [
        (10, 0.25, 3),  # 2.5 rounds UP (Python's round would give 2)
        (10, 0.35, 4),  # 3.5 -> 4
        (7, 0.5, 4),  # 3.5 -> 4
        (20000, 0.3, 6000),
        (125000, 0.25, 31250),
        (9, 0.3, 3),  # 2.7 -> 3
        (11, 0.3, 3),  # 3.3 -> 3
        (10, 0.0, 0),
        (10, 1.0, 10),
    ],
)
def test_switch_step_rounds_half_up(T, r, expected):
    assert switch_step(T, r) == expected == math.floor(r * T + 0.5)


def test_phase_and_bag_size_at_the_switch():
    T, r, s = 10, 0.25, 6  # switch step 3
    phases = [phase_at(t, T, r) for t in range(T)]
    assert phases == ["superposition"] * 3 + ["recovery"] * 7
    assert [bag_size_at(t, T, r, s) for t in range(T)] == [6, 6, 6] + [1] * 7


def test_r0_is_plain_training_and_r1_never_recovers():
    assert all(phase_at(t, 5, 0.0) == "recovery" for t in range(5))
    assert all(bag_size_at(t, 5, 0.0, 16) == 1 for t in range(5))
    assert all(phase_at(t, 5, 1.0) == "superposition" for t in range(5))


@pytest.mark.parametrize("bad", [dict(step=-1), dict(step=10), dict(switch_fraction=1.5), dict(switch_fraction=-0.1)])
def test_phase_at_rejects_out_of_range(bad):
    kw = dict(step=0, total_steps=10, switch_fraction=0.3) | bad
    with pytest.raises(ValueError):
        phase_at(**kw)


def test_wsd_lr_boundaries():
    T, peak, W, f, m = 100, 1e-3, 10, 0.2, 0.1  # decay over the last 20 steps: 80..99
    assert decay_steps(T, f) == 20
    lr = [wsd_lr(t, T, peak, W, f, m) for t in range(T)]
    assert lr[0] == pytest.approx(peak / 10)  # warmup starts near 0, not at 0
    assert lr[4] == pytest.approx(peak * 5 / 10)
    assert lr[9] == pytest.approx(peak)  # peak reached at the last warmup step
    assert all(v == pytest.approx(peak) for v in lr[9:80])  # stable stretch
    assert lr[80] == pytest.approx(peak * (1 - 0.9 * 1 / 20))  # first decay step
    assert lr[89] == pytest.approx(peak * (1 - 0.9 * 10 / 20))  # linear
    assert lr[99] == pytest.approx(peak * m)  # min LR at the last step
    assert wsd_lr(150, T, peak, W, f, m) == pytest.approx(peak * m)  # past the end: stays at the minimum
    assert wsd_lr(0, T, peak, 0, f, m) == pytest.approx(peak)  # no warmup
    assert wsd_lr(99, T, peak, W, 0.0, m) == pytest.approx(peak)  # no decay


def test_wsd_lr_overlapping_warmup_and_decay_takes_the_smaller_factor():
    # T=10, warmup 8, decay 5 (steps 5..9): step 6 has warmup 7/8, decay 1 - 0.5*2/5 = 0.8
    assert wsd_lr(6, 10, 1.0, 8, 0.5, 0.5) == pytest.approx(0.8)
    assert wsd_lr(5, 10, 1.0, 8, 0.5, 0.5) == pytest.approx(0.75)  # warmup 6/8 < decay 0.9


def test_raw_tokens_before_counts_each_phase():
    T, r, s, P = 10, 0.3, 6, 4 * 128  # switch at 3
    consumed = [P * bag_size_at(t, T, r, s) for t in range(T)]
    for t in range(T + 1):
        assert raw_tokens_before(t, T, r, s, P) == sum(consumed[:t])
    assert raw_tokens_before(T, T, r, s, P) == 3 * P * 6 + 7 * P
    # data factor of the paper: (r*s + 1 - r) times the baseline's tokens
    assert raw_tokens_before(T, T, r, s, P) / (T * P) == pytest.approx(0.3 * 6 + 1 - 0.3)
    with pytest.raises(ValueError):
        raw_tokens_before(T + 1, T, r, s, P)


def test_check_schedule_stable_switch_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_schedule(20000, 0.3, 6, 2000, 0.1) == []
        assert check_schedule(100, 0.0, 6, 10, 0.1) == []  # r = 0: plain training


def test_check_schedule_warns_r1_and_switch_off_the_stable_stretch():
    with pytest.warns(UserWarning, match="no recovery"):
        out = check_schedule(100, 1.0, 6, 10, 0.1)
    assert len(out) == 1
    with pytest.warns(UserWarning, match="inside the warmup"):
        check_schedule(100, 0.05, 6, 10, 0.1)  # switch 5 < warmup 10
    with pytest.warns(UserWarning, match="inside the decay"):
        check_schedule(100, 0.95, 6, 10, 0.1)  # switch 95 > decay start 90
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_schedule(100, 0.9, 6, 10, 0.1) == []  # switch 90 == first decay step: allowed
        assert check_schedule(100, 0.1, 6, 10, 0.1) == []  # switch 10 == first stable step: allowed


@pytest.mark.parametrize(
    "args",
    [(0, 0.3, 6, 10, 0.1), (100, 1.2, 6, 10, 0.1), (100, 0.3, 0, 10, 0.1), (100, 0.3, 6, -1, 0.1), (100, 0.3, 6, 10, 2.0)],
)
def test_check_schedule_rejects_impossible_values(args):
    with pytest.raises(ValueError):
        check_schedule(*args)
