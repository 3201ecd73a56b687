"""WSD decay branches: baselines of several lengths for about the price of the longest one.

An iso-loss speedup needs the loss a FULLY-DECAYED baseline reaches at several lengths T_k (a warmup-stable-decay
run's intermediate points are not decayed, so reading a speedup off one long curve is optimistic). Training each
length from scratch costs the sum of the lengths. A decay branch costs only its decay: with an absolute warmup
(train.warmup_steps) and a data position that depends on the step only, a run of T_k steps IS the longest run up
to the step where its own decay starts, b_k = T_k - round(decay_fraction * T_k) (the LR schedules coincide
there). So the longest baseline is trained once with checkpoints at a cadence C that hits the branch points, and
each shorter baseline is a new run folder holding the long run's checkpoint at floor(b_k / C) * C and its
metrics up to that step, resumed (`run.allow_resume_changes`, since T differs) and trained to T_k: its few
remaining stable steps, then its decay. Checked bit-for-bit against separately trained runs in
tests/test_speedup.py; a branch's wall-clock (`elapsed_s`) continues from the checkpoint's, so it is the
wall-clock a separate run of that length would have taken.

Only baselines branch (bag size 1 or switch fraction 0): a TST run's switch step moves with T.

    plan_baselines(cfg, steps, ...)      which runs: lengths, branch points, the long run's checkpoint cadence
    train_baselines(cfg, plan, out, ...) the longest run first, then every shorter one as a branch (or separately)
    train_branches(run_dir, steps)       branches of an already finished long baseline run folder (a `tst train`
                                         or `tst tune` trial), written beside it: `tst train-branches`
    make_branch(src_run, dst_run, step)  a branch's folder: the checkpoint (hard links) and the shared history
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Optional

from pipeline.config import ConfigError
from pipeline.errors import TSTError


def decay_start(steps: int, decay_fraction: float) -> int:
    """The first step of a T-step run's WSD decay: the last step before it has the stable LR of any longer run."""
    from tst_ops import schedule

    return steps - schedule.decay_steps(steps, decay_fraction)


def plan_baselines(cfg, steps: list[int], *, mode: str = "branches", prefix: str = "",
                   checkpoint_every: Optional[int] = None) -> dict:
    """The baselines of lengths `steps`, named `<prefix>base-T<steps>`, in increasing length; in branch mode every
    one but the longest is a decay branch of the longest (`branch_from`, `branch_step`: the checkpoint it resumes
    from; `decay_start`). The long run's checkpoint cadence `checkpoint_every` is the branch points' gcd when that
    is not too fine, else T_max/40 (or the one given): a branch resumes from the long run's last checkpoint at or
    before its decay start and retrains the few stable steps up to it itself, bit-identical to resuming there,
    since both schedules agree on every step before it. A branch with no checkpoint before it trains from scratch.
    Returns {"baselines": [...], "checkpoint_every": C or None}."""
    if mode not in ("branches", "separate"):
        raise ConfigError(f"baseline mode must be 'branches' or 'separate', got {mode!r}")
    df, warm = cfg.train.decay_fraction, cfg.train.warmup_steps
    base_steps = sorted({max(1, int(s)) for s in steps})
    t_max = base_steps[-1]
    bases = []
    for t_k in base_steps:
        b = {"name": f"{prefix}base-T{t_k}", "steps": t_k, "branch_from": None, "branch_step": None}
        if mode == "branches" and t_k < t_max:
            bp = decay_start(t_k, df)
            if bp < warm:
                raise ConfigError(f"baseline length {t_k} decays at step {bp}, inside the {warm}-step warmup: "
                                  "use longer baselines")
            b["branch_from"], b["branch_step"] = f"{prefix}base-T{t_max}", bp
        bases.append(b)
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
    return {"baselines": bases, "checkpoint_every": ck}


def run_config(cfg, *, steps: int, name: str, bag_size: Optional[int] = None,
               switch_fraction: Optional[float] = None, checkpoint_every: Optional[int] = None,
               keep: Optional[int] = None, allow_resume_changes: bool = False):
    """A copy of `cfg` for one run of a study: its length, name (resumed when its folder has a checkpoint), and
    optionally its s, r and checkpoint cadence / number kept."""
    c = cfg.copy()
    c.train.steps = steps
    if bag_size is not None:
        c.data.bag_size = bag_size
    if switch_fraction is not None:
        c.train.switch_fraction = switch_fraction
    c.run.name = name
    c.run.resume = True
    c.run.allow_resume_changes = allow_resume_changes
    if checkpoint_every:
        c.train.checkpoint_every = checkpoint_every
    if keep:
        c.train.keep_checkpoints = keep
    return c


def finished_run(out: str, name: str, steps: int) -> Optional[dict]:
    """The summary of `<out>/runs/<name>` when it finished all `steps`, else None."""
    p = os.path.join(out, "runs", name, "summary.json")
    try:
        with open(p) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None
    return s if s.get("status") == "finished" and s.get("step") == steps else None


# -- branch folders --------------------------------------------------------------------------------------------------
_STEP = re.compile(r"^step_(\d+)$")


def checkpoints_of(run_dir: str) -> dict[int, str]:
    """step -> checkpoint folder of a run, in either layout: `checkpoints/step_N` (the Ray-free loop) or `step_N`
    (Ray Train, whose storage folder is the run folder). Only complete checkpoints."""
    from pipeline.train.checkpoint import is_complete

    out = {}
    for root in (os.path.join(run_dir, "checkpoints"), run_dir):
        if os.path.isdir(root):
            for n in os.listdir(root):
                m = _STEP.match(n)
                p = os.path.join(root, n)
                if m and os.path.isdir(p) and is_complete(p):
                    out.setdefault(int(m.group(1)), p)
    return out


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


def make_branch(src_run: str, dst_run: str, step: int) -> None:
    """A fresh run folder `dst_run` for a decay branch of `src_run` from its checkpoint at `step`: the checkpoint
    (hard links where possible: checkpoint files are never rewritten after publishing), the metrics up to it, and
    BRANCH.json saying where it came from."""
    ck = checkpoints_of(src_run).get(step)
    if ck is None:
        raise TSTError(f"{src_run} has no complete checkpoint at step {step}; was it pruned? raise "
                       "train.keep_checkpoints")
    shutil.rmtree(dst_run, ignore_errors=True)
    os.makedirs(os.path.join(dst_run, "checkpoints"))

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(ck, os.path.join(dst_run, "checkpoints", f"step_{step:08d}"), copy_function=link_or_copy)
    copy_history(src_run, dst_run, step)
    with open(os.path.join(dst_run, "BRANCH.json"), "w") as f:
        json.dump({"branched_from": os.path.basename(os.path.normpath(src_run)), "checkpoint": ck, "step": step},
                  f, indent=1)


def train_branch(cfg, src_run: str, name: str, step: int, *, console: bool = True) -> dict:
    """Make the branch folder `<run.output_dir>/runs/<name>` from `src_run`'s checkpoint at `step` and train it
    to `cfg.train.steps` in this process (`cfg` is the branch's config: `run_config(..., allow_resume_changes=True)`)."""
    from pipeline.runner import run_paths, train_in_process

    make_branch(src_run, run_paths(cfg, name).run_dir, step)
    return train_in_process(cfg, name, console=console)


# -- the ladder of a study ---------------------------------------------------------------------------------------------
def train_baselines(cfg, plan: dict, out: str, *, console: bool = True, reuse: bool = False,
                    compare_only: bool = False, tag: str = "[study]") -> tuple[dict[str, dict], list[str]]:
    """Train the baselines of `plan_baselines` under `<out>/runs/` (the longest first, with the plan's checkpoint
    cadence and every checkpoint kept until its branches ran; then each shorter one as its branch, or from
    scratch). `cfg` is the study's shared config (bag size 1, r = 0 are set here). reuse / compare_only: keep
    finished runs of the same name and length; compare_only trains nothing and lists the missing ones.
    Returns ({name: summary}, [names of missing runs])."""
    summaries: dict[str, dict] = {}
    missing: list[str] = []
    longest = plan["baselines"][-1]
    ck = plan["checkpoint_every"]
    for b in [longest] + [b for b in plan["baselines"] if b is not longest]:
        prev = finished_run(out, b["name"], b["steps"]) if (reuse or compare_only) else None
        if prev is None and compare_only:
            missing.append(b["name"])
            continue
        if prev is None:
            if b["branch_from"]:
                print(f"{tag} baseline {b['name']}: WSD decay branch of {b['branch_from']} from step "
                      f"{b['branch_step']}", flush=True)
                c = run_config(cfg, steps=b["steps"], bag_size=1, switch_fraction=0.0, name=b["name"],
                               allow_resume_changes=True)
                prev = train_branch(c, os.path.join(out, "runs", b["branch_from"]), b["name"], b["branch_step"],
                                    console=console)
            else:
                shutil.rmtree(os.path.join(out, "runs", b["name"]), ignore_errors=True)
                print(f"{tag} baseline {b['name']}", flush=True)
                every = ck if b is longest else None
                keep = (b["steps"] // every + 2) if every else None  # every checkpoint kept until the branches ran
                c = run_config(cfg, steps=b["steps"], bag_size=1, switch_fraction=0.0, name=b["name"],
                               checkpoint_every=every, keep=keep)
                from pipeline.runner import train_in_process

                prev = train_in_process(c, b["name"], console=console)
        summaries[b["name"]] = prev
    return summaries, missing


# -- branches of a finished run ------------------------------------------------------------------------------------------
def read_run_config(run_dir: str):
    """The Config a run folder was trained with (config.yaml, or config.json where yaml was missing)."""
    from pipeline.config import Config, load_config

    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return load_config(os.path.join(run_dir, "config.yaml"))
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            return Config.from_dict(json.load(f))
    raise TSTError(f"{run_dir} has no config.yaml: not a run folder")


def branch_name(run_name: str, steps: int) -> str:
    return f"{run_name}-branch-T{steps}"


def train_branches(run_dir: str, steps: list[int], *, console: bool = True, reuse: bool = True,
                   names: Optional[dict[int, str]] = None) -> dict[int, dict]:
    """Decay branches of a finished (or running) long baseline run, at the lengths `steps` (< its T), trained here.

    `run_dir` is a run folder of `tst train` (Ray-free or Ray Train layout) or of a `tst tune` trial. Each branch
    `<run name>-branch-T<steps>` (or `names[steps]`) is written beside it, under the same runs/ folder, with the
    run's own config except its length; it resumes from the run's newest checkpoint at or before the branch's
    decay start, so the run must have kept one there: train the long run with `train.checkpoint_every` dividing
    (or at least below) the shortest branch's decay start and `train.keep_checkpoints` large enough (see
    `plan_baselines` for the cadence a ladder needs). With none left there, the branch is trained from scratch,
    which is the same run, only slower. Returns {steps: summary}; `tst compare TST_RUN RUN --branches` then
    compares TST with the run and every branch of it (their final points).
    """
    from pipeline.runner import train_in_process

    run_dir = os.path.abspath(run_dir.rstrip("/"))
    cfg = read_run_config(run_dir)
    t = cfg.train
    if cfg.data.bag_size > 1 and t.switch_fraction > 0:
        raise ConfigError(f"{run_dir} is a TST run (s={cfg.data.bag_size}, r={t.switch_fraction}); decay branches "
                          "need a baseline (its switch step would move with T)")
    bad = [s for s in steps if not 0 < int(s) < t.steps]
    if bad:
        raise ConfigError(f"branch lengths must be shorter than the run's {t.steps} steps, got {bad}")
    cfg.run.output_dir = os.path.dirname(os.path.dirname(run_dir))  # <output_dir>/runs/<name>
    cfg.run.storage_path = None
    ckpts = checkpoints_of(run_dir)
    run_name = os.path.basename(run_dir)
    out: dict[int, dict] = {}
    for s in sorted({int(x) for x in steps}):
        name = (names or {}).get(s) or branch_name(run_name, s)
        done = finished_run(cfg.run.output_dir, name, s) if reuse else None
        if done is not None:
            out[s] = done
            continue
        b = decay_start(s, t.decay_fraction)
        if b < t.warmup_steps:
            raise ConfigError(f"branch length {s} decays at step {b}, inside the {t.warmup_steps}-step warmup")
        at = max((k for k in ckpts if 0 < k <= b), default=None)
        c = run_config(cfg, steps=s, name=name, allow_resume_changes=True)
        if at is None:
            if console:
                print(f"[tst] branch {name}: no checkpoint of {run_name} at or before step {b}; training it from "
                      f"scratch", flush=True)
            shutil.rmtree(os.path.join(cfg.run.output_dir, "runs", name), ignore_errors=True)
            out[s] = train_in_process(c, name, console=console, quiet_warnings=False)
        else:
            if console:
                print(f"[tst] branch {name}: WSD decay branch of {run_name} from its step-{at} checkpoint "
                      f"(decay starts at {b})", flush=True)
            out[s] = train_branch(c, run_dir, name, at, console=console)
    return out


def branches_of(run_dir: str) -> list[str]:
    """The run folders beside `run_dir` that are decay branches of it (their BRANCH.json names it), by length."""
    run_dir = os.path.abspath(run_dir.rstrip("/"))
    name, root = os.path.basename(run_dir), os.path.dirname(run_dir)
    found = []
    for n in sorted(os.listdir(root)):
        p = os.path.join(root, n, "BRANCH.json")
        try:
            with open(p) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if meta.get("branched_from") in (name, run_dir) and "intervention" not in meta:
            found.append(os.path.join(root, n))
    return found
