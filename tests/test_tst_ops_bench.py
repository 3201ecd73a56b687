"""The benchmark helpers (tst_ops.bench; bench/ops.py is their command line) against values computed another way.

- timing: a fake clock and calls of known durations give the exact medians, minima and interleaving; a real
  sleep checks that the clock is a real one, in seconds;
- peak memory: a known allocation (64 MiB) above a known held one, and the reference path's (N, V) logits,
  whose count at the peak is worked out below;
- losses and gradients of the paths: a float64, per-slot ``F.cross_entropy`` reference.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from tst_ops import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


def test_time_calls_medians_minima_and_interleaving_on_a_fake_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench, "_clock", lambda: now[0])
    order = []

    def call_of(name, durations, losses):
        durations, losses = iter(durations), iter(losses)

        def call():
            order.append(name)
            now[0] += next(durations)
            return (next(losses),)

        return call

    # two warm-up calls each (100 s: must not be counted), then three measured rounds; medians 2.0 and 0.5
    # differ from the means (2.33, 0.75)
    calls = {"a": call_of("a", [100, 100, 4.0, 1.0, 2.0], [9.0, 8.0, 0, 0, 0]),
             "b": call_of("b", [100, 100, 0.5, 1.5, 0.25], [7.0, 6.5, 0, 0, 0])}
    res = bench.time_calls(calls, repeats=3, warmup=2)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups, then interleaved rounds
    assert res["a"] == {"time_s": 2.0, "time_min_s": 1.0, "times_s": [4.0, 1.0, 2.0], "loss": 8.0}
    assert res["b"] == {"time_s": 0.5, "time_min_s": 0.25, "times_s": [0.5, 1.5, 0.25], "loss": 6.5}
    assert bench.time_calls({"c": call_of("c", [1.0], [1.0])}, repeats=1, warmup=0)["c"]["loss"] is None


def test_time_calls_uses_a_real_clock_in_seconds():
    def nap():
        time.sleep(0.05)
        return (0.0,)

    res = bench.time_calls({"sleep": nap}, repeats=2, warmup=1)
    assert 0.05 <= res["sleep"]["time_min_s"] <= res["sleep"]["time_s"] < 1.0


def test_peak_bytes_of_a_known_allocation_above_a_held_one():
    held = torch.ones(32 * MiB // 4)  # 32 MiB in use before: must not be counted  # noqa: F841
    calls = []

    def call():
        calls.append(1)
        # the warm-up writes 128 MiB (a high-water mark the measurement must reset), the measured call 64 MiB
        return torch.ones((128 if len(calls) == 1 else 64) * MiB // 4)

    peak = bench.peak_bytes_of(call)
    assert len(calls) == 2  # one warm-up, one measured
    assert 64 * MiB <= peak <= 66 * MiB, peak / MiB


def _naive(h, w, t):
    """Float64 loss of the uniform-weight MCE (mean over slots of each slot's mean CE) and its grads."""
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = hd @ wd.t()
    slots = [F.cross_entropy(z, t[:, i], ignore_index=-100) for i in range(t.shape[1]) if (t[:, i] != -100).any()]
    loss = sum(slots) / len(slots)
    return (loss.detach(), *torch.autograd.grad(loss, (hd, wd)))


def test_paths_losses_and_gradients_match_a_naive_reference():
    h, w, t = bench.make_inputs(64, 16, 130, 3)
    assert h.shape == (64, 16) and w.shape == (130, 16) and t.shape == (64, 3)
    ref = _naive(h, w, t)
    res = bench.time_paths(["reference", "fused"], 64, 16, 130, 3, repeats=1, warmup=1, chunk_size=7)
    for path in ("reference", "fused"):
        assert res[path]["loss"] == pytest.approx(ref[0].item(), rel=1e-5)
        loss, gh, gw = bench.make_step(path, chunk_size=7)(h, w, t)
        for got, want in zip((gh, gw), ref[1:]):
            assert ((got.double() - want).norm() / want.norm()).item() < 1e-5, path
    one = bench.run_one("fused", 64, 16, 130, 3, repeats=1, chunk_size=7)
    assert one["loss"] == pytest.approx(ref[0].item(), rel=1e-5) and one["chunk_size"] == 7
    with pytest.raises(ValueError):
        bench.make_step("nope")


PEAKS = """
import json, sys
from tst_ops.bench import peak_memory_bytes
# with CPU_MEMORY_ENV every block of 128 KiB or more is a new mapping, so both paths measure in one process
print(json.dumps({p: peak_memory_bytes(p, 1024, 16, 16384, 2, chunk_size=64) for p in ("fused", "reference")}))
"""


def test_peak_memory_of_the_paths_against_their_logits():
    """N=1024, V=16384: one (N, V) float32 tensor is 64 MiB. At the reference's peak (the log_softmax backward)
    three are alive: the saved log-probabilities, their incoming gradient and the logits' gradient; the forward
    holds two (logits and log-probabilities). The fused loss with 64-row chunks holds one (64, V) chunk (4 MiB)
    plus grad_W (V, D) and grad_h (N, D), never the whole logits."""
    r = subprocess.run([sys.executable, "-c", PEAKS], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **bench.CPU_MEMORY_ENV))
    assert r.returncode == 0, r.stderr[-3000:]
    peak = json.loads(r.stdout.strip().splitlines()[-1])
    nv = 1024 * 16384 * 4
    assert 2.5 * nv <= peak["reference"] <= 3.25 * nv, peak["reference"] / MiB
    chunk, grads = 64 * 16384 * 4, (16384 + 1024) * 16 * 4
    assert chunk <= peak["fused"] <= 2 * chunk + grads, peak["fused"] / MiB


def test_summarize_ratios_by_hand():
    rows = [dict(s=3, path=p, time_s=t, peak_bytes=m) for p, t, m in
            [("reference", 2.0, 400), ("reference_compiled", 1.0, 200), ("fused", 1.1, 50)]]
    lines = bench.summarize(rows)
    # fused / reference: 1.1 / 2.0 = 0.55, 50 / 400 = 0.125; / compiled: 1.1, 0.25; fastest reference: 1.0
    assert lines == ["s=3   fused / reference           time x0.550 (min x0.550)  peak memory x0.125",
                     "s=3   fused / reference_compiled  time x1.100 (min x1.100)  peak memory x0.250",
                     "s=3   fused / fastest reference time x1.100"]


def test_bench_script_is_a_thin_command_line():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ops.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--memory-child" not in r.stdout and "--time-only" in r.stdout, r.stderr
