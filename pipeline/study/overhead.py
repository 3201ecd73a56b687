"""What Ray costs a user: the tiny run's start-up and steady state, `tst train --no-ray` (the plain loop) against
`tst train` (a local Ray, TorchTrainer, one worker), each the real command in a fresh process (bench/overhead.py
is the command line; the method is in its docstring).

Besides the clocks, a run's start-up is charged the machine's busy CPU-seconds from launch to its first step
(`busy_cpu_s`, all processes: Ray's daemons and actors included). On a quiet machine that is the run's own CPU,
and busy CPU-seconds / cores is a floor under its start-up that no overlap of its processes can beat: a measure
of how far start-up could be cut by scheduling alone, and how far only by doing less work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (everything but idle and iowait), from /proc/stat.
    NaN where there is no /proc/stat (not Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / HZ


class BusySampler:
    """Samples (time, busy_cpu_s()) every `every` seconds in a thread while in a `with` block; `between(t0, t1)` is
    the machine's busy CPU-seconds between two instants inside the block, interpolated linearly between samples.
    The sampler itself costs ~0.03 ms of CPU a sample (measured on 2 cores, 2026-12-03)."""

    def __init__(self, every: float = 0.1):
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="busy-sampler")

    def _sample(self) -> None:
        self.samples.append((time.time(), busy_cpu_s()))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.every):
            self._sample()
        self._sample()

    def __enter__(self) -> "BusySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        s = self.samples
        if not s or t <= s[0][0]:
            return s[0][1] if s else float("nan")
        for (ta, ba), (tb, bb) in zip(s, s[1:]):
            if t <= tb:
                return ba + (bb - ba) * (t - ta) / max(tb - ta, 1e-9)
        return s[-1][1]

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)


def _boot_time() -> float:
    with open("/proc/stat") as f:
        return float(next(ln.split()[1] for ln in f if ln.startswith("btime ")))


def process_label(cmdline: str) -> str:
    """A short name for a process of a run: Ray's actors and workers by their title (`ray::TrainController`,
    `ray::IDLE`), its daemons by program (`raylet`, `gcs_server`), its Python agents by their path in the ray package
    (`dashboard/agent.py`), the `tst` command itself as `tst <subcommand>`, anything else by its first two words."""
    words = cmdline.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split(".")[0]
    for i, w in enumerate(words[:3]):
        base = os.path.basename(w)
        if base in ("raylet", "gcs_server"):
            return base
        if base == "tst":
            return " ".join(["tst", *words[i + 1:i + 2]])
        if base.endswith(".py"):
            return w.split("/ray/", 1)[-1] if "/ray/" in w else base
    return " ".join(os.path.basename(w) for w in words[:2])


# Labels a process has before it settles: Ray's worker starter execs the worker, which is idle until it runs a task
# or becomes an actor (its CPU counts under the label it ends with).
UNSETTLED = ("_private/workers/setup_worker.py", "_private/workers/default_worker.py", "ray::IDLE")


class ProcessSampler(BusySampler):
    """BusySampler that also samples the CPU-seconds (user + system) of every process started after the block
    began, from /proc/PID/stat, every `every` seconds (it reads every /proc entry: ~2 ms of CPU a scan of 70
    processes, so ~1% of a core at 0.25 s), until `until()` is true. `by_process(t)` is each one's CPU at its last
    sample at or before t, summed by `process_label`: a process that exits between samples loses at most `every`
    seconds of its CPU."""

    def __init__(self, every: float = 0.25, until=None):
        super().__init__(every)
        self.procs: dict[int, tuple[str, list[tuple[float, float]]]] = {}
        self._since = time.time()
        self._until = until  # a callable: once it returns True, only the (cheap) busy CPU is sampled
        self._scanning = True

    def __enter__(self) -> "ProcessSampler":
        self._since = time.time()
        return super().__enter__()

    def _sample_procs(self) -> None:
        now, boot = time.time(), _boot_time()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if pid not in self.procs:
                    if boot + int(fields[19]) / HZ < self._since - 0.5:  # started before the block: not the run's
                        continue
                    self.procs[pid] = ("", [])
                label, series = self.procs[pid]
                if not label or label in UNSETTLED:  # a Ray worker execs, then titles itself by what it runs
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        label = process_label(f.read().replace(b"\0", b" ").decode(errors="replace"))
                    self.procs[pid] = (label, series)
                series.append((now, (int(fields[11]) + int(fields[12])) / HZ))
            except (OSError, IndexError, ValueError):
                continue

    def _sample(self) -> None:
        super()._sample()
        if self._scanning and self._until is not None and self._until():
            self._scanning = False
        if self._scanning:
            self._sample_procs()

    def by_process(self, t: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, series in self.procs.values():
            seen = [c for ts, c in series if ts <= t]
            if seen:
                out[label] = out.get(label, 0.0) + seen[-1]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def steady_rate(records: list[dict], warmup: int) -> float:
    """Steps/s between the first logged step >= warmup and the last logged step (the loop's elapsed_s)."""
    rows = [r for r in records if r.get("kind") != "final" and "elapsed_s" in r]
    start = next(r for r in rows if r["step"] >= warmup)
    end = rows[-1]
    return (end["step"] - start["step"]) / (end["elapsed_s"] - start["elapsed_s"])


def run_once(mode: str, name: str, overrides: list[str], out: str, warmup: int, *, cwd: str,
             by_process: bool = False) -> dict:
    """One `tst train` ("plain": --no-ray; "ray": the local Ray) in a fresh process: its start-up (launch to the
    first step's start: the first metrics record's `logged_at` - `elapsed_s`), the machine's busy CPU-seconds in
    that time, its steady steps/s after `warmup` and its total wall time; with `by_process`, also the CPU-seconds of
    each of its processes (by `process_label`) up to its first step."""
    from pipeline.train.metrics import JsonlWriter

    tst = os.path.join(os.path.dirname(sys.executable), "tst")
    cmd = [tst, "train", "--name", name, *(["--no-ray"] if mode == "plain" else []), *overrides,
           f"run.output_dir={out}"]
    metrics = os.path.join(out, "runs", name, "metrics.jsonl")
    # The per-process scan stops at the run's first record (after its first step), sparing the steady state.
    with (ProcessSampler(until=lambda: os.path.exists(metrics)) if by_process else BusySampler()) as busy:
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        total = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    recs = [r for r in JsonlWriter(metrics).read() if "step" in r]
    first = next(r for r in recs if r.get("kind") != "final")
    t_first = first["logged_at"] - first["elapsed_s"]
    result = {"first_step_s": t_first - t0, "startup_busy_cpu_s": busy.between(t0, t_first), "total_s": total,
              "steps_per_s": steady_rate(recs, warmup) if warmup < recs[-1]["step"] else None}
    if by_process:
        result["startup_cpu_by_process"] = busy.by_process(t_first)
    return result


def background_busy(seconds: float = 3.0) -> float:
    """The machine's busy cores (busy CPU-seconds per second) over `seconds` with nothing of ours running: the load
    that start-up's busy CPU-seconds include but that is not the run's."""
    b0, t0 = busy_cpu_s(), time.time()
    time.sleep(seconds)
    return (busy_cpu_s() - b0) / (time.time() - t0)
