#!/usr/bin/env python
"""The claim, measured: iso-loss speedup of TST over WSD baselines at equal FLOPs per step, in one command.

    tst data build-corpus --out outputs/speedup/corpus      # once: 100 MB of text (builtins + Debian doc packages)
    python bench/speedup.py --chunk-corpus outputs/speedup/corpus --chunk-mb 30   # once: shuffled <=2,000-char pieces
    python bench/speedup.py --setting cpu                   # ~30 min on 2 CPU cores (recipes/speedup_cpu.yaml)
    python bench/speedup.py --setting gpu                   # one H200, a few minutes (recipes/speedup_gpu.yaml)
    python bench/speedup.py --setting tiny                  # smoke test, ~1 minute on 2 cores

What it runs (all runs share the model, global batch, seq_len, seed, optimizer, peak LR and warmup, so every step
costs the same FLOPs; only T, and s/r for TST, differ):

- TST: T steps, the first floor(r*T + 0.5) in superposition with bag size s (defaults s = 6, r = 0.3), the rest
  ordinary next-token training; warmup-stable-decay LR over the whole run.
- Baselines (s = 1) of lengths k*T for each k in --baseline-lengths (default 0.5, 0.75, 1, 1.5, 2), EACH with a
  complete warmup-stable-decay schedule: the same absolute warmup (train.warmup_steps steps) and a decay over its
  own last decay_fraction (10%) of steps, so every baseline's final point is fully decayed, like TST's.
  --baseline-mode branches (default): one run of the longest length is trained; every shorter baseline is its
  WSD decay branch: resumed from the long run's last checkpoint at or before the step where the shorter run's
  decay starts (T_k - round(0.1 T_k)) and trained (its last stable steps, then its decay) to T_k. With an absolute
  warmup and a data position that depends on the step only, a shorter run is the long run up to that step (the
  LR schedules coincide there; checked bit-for-bit against separate runs in tests/test_speedup.py), so a branch
  IS the separate run, at a fraction of its cost; its wall-clock (elapsed_s) continues from the checkpoint's, so
  it is the wall-clock a separate run of that length would have taken on this machine. The TST run writes
  checkpoints at the same cadence as the long baseline, so that checkpoint writes cost both the same share of
  wall-clock. --baseline-mode separate trains every length from scratch instead.
  The lengths 0.5 and 0.75 are there so that a TST run that does WORSE than the same-length baseline still gets
  a measured (below 1x) iso-loss figure instead of an upper bound; they cost ~4% of the CPU budget as branches.
- The comparison (`pipeline.compare.compare_runs`, several baselines -> final-point mode): TST's final validation
  loss is the target; the baselines' final (step, loss) points are interpolated linearly to find the steps (and
  wall-clock, FLOPs) a fully-decayed baseline needs to reach it; the equal-step difference is the same-length
  (k = 1) baseline's final loss minus TST's (positive = TST better).

Data: a corpus large enough that no run repeats a token, cut into shuffled pieces of at most 2,000 characters
(`--chunk-corpus`, see `chunk_corpus`): the stream is contiguous, so without it a single 1.6M-character document
fills hundreds of consecutive batches and the comparison measures which document each run is in. TST reads (r*s + 1 - r) times the baseline's raw tokens
for the same steps (2.5x at s = 6, r = 0.3). The script computes every run's token need before training and
stops (unless --allow-repeat) if any run would read more than one epoch; each run's `epochs` is recorded.

Timing: the Ray-free loop in this process (`run_training(use_ray=False)`), `train.threads` torch threads on CPU,
MLflow tracking off (runs are compared from their folders `<out>/runs/NAME/`); wall-clock includes evaluations
and checkpoint writes, which are the same for TST and the baselines up to the long baseline's branch checkpoints.
The load average before and after each run is recorded (the machine may be shared).

The GPU setting (`--setting gpu`): the "125M" preset (GPT-2 vocabulary: 152.7M parameters), bf16 autocast, one
GPU, on a token store (`data.source` = a store folder from `tst data prepare`, as bench/gpu_check.py reads; read with torch
only, so that the GPU machine needs nothing but PyTorch). `gpu_setting()` returns its config for other scripts.

Outputs under `<out>/` (default outputs/speedup): `runs/<setting>-.../` (one folder per run), and
`<setting>/speedup.json` (every figure: per-run summaries, load, hardware, comparison), `<setting>/speedup.png`
(the loss curves, baselines' final points, iso-loss point) and `<setting>/speedup.md` (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_LENGTHS = (0.5, 0.75, 1.0, 1.5, 2.0)

# The settings as dotted overrides on the defaults of pipeline.config.Config. recipes/speedup_cpu.yaml and
# recipes/speedup_gpu.yaml hold the same values (tests/test_speedup.py checks that they agree); these dicts are
# what the script uses, so that the GPU machine needs no yaml.
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {
        "recipe": "recipes/speedup_cpu.yaml",
        "config": {
            "model.preset": "tiny",
            "data.source": "outputs/speedup/corpus_chunks",
            "data.tokenizer": "bpe:4096",
            "data.seq_len": 128,
            "data.bag_size": 1,
            "data.val_fraction": 0.01,
            "data.val_windows": 128,
            "train.steps": 600,
            "train.switch_fraction": 0.0,
            "train.global_batch_size": 16,
            "train.lr": 1.0e-3,  # the baseline's best lr in the follow-up search (docs/results.md)
            "train.warmup_steps": 60,
            "train.decay_fraction": 0.1,
            "train.min_lr_ratio": 0.1,
            "train.weight_decay": 0.1,
            "train.log_every": 20,
            "train.eval_every": 60,
            "train.checkpoint_every": 100000,
            "train.keep_checkpoints": 8,
            "train.threads": 2,
            "scaling.num_workers": 0,
            "run.experiment": "tst-speedup",
            "run.output_dir": "outputs/speedup",
            "run.tracking": False,
        },
    },
    "gpu": {
        "recipe": "recipes/speedup_gpu.yaml",
        "config": {
            "model.preset": "125M",
            "data.source": "outputs/gpu_check/store",  # a token store folder (tst data prepare; see gpu_check.py)
            "data.tokenizer": "gpt2",
            "data.seq_len": 512,
            "data.bag_size": 1,
            "data.val_windows": 128,
            "train.steps": 600,
            "train.switch_fraction": 0.0,
            "train.global_batch_size": 8,
            "train.lr": 1.0e-3,
            "train.warmup_steps": 60,
            "train.decay_fraction": 0.1,
            "train.min_lr_ratio": 0.1,
            "train.weight_decay": 0.1,
            "train.dtype": "bfloat16",
            "train.compile": False,
            "train.log_every": 20,
            "train.eval_every": 60,
            "train.checkpoint_every": 100000,
            "train.keep_checkpoints": 12,
            "scaling.num_workers": 0,
            "scaling.use_gpu": True,
            "run.experiment": "tst-speedup",
            "run.output_dir": "outputs/speedup",
            "run.tracking": False,
        },
    },
    # Smoke test: a 2-layer model on 300 Wikipedia articles, a few dozen steps (tests/test_speedup.py).
    "tiny": {
        "recipe": None,
        "config": {
            "model.preset": "tiny",
            "model.hidden_size": 64,
            "model.num_layers": 2,
            "model.num_heads": 4,
            "model.num_kv_heads": 2,
            "model.intermediate_size": 128,
            "data.source": "builtin:wiki",
            "data.max_documents": 300,
            "data.tokenizer": "bpe:512",
            "data.seq_len": 32,
            "data.bag_size": 1,
            "data.val_fraction": 0.05,
            "data.val_windows": 16,
            "train.steps": 40,
            "train.switch_fraction": 0.0,
            "train.global_batch_size": 4,
            "train.lr": 3.0e-3,
            "train.warmup_steps": 4,
            "train.decay_fraction": 0.1,
            "train.min_lr_ratio": 0.1,
            "train.log_every": 10,
            "train.eval_every": 10,
            "train.checkpoint_every": 100000,
            "train.keep_checkpoints": 8,
            "train.threads": 1,
            "scaling.num_workers": 0,
            "run.experiment": "tst-speedup",
            "run.output_dir": "outputs/speedup",
            "run.tracking": False,
        },
    },
}


def setting_config(setting: str, overrides: Optional[list[str] | dict] = None):
    """The shared (baseline) Config of a setting, with optional `key=value` overrides. Standard library only."""
    from pipeline.config import Config, apply_overrides, validate

    if setting not in SETTINGS:
        raise SystemExit(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    base = dict(SETTINGS[setting]["config"])
    for key in ("data.source", "run.output_dir"):  # the settings' relative paths are relative to the repository
        v = base.get(key)
        if v and ":" not in v and not os.path.isabs(v) and not os.path.exists(v):
            base[key] = str(REPO / v)
    cfg = apply_overrides(Config(), base)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def gpu_setting(overrides: Optional[list[str] | dict] = None):
    """The GPU setting's shared Config (for bench/gpu_check.py or any caller): 125M preset, bf16, one GPU."""
    return setting_config("gpu", overrides)


# ---------------------------------------------------------------------------------------------------------------
# The plan: which runs, branch points, token needs
# ---------------------------------------------------------------------------------------------------------------
def parse_lengths(text: str) -> list[float]:
    vals = sorted({float(x) for x in str(text).split(",") if x.strip()})
    if not vals or any(v <= 0 for v in vals):
        raise SystemExit(f"--baseline-lengths must be positive multiples of T, got {text!r}")
    return vals


def plan_runs(cfg, *, steps: int, bag_size: int, switch_fraction: float, lengths: list[float], mode: str,
              prefix: str, checkpoint_every: Optional[int] = None) -> dict:
    """The runs to train: TST, the baselines (lengths k*T), and in branch mode the branch points."""
    from tst_ops import schedule

    if not 0 < switch_fraction <= 1 or bag_size < 2:
        raise SystemExit("TST needs --bag-size >= 2 and 0 < --switch-fraction <= 1")
    df, warm = cfg.train.decay_fraction, cfg.train.warmup_steps
    base_steps = sorted({max(1, int(round(k * steps))) for k in lengths})
    t_max = base_steps[-1]
    runs = {"tst": {"name": f"{prefix}tst-s{bag_size}-r{switch_fraction:g}-T{steps}", "steps": steps,
                    "bag_size": bag_size, "switch_fraction": switch_fraction}}
    bases = []
    for t_k in base_steps:
        b = {"name": f"{prefix}base-T{t_k}", "steps": t_k, "length": t_k / steps, "branch_from": None,
             "branch_step": None}
        if mode == "branches" and t_k < t_max:
            # the last step on which a T_k run's LR equals the long run's: its decay starts at T_k - decay_steps
            bp = t_k - schedule.decay_steps(t_k, df)
            if bp < warm:
                raise SystemExit(f"baseline length {t_k} decays at step {bp}, inside the {warm}-step warmup: "
                                 "use longer baselines")
            b["branch_from"], b["branch_step"] = f"{prefix}base-T{t_max}", bp
        bases.append(b)
    runs["baselines"] = bases
    # Checkpoint cadence C of the long run: the branch points' gcd when that is not too fine, else T_max/40. A
    # branch resumes from the long run's last checkpoint at or before its decay start (c = floor(b/C)*C) and
    # retrains the few stable steps up to b itself: bit-identical to resuming at b, since both schedules agree
    # on every step before b.
    decay_starts = sorted({b["branch_step"] for b in bases if b["branch_step"]})
    ck = None
    if decay_starts:
        ck = math.gcd(*decay_starts)
        if ck * 40 < t_max:
            ck = max(1, t_max // 40)
        if checkpoint_every:
            ck = checkpoint_every
    for b in bases:
        b["decay_start"] = b["branch_step"]
        if b["branch_step"]:
            b["branch_step"] = (b["branch_step"] // ck) * ck
            if b["branch_step"] == 0:  # no checkpoint before its decay: train it from scratch
                b["branch_from"], b["branch_step"] = None, None
    runs["checkpoint_every"] = ck
    return runs


def tokens_needed(steps: int, switch_fraction: float, bag_size: int, batch: int, seq_len: int) -> int:
    """Raw stream tokens a run reads (its windows' tails included)."""
    from tst_ops import schedule

    last = steps - 1
    s_last = schedule.bag_size_at(last, steps, switch_fraction, bag_size)
    return schedule.raw_tokens_before(last, steps, switch_fraction, bag_size, batch * seq_len) + \
        batch * s_last * seq_len + s_last


# ---------------------------------------------------------------------------------------------------------------
# Data: a token store folder (torch only), or any data.source through the project's data code
# ---------------------------------------------------------------------------------------------------------------
def is_packed(source: str) -> bool:
    """A token store folder (`tst data prepare`) given as data.source: read with torch only (the GPU machine)."""
    try:
        with open(os.path.join(source, "index.json")) as f:
            return json.load(f).get("format") == "tst-token-store"
    except (OSError, ValueError):
        return False


_PACKED: dict[str, dict] = {}


def load_packed_data(source: str) -> dict:
    if source not in _PACKED:
        from bench.gpu_check import load_store

        _PACKED[source] = load_store(source)
    return _PACKED[source]


def corpus_info(cfg) -> dict:
    """Train tokens, held-out tokens and vocabulary of the run's data (tokenizing and caching it if needed)."""
    if is_packed(cfg.data.source):
        h = load_packed_data(cfg.data.source)["header"]
        return {"train_tokens": h["train_tokens"], "val_tokens": h["val_tokens"], "vocab_size": h["vocab_size"],
                "tokenizer": h["tokenizer_sha256"], "documents": h.get("train_documents"), "packed": True}
    from pipeline.runner import prepare_data

    tok, source = prepare_data(cfg, os.path.abspath(cfg.run.output_dir), "memory")
    st = source.stats or {}
    return {"train_tokens": int(source.corpus_tokens), "val_tokens": int(source.store.tokens("val")),
            "vocab_size": int(tok.vocab_size), "tokenizer": tok.path, "documents": st.get("documents"),
            "val_documents": st.get("val_documents"), "packed": False}


def chunk_corpus(src: str, dst: str, max_chars: int = 2000, max_mb: Optional[float] = None, seed: int = 0) -> dict:
    """Split every document of a JSON Lines corpus folder into pieces of at most `max_chars` characters (at line
    breaks where possible), shuffle the pieces with a fixed seed and write them (up to `max_mb` MB) as JSONL shards.

    Why: the stream is contiguous and a step's windows are consecutive (docs/interfaces.md), so a document of
    1.6M characters (the kernel's "ABI testing symbols" page) fills ~250 consecutive steps of a 16 x 128 batch on
    its own: batches stop being mixtures, the training loss collapses on that one document and the held-out loss
    jumps (seen at 9.2 nats in a first attempt). Shuffled pieces make every step's batch a mixture again.
    """
    import glob
    import random

    files = sorted(glob.glob(os.path.join(src, "*.jsonl")))
    if not files:
        raise SystemExit(f"--chunk-corpus: no *.jsonl in {src} (build it with `tst data build-corpus --out {src}`)")
    pieces: list[tuple[str, str]] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                d = json.loads(line)
                text, source = d.get("text") or "", d.get("source", "")
                cur = ""
                for ln in text.splitlines(keepends=True):
                    while len(ln) > max_chars:  # a single over-long line: hard split
                        if cur:
                            pieces.append((cur, source))
                            cur = ""
                        pieces.append((ln[:max_chars], source))
                        ln = ln[max_chars:]
                    if len(cur) + len(ln) > max_chars and cur:
                        pieces.append((cur, source))
                        cur = ""
                    cur += ln
                if cur.strip():
                    pieces.append((cur, source))
    random.Random(seed).shuffle(pieces)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    budget = int(max_mb * 1e6) if max_mb else None
    written, n, shard, f = 0, 0, 0, None
    for text, source in pieces:
        if budget is not None and written >= budget:
            break
        if f is None or f.tell() > 32e6:
            if f:
                f.close()
            f = open(os.path.join(dst, f"corpus-{shard:05d}.jsonl"), "w", encoding="utf-8")
            shard += 1
        f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        written += len(text.encode("utf-8"))
        n += 1
    if f:
        f.close()
    info = {"src": src, "dst": dst, "max_chars": max_chars, "seed": seed, "pieces_total": len(pieces),
            "pieces_written": n, "mb": round(written / 1e6, 1), "shards": shard}
    with open(dst.rstrip("/") + ".json", "w") as g:  # beside the folder: every file inside it is read as data
        json.dump(info, g, indent=1)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Training one run
# ---------------------------------------------------------------------------------------------------------------
def _run_cfg(cfg, *, steps: int, bag_size: int, switch_fraction: float, name: str, checkpoint_every=None,
             keep=None, allow_resume_changes=False):
    c = cfg.copy()
    c.train.steps, c.data.bag_size, c.train.switch_fraction = steps, bag_size, switch_fraction
    c.run.name = name
    c.run.resume = True
    c.run.allow_resume_changes = allow_resume_changes
    if checkpoint_every:
        c.train.checkpoint_every = checkpoint_every
    if keep:
        c.train.keep_checkpoints = keep
    return c


def _train_packed(cfg, name: str, console: bool) -> dict:
    """The runner's Ray-free path (`pipeline.runner._fit_local`) on a token store folder, with torch only."""
    import torch

    from bench.gpu_check import make_source
    from pipeline.train.loop import LocalReporter, train
    from pipeline.train.metrics import MetricsSink

    data = load_packed_data(cfg.data.source)
    vocab = data["header"]["vocab_size"]
    if cfg.model.vocab_size is None:
        from pipeline.model.transformer import PRESETS

        cfg.model.vocab_size = max(PRESETS[cfg.model.preset]["vocab_size"], vocab)  # as gpu_check does
    run_dir = os.path.join(os.path.abspath(cfg.run.output_dir), "runs", name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    source = make_source(data, total_steps=cfg.train.steps, switch_fraction=cfg.train.switch_fraction,
                         bag_size=cfg.data.bag_size, seq_len=cfg.data.seq_len,
                         global_batch_size=cfg.train.global_batch_size, val_windows=cfg.data.val_windows)
    sink = MetricsSink(run_dir, cfg.train.steps, console=console)
    reporter = LocalReporter(run_dir, sink, keep=cfg.train.keep_checkpoints, resume=cfg.run.resume)
    device = torch.device("cuda") if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    t0 = time.perf_counter()
    summary = train(cfg, source, reporter, vocab_size=cfg.model.vocab_size, device=device)
    summary["wall_s"] = time.perf_counter() - t0
    summary["run_name"], summary["run_dir"] = name, run_dir
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary


def train_one(cfg, name: str, console: bool) -> dict:
    """One run through the Ray-free loop; returns its summary plus the load average around it."""
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedule warnings of short runs (the switch check stays in the log)
        if is_packed(cfg.data.source):
            summary = _train_packed(cfg, name, console)
        else:
            from pipeline.runner import run_training

            summary = run_training(cfg, use_ray=False, name=name, console=console)
    summary = dict(summary)
    summary["compute_s"] = time.perf_counter() - t0  # this process's time, start-up and data loading included
    summary["loadavg_start"], summary["loadavg_end"] = list(load0), list(os.getloadavg())
    summary["threads"] = cfg.train.threads
    p = os.path.join(summary.get("run_dir") or os.path.join(cfg.run.output_dir, "runs", name), "summary.json")
    if os.path.isfile(p):  # keep the load and process time with the run (read back by --reuse)
        with open(p) as f:
            on_disk = json.load(f)
        on_disk.update({k: summary[k] for k in ("compute_s", "loadavg_start", "loadavg_end", "threads")})
        with open(p, "w") as f:
            json.dump(on_disk, f, indent=1, default=str)
    if summary.get("status") not in (None, "finished"):
        raise SystemExit(f"run {name} did not finish: {summary.get('status')} {summary.get('message', '')}")
    return summary


def make_branch(out: str, long_name: str, name: str, branch_step: int) -> None:
    """A fresh run folder for a decay branch: the long run's checkpoint at `branch_step` and its metrics up to it."""
    root = os.path.join(out, "runs")
    src, dst = os.path.join(root, long_name), os.path.join(root, name)
    ck = os.path.join(src, "checkpoints", f"step_{branch_step:08d}")
    if not os.path.isdir(ck):
        raise SystemExit(f"the long baseline has no checkpoint at step {branch_step} ({ck}); "
                         "was it pruned? raise train.keep_checkpoints")
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(os.path.join(dst, "checkpoints"))
    def link_or_copy(a, b):  # checkpoint files are never rewritten after publishing: hard links are safe
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(ck, os.path.join(dst, "checkpoints", os.path.basename(ck)), copy_function=link_or_copy)
    copy_history(src, dst, branch_step)
    with open(os.path.join(dst, "BRANCH.json"), "w") as f:
        json.dump({"branched_from": long_name, "checkpoint": ck, "step": branch_step}, f, indent=1)


def copy_history(src_run: str, dst_run: str, upto_step: int) -> None:
    """A branch's metrics.jsonl: the source run's records up to `upto_step` (its final summary left out), so the
    branch's curve starts with the history it shares with the run it branched from."""
    with open(os.path.join(src_run, "metrics.jsonl")) as f, open(os.path.join(dst_run, "metrics.jsonl"), "w") as g:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("kind") != "final" and rec.get("step", 0) <= upto_step:
                g.write(line if line.endswith("\n") else line + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Model size and hardware
# ---------------------------------------------------------------------------------------------------------------
def model_info(cfg, vocab_size: int) -> dict:
    import torch

    from pipeline.model.transformer import Transformer, resolve_model_config

    mcfg = resolve_model_config(cfg.model, cfg.model.vocab_size or vocab_size)
    with torch.device("meta"):
        m = Transformer(mcfg)
    return {"preset": cfg.model.preset, "hidden_size": mcfg.hidden_size, "num_layers": mcfg.num_layers,
            "num_heads": mcfg.num_heads, "num_kv_heads": mcfg.num_kv_heads,
            "intermediate_size": mcfg.intermediate_size, "vocab_size": mcfg.vocab_size,
            "params": int(m.num_params()), "params_non_embedding": int(m.num_params(exclude_embedding=True)),
            "flops_per_position": int(m.flops_per_position(cfg.data.seq_len))}


def hardware_info(cfg) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "torch_threads": cfg.train.threads or torch.get_num_threads(), "platform": platform.platform()}
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------------------------
def run_speedup(setting: str = "cpu", *, bag_size: int = 6, switch_fraction: float = 0.3,
                steps: Optional[int] = None, lengths=DEFAULT_LENGTHS, mode: str = "branches",
                out: Optional[str] = None, overrides: Optional[list[str]] = None, console: bool = True,
                allow_repeat: bool = False, reuse: bool = False, command: Optional[str] = None,
                checkpoint_every: Optional[int] = None, compare_only: bool = False) -> dict:
    cfg = setting_config(setting, overrides)
    if out:
        cfg.run.output_dir = out
    out = os.path.abspath(cfg.run.output_dir)
    cfg.run.output_dir = out
    steps = steps or cfg.train.steps
    lengths = list(lengths)
    if 1.0 not in lengths:
        lengths.append(1.0)  # the same-length baseline: the equal-step difference needs it
    prefix = f"{setting}-"
    plan = plan_runs(cfg, steps=steps, bag_size=bag_size, switch_fraction=switch_fraction, lengths=lengths,
                     mode=mode, prefix=prefix, checkpoint_every=checkpoint_every)
    res_dir = os.path.join(out, setting)
    os.makedirs(res_dir, exist_ok=True)
    B, L = cfg.train.global_batch_size, cfg.data.seq_len
    say = print

    # -- data: large enough that no run repeats a token ------------------------------------------------------
    t0 = time.perf_counter()
    data = corpus_info(cfg)
    data["prepare_s"] = round(time.perf_counter() - t0, 1)
    need = {plan["tst"]["name"]: tokens_needed(steps, switch_fraction, bag_size, B, L)}
    for b in plan["baselines"]:
        need[b["name"]] = tokens_needed(b["steps"], 0.0, 1, B, L)
    epochs = {k: v / data["train_tokens"] for k, v in need.items()}
    say(f"[speedup] corpus {cfg.data.source}: {data['train_tokens']:,} train tokens "
        f"({data['val_tokens']:,} held out); token need per run: " +
        ", ".join(f"{k} {v:,} ({epochs[k]:.2f} ep)" for k, v in need.items()), flush=True)
    if max(epochs.values()) > 1.0 and not allow_repeat:
        raise SystemExit(f"[speedup] a run would read {max(epochs.values()):.2f} epochs of the corpus (repeated "
                         "data); use a larger corpus (`tst data build-corpus`), fewer steps or a smaller batch, or "
                         "pass --allow-repeat")
    vocab = data["vocab_size"]
    if data["packed"] and cfg.model.vocab_size is None:
        from pipeline.model.transformer import PRESETS

        vocab = max(PRESETS[cfg.model.preset]["vocab_size"], vocab)  # the rule of _train_packed / gpu_check
    minfo = model_info(cfg, vocab)
    say(f"[speedup] model {minfo['preset']} ({minfo['params'] / 1e6:.2f}M parameters, "
        f"{minfo['params_non_embedding'] / 1e6:.2f}M non-embedding, vocab {minfo['vocab_size']}); "
        f"{B}x{L} latent positions per step in every run; T={steps}, s={bag_size}, r={switch_fraction}; "
        f"baselines {[b['steps'] for b in plan['baselines']]} ({mode})", flush=True)

    # -- training --------------------------------------------------------------------------------------------
    summaries: dict[str, dict] = {}

    def done_before(name: str, n_steps: int) -> Optional[dict]:
        p = os.path.join(out, "runs", name, "summary.json")
        if (reuse or compare_only) and os.path.isfile(p):
            with open(p) as f:
                s = json.load(f)
            if s.get("status") == "finished" and s.get("step") == n_steps:
                return s
        return None

    def fresh(name: str) -> None:
        shutil.rmtree(os.path.join(out, "runs", name), ignore_errors=True)

    t_all = time.perf_counter()
    tst = plan["tst"]
    prev = done_before(tst["name"], steps)
    if prev is None and compare_only:
        raise SystemExit(f"--compare-only: the TST run {tst['name']} has not finished")
    if prev is None:
        fresh(tst["name"])
        say(f"[speedup] TST run {tst['name']}", flush=True)
        # the same checkpoint cadence as the long baseline (its branch points), so that checkpoint writes cost
        # both the same share of wall-clock
        ck = plan["checkpoint_every"]
        prev = train_one(_run_cfg(cfg, steps=steps, bag_size=bag_size, switch_fraction=switch_fraction,
                                  name=tst["name"], checkpoint_every=ck, keep=2), tst["name"], console)
    summaries[tst["name"]] = prev
    longest = plan["baselines"][-1]
    ordered = [longest] + [b for b in plan["baselines"] if b is not longest]
    missing = []
    for b in ordered:
        prev = done_before(b["name"], b["steps"])
        if prev is None and compare_only:
            missing.append(b["name"])
            continue
        if prev is None:
            if b["branch_from"]:
                make_branch(out, b["branch_from"], b["name"], b["branch_step"])
                say(f"[speedup] baseline {b['name']}: WSD decay branch of {b['branch_from']} from step "
                    f"{b['branch_step']}", flush=True)
                c = _run_cfg(cfg, steps=b["steps"], bag_size=1, switch_fraction=0.0, name=b["name"],
                             allow_resume_changes=True)
            else:
                fresh(b["name"])
                say(f"[speedup] baseline {b['name']}", flush=True)
                ck = plan["checkpoint_every"] if b is longest else None
                keep = (b["steps"] // ck + 2) if ck else None  # keep every checkpoint until the branches ran
                c = _run_cfg(cfg, steps=b["steps"], bag_size=1, switch_fraction=0.0, name=b["name"],
                             checkpoint_every=ck, keep=keep)
            prev = train_one(c, b["name"], console)
        summaries[b["name"]] = prev
    total_s = time.perf_counter() - t_all
    if missing:
        say(f"[speedup] --compare-only: not finished, left out of the comparison: {', '.join(missing)}")
        plan["baselines"] = [b for b in plan["baselines"] if b["name"] not in missing]
        if not plan["baselines"]:
            raise SystemExit("--compare-only: no finished baseline to compare with")

    # -- comparison -------------------------------------------------------------------------------------------
    res = compare(out, plan, res_dir, cfg)
    report = {
        "setting": setting, "command": command, "mode": mode,
        "tst": {"bag_size": bag_size, "switch_fraction": switch_fraction, "steps": steps},
        "baseline_steps": [b["steps"] for b in plan["baselines"]],
        "branches": {b["name"]: {"from": b["branch_from"], "step": b["branch_step"], "decay_start": b["decay_start"]}
                     for b in plan["baselines"] if b["branch_from"]},
        "checkpoint_every": plan["checkpoint_every"],
        "config": {k: v for k, v in cfg.flatten().items() if k.startswith(("model.", "data.", "train."))},
        "model": minfo, "data": data | {"tokens_needed": need, "epochs_needed": epochs},
        "hardware": hardware_info(cfg),
        "positions_per_step": B * L, "flops_per_step": minfo["flops_per_position"] * B * L,
        "runs": {k: _slim(v) for k, v in summaries.items()},
        "missing_baselines": missing,
        "total_compute_s": total_s,
        "comparison": res,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(os.path.join(res_dir, "speedup.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = markdown_table(report)
    with open(os.path.join(res_dir, "speedup.md"), "w") as f:
        f.write(md + "\n")
    say("")
    from pipeline.report.curves import format_table

    say(format_table(res))
    say("")
    say(md)
    say(f"\n[speedup] {res_dir}/speedup.json, speedup.md" + (", speedup.png" if res.get("figure") else ""))
    return report


def _slim(s: dict) -> dict:
    keys = ("step", "status", "final_val_loss", "final_train_loss", "raw_tokens", "epochs", "elapsed_s", "wall_s",
            "compute_s", "switch_step", "loadavg_start", "loadavg_end", "threads", "run_dir")
    return {k: s.get(k) for k in keys}


def compare(out: str, plan: dict, res_dir: str, cfg) -> dict:
    """compare_runs over the run folders, params set from the plan (no yaml needed), PNG when matplotlib is there."""
    from pipeline.report.compare import compare_runs
    from pipeline.report.runs import read_run_folder

    def load(name: str, steps: int, s: int, r: float):
        rc = read_run_folder(os.path.join(out, "runs", name))
        rc.name = name
        rc.params.update({"train.steps": steps, "train.switch_fraction": r, "data.bag_size": s,
                          "train.global_batch_size": cfg.train.global_batch_size, "data.seq_len": cfg.data.seq_len})
        return rc

    t = plan["tst"]
    tst = load(t["name"], t["steps"], t["bag_size"], t["switch_fraction"])
    bases = [load(b["name"], b["steps"], 1, 0.0) for b in plan["baselines"]]
    try:
        import matplotlib  # noqa: F401

        png = os.path.join(res_dir, "speedup.png")
    except ImportError:
        png = None
    return compare_runs(tst, bases, out=png, json_path=os.path.join(res_dir, "compare.json"), log_to_mlflow=False)


def markdown_table(rep: dict) -> str:
    """The results table for docs/results.md."""
    res = rep["comparison"]
    runs = rep["runs"]
    lines = ["| run | steps | s | r | final val loss | raw tokens | epochs | wall-clock (s) | load avg (start, end) |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = [("TST", res["tst"])] + [("baseline", b) for b in res["baselines"]]
    for role, r in rows:
        s = runs.get(r["name"], {})
        br = rep["branches"].get(r["name"])
        note = f" (decay branch from step {br['step']})" if br else ""
        la = s.get("loadavg_start") or [None]
        lb = s.get("loadavg_end") or [None]
        load = f"{la[0]:.1f}, {lb[0]:.1f}" if la[0] is not None and lb[0] is not None else "n/a"
        lines.append(
            f"| {role} `{r['name']}`{note} | {r['final_step']} | {r['bag_size'] or 1} | {r['switch_fraction'] or 0:g} "
            f"| {r['final_val_loss']:.4f} | {r['raw_tokens'] or 0:,.0f} | {s.get('epochs') or 0:.3f} "
            f"| {r['elapsed_s'] or 0:.0f} | {load} |")
    eq = res["equal_step"]
    sp = res["speedup"]
    lines.append("")
    if eq["diff_nats"] is not None:
        lines.append(f"- equal-step loss difference at step {eq['step']} (baseline {eq['baseline_loss']:.4f} − TST "
                     f"{eq['tst_loss']:.4f}): **{eq['diff_nats']:+.4f} nats** "
                     f"({'TST better' if eq['diff_nats'] > 0 else 'baseline better'})")
    lines.append(f"- iso-loss speedup (baselines' fully-decayed final points, target = TST's final loss "
                 f"{res['target_loss']:.4f}): **{sp['steps']['display']} in steps**, "
                 f"{sp['wall_clock']['display']} in wall-clock, {sp['flops']['display']} in FLOPs")
    if sp["steps"]["needed"] is not None:
        lines.append(f"  (a baseline needs {sp['steps']['needed']:.0f} steps to reach it; TST took "
                     f"{sp['steps']['tst']:.0f})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/speedup.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cpu",
                    help="cpu (~30 min, 2 cores), gpu (one H200, a few minutes) or tiny (smoke test)")
    ap.add_argument("--bag-size", type=int, default=6, help="TST bag size s (default 6)")
    ap.add_argument("--switch-fraction", type=float, default=0.3, help="TST switch fraction r (default 0.3)")
    ap.add_argument("--steps", type=int, default=None, help="T, TST's steps (default: the setting's train.steps)")
    ap.add_argument("--baseline-lengths", default=",".join(f"{x:g}" for x in DEFAULT_LENGTHS),
                    help="baseline lengths as multiples of T (default %(default)s; 1 is always added)")
    ap.add_argument("--baseline-mode", choices=("branches", "separate"), default="branches",
                    help="branches: WSD decay branches of the longest baseline (default); separate: each from scratch")
    ap.add_argument("--out", default=None, help="output dir: runs/ and <setting>/ (default: outputs/speedup)")
    ap.add_argument("--allow-repeat", action="store_true", help="allow runs that read more than one epoch")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs of the same name and length")
    ap.add_argument("--compare-only", action="store_true",
                    help="train nothing: compare the finished runs of the plan (unfinished baselines left out)")
    ap.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    ap.add_argument("--chunk-corpus", metavar="SRC",
                    help="prepare the data instead of training: split the JSONL corpus folder SRC (from `tst data "
                         "build-corpus`) into shuffled pieces of at most --chunk-chars characters, written to the "
                         "setting's data.source (or --chunk-out)")
    ap.add_argument("--chunk-chars", type=int, default=2000)
    ap.add_argument("--chunk-mb", type=float, default=None, help="write at most this many MB of pieces")
    ap.add_argument("--chunk-out", default=None)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=2e-3")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    cmd = "python bench/speedup.py " + " ".join(shlex.quote(a) for a in argv)
    if args.chunk_corpus:
        dst = args.chunk_out or setting_config(args.setting, args.overrides).data.source
        info = chunk_corpus(args.chunk_corpus, dst, args.chunk_chars, args.chunk_mb)
        print(json.dumps(info, indent=1))
        return 0
    run_speedup(args.setting, bag_size=args.bag_size, switch_fraction=args.switch_fraction, steps=args.steps,
                lengths=parse_lengths(args.baseline_lengths), mode=args.baseline_mode, out=args.out,
                overrides=args.overrides, console=not args.quiet, allow_repeat=args.allow_repeat, reuse=args.reuse,
                command=cmd, compare_only=args.compare_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
