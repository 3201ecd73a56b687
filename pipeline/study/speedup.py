"""The speedup study: the iso-loss speedup of TST over WSD baselines at equal FLOPs per step (bench/speedup.py is
its command line).

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
  wall-clock. --baseline-mode separate trains every length from scratch instead. (The branch machinery is
  `pipeline.study.branches`.)
  The lengths 0.5 and 0.75 are there so that a TST run that does WORSE than the same-length baseline still gets
  a measured (below 1x) iso-loss figure instead of an upper bound; they cost ~4% of the CPU budget as branches.
- The comparison (`pipeline.report` compare_runs, several baselines -> final-point mode): TST's final validation
  loss is the target; the baselines' final (step, loss) points are interpolated linearly to find the steps (and
  wall-clock, FLOPs) a fully-decayed baseline needs to reach it; the equal-step difference is the same-length
  (k = 1) baseline's final loss minus TST's (positive = TST better).

Data: a corpus large enough that no run repeats a token, cut into shuffled pieces of at most 2,000 characters
(`--chunk-corpus` / `tst data chunk-corpus`, see `pipeline.data.corpus.chunk_corpus`): the stream is contiguous, so without it a single 1.6M-character document
fills hundreds of consecutive batches and the comparison measures which document each run is in. TST reads (r*s + 1 - r) times the baseline's raw tokens
for the same steps (2.5x at s = 6, r = 0.3). The script computes every run's token need before training and
stops (unless --allow-repeat) if any run would read more than one epoch; each run's `epochs` is recorded.

Timing: the Ray-free loop in this process (`pipeline.runner.train_in_process`), `train.threads` torch threads on CPU,
MLflow tracking off (runs are compared from their folders `<out>/runs/NAME/`); wall-clock includes evaluations
and checkpoint writes, which are the same for TST and the baselines up to the long baseline's branch checkpoints.
The load average before and after each run is recorded (the machine may be shared).

The GPU setting (`--setting gpu`): the "125M" preset (GPT-2 vocabulary: 152.7M parameters), bf16 autocast, one
GPU, on a token store (`data.source` = a store folder from `tst data prepare`, as bench/gpu_check.py reads; the runner
reads it with torch only, so that the GPU machine needs nothing but PyTorch). `gpu_setting()` returns its config for other scripts.

Outputs under `<out>/` (default outputs/speedup): `runs/<setting>-.../` (one folder per run), and
`<setting>/speedup.json` (every figure: per-run summaries, load, hardware, comparison), `<setting>/speedup.png`
(the loss curves, baselines' final points, iso-loss point) and `<setting>/speedup.md` (the table).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.config import ConfigError
from pipeline.errors import TSTError

REPO = Path(__file__).resolve().parents[2]

DEFAULT_LENGTHS = (0.5, 0.75, 1.0, 1.5, 2.0)

# The settings as dotted overrides on the defaults of pipeline.config.Config. recipes/speedup_cpu.yaml and
# recipes/speedup_gpu.yaml hold the same values (tests/test_speedup.py checks that they agree); these dicts are
# what the study uses, so that the GPU machine needs no yaml.
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
        raise ConfigError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
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
        raise ConfigError(f"--baseline-lengths must be positive multiples of T, got {text!r}")
    return vals


def plan_runs(cfg, *, steps: int, bag_size: int, switch_fraction: float, lengths: list[float], mode: str,
              prefix: str, checkpoint_every: Optional[int] = None) -> dict:
    """The runs to train: TST, the baselines (lengths k*T) and, in branch mode, their branch points and the long
    run's checkpoint cadence (`pipeline.study.branches.plan_baselines`)."""
    from pipeline.study.branches import plan_baselines

    if not 0 < switch_fraction <= 1 or bag_size < 2:
        raise ConfigError("TST needs --bag-size >= 2 and 0 < --switch-fraction <= 1")
    runs = {"tst": {"name": f"{prefix}tst-s{bag_size}-r{switch_fraction:g}-T{steps}", "steps": steps,
                    "bag_size": bag_size, "switch_fraction": switch_fraction}}
    bp = plan_baselines(cfg, [int(round(k * steps)) for k in lengths], mode=mode, prefix=prefix,
                        checkpoint_every=checkpoint_every)
    for b in bp["baselines"]:
        b["length"] = b["steps"] / steps
    runs["baselines"], runs["checkpoint_every"] = bp["baselines"], bp["checkpoint_every"]
    return runs


def tokens_needed(steps: int, switch_fraction: float, bag_size: int, batch: int, seq_len: int) -> int:
    """Raw stream tokens a run reads (its windows' tails included)."""
    from tst_ops import schedule

    last = steps - 1
    s_last = schedule.bag_size_at(last, steps, switch_fraction, bag_size)
    return schedule.raw_tokens_before(last, steps, switch_fraction, bag_size, batch * seq_len) + \
        batch * s_last * seq_len + s_last


def corpus_info(cfg) -> dict:
    """Train tokens, held-out tokens and vocabulary of the run's data (tokenizing and caching it if needed)."""
    from pipeline.data import is_store_folder, store_folder_info

    if is_store_folder(cfg.data.source):
        h = store_folder_info(cfg.data.source)
        return {"train_tokens": h["train_tokens"], "val_tokens": h["val_tokens"], "vocab_size": h["vocab_size"],
                "tokenizer": h["tokenizer_sha256"], "documents": h.get("train_documents"), "packed": True}
    from pipeline.runner import prepare_data

    tok, source = prepare_data(cfg, os.path.abspath(cfg.run.output_dir), "memory")
    st = source.stats or {}
    return {"train_tokens": int(source.corpus_tokens), "val_tokens": int(source.store.tokens("val")),
            "vocab_size": int(tok.vocab_size), "tokenizer": tok.path, "documents": st.get("documents"),
            "val_documents": st.get("val_documents"), "packed": False}


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
# The whole study
# ---------------------------------------------------------------------------------------------------------------
def run_speedup(setting: str = "cpu", *, bag_size: int = 6, switch_fraction: float = 0.3,
                steps: Optional[int] = None, lengths=DEFAULT_LENGTHS, mode: str = "branches",
                out: Optional[str] = None, overrides: Optional[list[str]] = None, console: bool = True,
                allow_repeat: bool = False, reuse: bool = False, command: Optional[str] = None,
                checkpoint_every: Optional[int] = None, compare_only: bool = False) -> dict:
    """Train (or reuse) the TST run and the baselines of a setting, compare them, and write
    `<out>/<setting>/speedup.json`, `speedup.md` and `speedup.png` (see the module docstring). Returns the report."""
    from pipeline.model.transformer import model_summary, reference_vocab
    from pipeline.runner import train_in_process
    from pipeline.study.branches import finished_run, run_config, train_baselines

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
    config_flat = {k: v for k, v in cfg.flatten().items() if k.startswith(("model.", "data.", "train."))}

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
        raise TSTError(f"[speedup] a run would read {max(epochs.values()):.2f} epochs of the corpus (repeated "
                       "data); use a larger corpus (`tst data build-corpus`), fewer steps or a smaller batch, or "
                       "pass --allow-repeat")
    if data["packed"] and cfg.model.vocab_size is None:  # a store folder: the preset's own vocabulary if it covers
        cfg.model.vocab_size = reference_vocab(cfg.model.preset, data["vocab_size"])
    minfo = model_summary(cfg.model, data["vocab_size"], L)
    say(f"[speedup] model {minfo['preset']} ({minfo['params'] / 1e6:.2f}M parameters, "
        f"{minfo['params_non_embedding'] / 1e6:.2f}M non-embedding, vocab {minfo['vocab_size']}); "
        f"{B}x{L} latent positions per step in every run; T={steps}, s={bag_size}, r={switch_fraction}; "
        f"baselines {[b['steps'] for b in plan['baselines']]} ({mode})", flush=True)

    # -- training --------------------------------------------------------------------------------------------
    summaries: dict[str, dict] = {}
    t_all = time.perf_counter()
    tst = plan["tst"]
    prev = finished_run(out, tst["name"], steps) if (reuse or compare_only) else None
    if prev is None and compare_only:
        raise TSTError(f"--compare-only: the TST run {tst['name']} has not finished")
    if prev is None:
        shutil.rmtree(os.path.join(out, "runs", tst["name"]), ignore_errors=True)
        say(f"[speedup] TST run {tst['name']}", flush=True)
        # the same checkpoint cadence as the long baseline (its branch points), so that checkpoint writes cost
        # both the same share of wall-clock
        prev = train_in_process(run_config(cfg, steps=steps, bag_size=bag_size, switch_fraction=switch_fraction,
                                           name=tst["name"], checkpoint_every=plan["checkpoint_every"], keep=2),
                                tst["name"], console=console)
    summaries[tst["name"]] = prev
    base_runs, missing = train_baselines(cfg, plan, out, console=console, reuse=reuse, compare_only=compare_only,
                                         tag="[speedup]")
    summaries.update(base_runs)
    total_s = time.perf_counter() - t_all
    if missing:
        say(f"[speedup] --compare-only: not finished, left out of the comparison: {', '.join(missing)}")
        plan["baselines"] = [b for b in plan["baselines"] if b["name"] not in missing]
        if not plan["baselines"]:
            raise TSTError("--compare-only: no finished baseline to compare with")

    # -- comparison -------------------------------------------------------------------------------------------
    res = compare(out, plan, res_dir, cfg)
    report = {
        "setting": setting, "command": command, "mode": mode,
        "tst": {"bag_size": bag_size, "switch_fraction": switch_fraction, "steps": steps},
        "baseline_steps": [b["steps"] for b in plan["baselines"]],
        "branches": {b["name"]: {"from": b["branch_from"], "step": b["branch_step"], "decay_start": b["decay_start"]}
                     for b in plan["baselines"] if b["branch_from"]},
        "checkpoint_every": plan["checkpoint_every"],
        "config": config_flat,
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
