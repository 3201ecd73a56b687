"""Step metrics: FLOP counting, throughput, and the sinks that record them (console, JSON Lines, MLflow).

Why here and not in the loop: the same records are written from one place only (the Ray-free process, or
the Ray Train controller through a callback), never from every worker; the loop just produces dicts.

FLOPs per latent position come from `Transformer.flops_per_position` (the design notes' count, causal attention
counted once); embedding lookups cost nothing, so a superposition step costs the FLOPs of a recovery step.
`phase_figures` reads a phase's steady throughput back from the logged intervals; `machine_info` describes the
machine a run's numerics came from.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional


def machine_info() -> dict:
    """What a run's float32 numerics depend on beyond its config and seed: the CPU and the kernels torch picks for
    it. Two runs of one config agreed bit for bit on one machine but not across sessions at 13M (docs/crossover.md),
    and `tst demo` gives 5.2666 / 5.7276 on one host and 5.2665 / 5.7448 on others at the same commit (README):
    the loop's final record carries this (rank 0's machine), so such a pair can be told apart."""
    import hashlib
    import platform

    import torch

    cpu, flags = platform.processor() or "", ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "")
    except OSError:
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "cores": os.cpu_count(),  # a VM's model name is often generic: its ISA flags tell two hosts apart
            "cpu_flags_sha256": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12],
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# Dense bf16 peak FLOP/s from the datasheets, by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops_for(device_name: str) -> Optional[float]:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_progress(m: dict, total_steps: int) -> str:
    """One human-readable line per logging interval."""
    phase = "SUPER" if m.get("phase") == "superposition" else "recov"
    parts = [
        f"step {m['step']:>{len(str(total_steps))}}/{total_steps}",
        f"{phase} s={m.get('bag_size', 1):<2}",
        f"loss {m['train_loss']:.4f}" if "train_loss" in m else "",
        f"val {m['val_loss']:.4f}" if "val_loss" in m else "",
        f"lr {m['lr']:.2e}" if "lr" in m else "",
        f"{m['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in m else "",
        f"MFU {100 * m['mfu']:.1f}%" if m.get("mfu") is not None and m.get("mfu") == m.get("mfu") else "",
        f"wait {100 * m['data_wait_frac']:.0f}%" if "data_wait_frac" in m else "",
        f"ETA {format_eta(m['eta_s'])}" if "eta_s" in m else "",
    ]
    return " | ".join(p for p in parts if p)


class JsonlWriter:
    """Append-only metrics file beside the checkpoints; survives a lost MLflow server."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps that will be redone (so the file holds one curve)."""
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None if math.isnan(v) else v
        out[k] = v
    return out


def say(text: str, stream=None) -> None:
    """One console line in one write. Under Ray a worker's stdout is Ray's `Unbuffered` wrapper (each write flushed
    at once), so `print`'s two writes, the text and then its newline, can reach the log file apart; Ray's log monitor
    then reads the text as one line and the newline as another, and the driver shows an empty
    `(TrainController pid=...)` line (seen once in a `tst demo`, 2026-12-03). Lines printed in Ray's processes go
    through here."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


class MetricsSink:
    """Console + JSON Lines + (optionally) MLflow, written from one process.

    `tracker` is a `pipeline.report.tracking.MlflowTracker` or None. Console lines go to stdout (flushed: under Ray
    the controller's stdout is streamed to the driver and to `ray job logs`).
    """

    def __init__(self, run_dir: str, total_steps: int, tracker=None, console: bool = True, stream=None,
                 listeners: Optional[list] = None):
        self.total_steps = total_steps
        self.listeners = list(listeners or [])  # callables given each record after it is written (e.g. Tune)
        self.jsonl = JsonlWriter(os.path.join(run_dir, "metrics.jsonl"))
        self.tracker = tracker
        self.console = console
        self.stream = stream or sys.stdout
        self.last: dict[str, Any] = {}
        self.history: list[dict] = []

    def log(self, metrics: dict) -> None:
        if not metrics or "step" not in metrics:
            return
        metrics = _jsonable(metrics)
        # logged_at: when the record reached this sink (Unix seconds), in metrics.jsonl only: the wall-clock a user
        # sees, e.g. command start to first step (bench/overhead.py); MLflow stamps its own times.
        record = {**metrics, "logged_at": round(time.time(), 3)}
        self.jsonl.write(record)
        self.history.append(record)
        self.last.update(metrics)
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=int(metrics["step"]))
        if self.console and metrics.get("kind") != "final":
            say(format_progress(metrics, self.total_steps), self.stream)
        for listener in self.listeners:
            listener(metrics)

    def message(self, text: str) -> None:
        if self.console:
            say(text, self.stream)


class StepTimer:
    """Time spent in training steps (waiting for data + compute) over a logging interval.

    Evaluation and checkpoint time are deliberately outside it, so throughput, data-wait fraction and MFU
    describe the training steps themselves; the wall-clock of everything is `elapsed_s`.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.busy = 0.0
        self.wait = 0.0
        self.steps = 0
        self.raw_tokens = 0
        self.positions = 0

    def add(self, steps: int, raw_tokens: int, positions: int, wait: float, busy: float):
        self.steps += steps
        self.raw_tokens += raw_tokens
        self.positions += positions
        self.wait += wait
        self.busy += busy

    def rates(self) -> dict:
        dt = max(self.busy, 1e-9)
        return {
            "step_time_s": dt / max(self.steps, 1),
            "tokens_per_s": self.raw_tokens / dt,
            "positions_per_s": self.positions / dt,
            "data_wait_frac": self.wait / dt,
        }


# -- a phase's steady throughput, from the logged intervals (bench/gpu_check.py) ---------------------------------------
def steady_intervals(records: list[dict], phase: str) -> list[dict]:
    """The log intervals of a phase that measure steady training: not the first interval of the phase (warm-up,
    compilation, allocator growth) and not an interval that ends with an evaluation (its time includes it)."""
    rows = [r for r in records if r.get("phase") == phase and r.get("kind") != "final"]
    return [r for r in rows[1:] if "val_loss" not in r]


def phase_figures(records: list[dict], phase: str, matmul_flops: Optional[float] = None) -> dict:
    """Medians over a phase's steady intervals: steps/s, latent positions/s, raw tokens/s, TFLOP/s, the data-wait
    fraction, MFU against the datasheet peak (when every interval has one) and against a measured matmul rate
    (`mfu_vs_measured_matmul`, FLOP/s). {"intervals": 0} when the phase has no steady interval."""
    import statistics

    rows = steady_intervals(records, phase)
    if not rows:
        return {"intervals": 0}

    def med(k):
        return statistics.median(float(r[k]) for r in rows)

    out = {
        "intervals": len(rows),
        "steps_per_s": 1.0 / med("step_time_s"),
        "step_time_s": med("step_time_s"),
        "positions_per_s": med("positions_per_s"),
        "tokens_per_s": med("tokens_per_s"),
        "tflops_per_s": med("tflops_per_s"),
        "data_wait_frac": med("data_wait_frac"),
        "bag_size": rows[0].get("bag_size"),
    }
    out["mfu_datasheet"] = med("mfu") if all(r.get("mfu") is not None for r in rows) else None
    out["mfu_vs_measured_matmul"] = out["tflops_per_s"] * 1e12 / matmul_flops if matmul_flops else None
    return out
