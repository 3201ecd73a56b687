"""The crossover map (issue 19): where TST starts to pay, over model size and run length, at equal FLOPs per step,
with iso-loss speedups and seeds. bench/crossover.py is its command line.

    python bench/crossover.py --cpu-hours 5            # runs (or resumes) the plan in priority order
    python bench/crossover.py --report-only            # tables, CSV and figure from what is on disk

Why a module of its own: the study is a plan of cells with dependencies between them (a cell's TST runs use the
learning rate its baseline search chose; the seeds and T = 1500 reuse the choices made at T = 600, seed 0; the
second phase goes to the two sizes either side of the sign change, known only once phase 1 is measured), run two
at a time under a CPU budget and resumed across sessions. Everything that trains or compares is the package's:
`pipeline.runner.train_in_process` (the Ray-free loop `tst tune`'s local backend runs in each trial),
`pipeline.study.branches` (the WSD decay-branch baselines of `tst train-branches`), and `compare_runs` of
`tst compare` (through `pipeline.study.speedup.compare`, which also draws each cell's curves). Not `run_search`
(Ray Tune): a Tune grid adds a baseline per combination of the other keys and cannot express "TST at the lr the
baseline search picked" or the decay-branch ladder, and its trials run the same loop; here each job is a child
process (one torch thread) and finished work is found on disk, so an interrupted study resumes where it stopped.

The plan (constants below; all runs share the CPU setting of bench/speedup.py: seq 128, global batch 16, warmup
60 absolute, decay over the last 10% to 0.1x, AdamW wd 0.1, the 30 MB chunked corpus on lanes + shuffle):

- Phase 1, T = 600, seed 0, every size (tiny, 5M, 13M; 29M only when asked for with --sizes):
  the baseline's lr searched over LRS (three T-step runs, `...-lrsearch-lr<lr>-T600`); at the chosen lr the
  baselines of lengths 0.5, 0.75, 1, 1.5, 2 x T (the longest trained, the others its decay branches), TST at the
  paper's s = 6, r = 0.3, and, at 5.2M parameters and below, the TST grid s in {4, 6} x r in {0.2, 0.3}. TST runs
  use the baseline's chosen lr (the paper uses one set of hyperparameters for both).
- Phase 2, at the two deciding sizes: the adjacent pair of sizes (in parameter order) whose seed-0 T = 600
  equal-step differences (paper setting) change sign; with no sign change, the adjacent pair whose differences
  are closest to zero (sum of absolute values). In order: seeds 1 and 2 at T = 600 (the sign at T = 600 needs
  its noise before anything is built on it: one seed's spread at the tiny size was 0.08 nats), then T = 1500 at
  seed 0, then seeds 1 and 2 at T = 1500; each cell: baselines (ladder) at the size's chosen lr, TST paper, TST "own
  best" (the grid's lowest final loss at T = 600, seed 0: chosen on one seed, reported on the others; the paper
  setting where no grid ran). A seed changes the init and the data order (data.shuffle_seed follows train.seed).
- Every run's checkpoints land at the ladder's cadence (the branch points), so TST and baselines pay the same
  checkpoint writes and an interrupted run resumes from its last checkpoint.

Budget: a job is launched only when the seconds already spent in this invocation, plus the estimates of the
running jobs, plus its own estimate fit in --cpu-hours (and, with --stop-at, when it is expected to end before
then; at --stop-at running jobs are stopped, to resume next time). Estimates: measured CPU seconds per step of
that size (the ledger), else the nearest measured size's scaled by FLOPs, else tiny's 0.6 s/step scaled by FLOPs.
Jobs are taken strictly in priority order: when the next one does not fit, nothing later is started. Every job's
wall-clock and process CPU are appended to the results folder's ledger.jsonl (committed with the archive).

Outputs: <out>/runs/ (run folders), <out>/cells/<cell>/<variant>/ (each comparison's compare.json and curves),
<out>/logs/ (one log per job), and in the results folder: crossover.csv (one row per comparison),
crossover.md (plan status, lr search, TST grid, the size x T table with seed spreads), crossover.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from pipeline.errors import TSTError

ALL_SIZES = ("tiny", "5M", "13M", "29M")  # presets, in parameter order (pipeline/model/transformer.py)
DEFAULT_SIZES = ("tiny", "5M", "13M")
LRS = (5e-4, 1e-3, 2e-3)  # the baseline's lr search, the same three values at every size (set before any run)
PAPER = (6, 0.3)
GRID = ((4, 0.2), (4, 0.3), (6, 0.2), (6, 0.3))
GRID_MAX_PARAMS = 5_245_184  # the TST grid runs at 5.2M parameters and below (the priority)
T_FIRST, T_SECOND = 600, 1500
SEEDS = (0, 1, 2)
LENGTHS = (0.5, 0.75, 1.0, 1.5, 2.0)
PRIOR_S_PER_STEP = 0.6  # tiny, one thread, on the shared 2-core box (docs/results.md: 0.4-1 s)


# -- configs and names ---------------------------------------------------------------------------------------------
def base_config(size: str, seed: int, out: str, corpus: str, lr: float = 1e-3):
    """The shared config of a cell: the CPU setting of the speedup study at this size, seed, lr, one thread."""
    from pipeline.study.speedup import setting_config

    return setting_config("cpu", {"model.preset": size, "train.seed": seed, "train.lr": lr, "train.threads": 1,
                                  "data.source": corpus, "run.output_dir": out, "run.experiment": "tst-crossover"})


def params_of(size: str) -> dict:
    from pipeline.config import ModelConfig
    from pipeline.model.transformer import model_summary

    return model_summary(ModelConfig(preset=size), 4096, 128)


def prefix(size: str, seed: int) -> str:
    return f"{size}-seed{seed}-"


def lrsearch_name(size: str, lr: float) -> str:
    return f"{prefix(size, 0)}lrsearch-lr{lr:g}-T{T_FIRST}"


def tst_name(size: str, seed: int, lr: float, s: int, r: float, T: int) -> str:
    return f"{prefix(size, seed)}lr{lr:g}-tst-s{s}-r{r:g}-T{T}"


def ladder(cfg, size: str, seed: int, lr: float, T: int) -> dict:
    """The baselines of a cell (`plan_baselines`: lengths LENGTHS x T, decay branches of the longest)."""
    from pipeline.study.branches import plan_baselines

    return plan_baselines(cfg, [int(round(k * T)) for k in LENGTHS], prefix=f"{prefix(size, seed)}lr{lr:g}-")


# -- what is on disk -----------------------------------------------------------------------------------------------
def finished(out: str, name: str, steps: int) -> Optional[dict]:
    from pipeline.study.branches import finished_run

    return finished_run(out, name, steps)


def chosen_lr(out: str, size: str) -> Optional[float]:
    """The baseline's lr: the lowest final loss of the three T = 600, seed-0 search runs (None until all ran)."""
    losses = {lr: finished(out, lrsearch_name(size, lr), T_FIRST) for lr in LRS}
    if any(v is None for v in losses.values()):
        return None
    return min(LRS, key=lambda lr: losses[lr]["final_val_loss"])


def grid_sizes(sizes) -> list[str]:
    return [z for z in sizes if params_of(z)["params"] <= GRID_MAX_PARAMS]


def chosen_tst(out: str, size: str, lr: float) -> Optional[tuple[int, float]]:
    """TST's own best (s, r): the grid's lowest final loss at T = 600, seed 0 (the paper setting where no grid
    runs; None until the grid finished)."""
    if params_of(size)["params"] > GRID_MAX_PARAMS:
        return PAPER
    runs = {sr: finished(out, tst_name(size, 0, lr, *sr, T_FIRST), T_FIRST) for sr in GRID}
    if any(v is None for v in runs.values()):
        return None
    return min(GRID, key=lambda sr: runs[sr]["final_val_loss"])


# -- jobs ------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    key: str  # the run name (a "run") or the ladder's longest run name (a "ladder")
    kind: str  # run | ladder
    size: str
    seed: int
    T: int
    lr: float
    steps: int  # steps this job trains (estimate of its cost)
    s: int = 1
    r: float = 0.0
    phase: str = ""
    plan: dict = field(default_factory=dict)


def cell_jobs(out: str, corpus: str, size: str, seed: int, T: int, lr: float, variants, phase: str) -> list[Job]:
    """The ladder of baselines and the TST runs of one cell, unfinished ones only."""
    cfg = base_config(size, seed, out, corpus, lr)
    lad = ladder(cfg, size, seed, lr, T)
    jobs = []
    bases = lad["baselines"]
    if any(finished(out, b["name"], b["steps"]) is None for b in bases):
        longest = bases[-1]
        cost = longest["steps"] if finished(out, longest["name"], longest["steps"]) is None else 0
        cost += sum(b["steps"] - (b["branch_step"] or 0) for b in bases[:-1])
        jobs.append(Job(longest["name"], "ladder", size, seed, T, lr, cost, phase=phase, plan=lad))
    for s, r in dict.fromkeys(variants):
        name = tst_name(size, seed, lr, s, r, T)
        if finished(out, name, T) is None:
            jobs.append(Job(name, "run", size, seed, T, lr, T, s, r, phase, plan=lad))
    return jobs


def deciding_pair(out: str, corpus: str, sizes) -> Optional[tuple[str, str]]:
    """The two sizes either side of the sign change of the paper setting's seed-0, T = 600 equal-step difference
    (the closest-to-zero adjacent pair when the sign does not change); None until phase 1 is compared."""
    diffs = []
    for z in sizes:
        row = compare_cell(out, corpus, z, 0, T_FIRST, "paper")
        if row is None:
            return None
        diffs.append(row["diff_nats"])
    if len(sizes) < 2:
        return None
    pairs = list(range(len(sizes) - 1))
    flips = [i for i in pairs if (diffs[i] > 0) != (diffs[i + 1] > 0)]
    i = flips[0] if flips else min(pairs, key=lambda i: abs(diffs[i]) + abs(diffs[i + 1]))
    return sizes[i], sizes[i + 1]


def plan_jobs(out: str, corpus: str, sizes) -> tuple[list[Job], list[str]]:
    """Every unfinished job in priority order, and a list of what is blocked and why (not yet runnable jobs are
    not listed: they appear once what they depend on has finished)."""
    jobs: list[Job] = []
    blocked: list[str] = []
    grid_ok = set(grid_sizes(sizes))
    for z in sizes:  # phase 1
        for lr in LRS:
            name = lrsearch_name(z, lr)
            if finished(out, name, T_FIRST) is None:
                lad = ladder(base_config(z, 0, out, corpus, lr), z, 0, lr, T_FIRST)  # its checkpoint cadence
                jobs.append(Job(name, "run", z, 0, T_FIRST, lr, T_FIRST, phase="1 lr search", plan=lad))
        lr = chosen_lr(out, z)
        if lr is None:
            blocked.append(f"{z} T={T_FIRST} seed 0: TST and baselines wait for the lr search")
            continue
        variants = [PAPER] + ([sr for sr in GRID] if z in grid_ok else [])
        jobs += cell_jobs(out, corpus, z, 0, T_FIRST, lr, variants, "1 T=600")
    pair = deciding_pair(out, corpus, sizes)
    if pair is None:
        blocked.append("phase 2 (T=1500 and seeds 1, 2 at the two deciding sizes) waits for every size's T=600 cell")
        return jobs, blocked
    for seeds, T in (((1, 2), T_FIRST), ((0,), T_SECOND), ((1, 2), T_SECOND)):
        for seed in seeds:
            for z in pair:
                lr = chosen_lr(out, z)
                best = chosen_tst(out, z, lr)
                if best is None:
                    blocked.append(f"{z} T={T} seed {seed}: waits for the TST grid at T=600")
                    continue
                jobs += cell_jobs(out, corpus, z, seed, T, lr, [PAPER, best], f"2 T={T} seed {seed}")
    return jobs, blocked


# -- running a job (in a child process) --------------------------------------------------------------------------------
def _fresh_unless_checkpointed(out: str, name: str) -> None:
    """A run folder without a complete checkpoint restarts from scratch (nothing to resume from)."""
    from pipeline.study.branches import checkpoints_of

    d = os.path.join(out, "runs", name)
    if os.path.isdir(d) and not checkpoints_of(d):
        shutil.rmtree(d, ignore_errors=True)


# -- the archive: finished runs kept in the repository ---------------------------------------------------------------
ARCHIVED = ("config.yaml", "metrics.jsonl", "summary.json", "BRANCH.json")  # everything a comparison reads


def job_runs(job: Job) -> list[str]:
    """The run folders a job produces (a ladder: every baseline of its cell)."""
    return [job.key] if job.kind == "run" else [b["name"] for b in job.plan["baselines"]]


def archive_runs(out: str, results: str, names) -> int:
    """Copy the small files of finished runs (no checkpoints) to <results>/runs/<name>/. Why: the study spans
    sessions whose checkouts keep only what is committed (outputs/ is not), so the results folder, committed, is
    what a later session resumes from; a comparison needs only these files. Returns the number archived."""
    n = 0
    for name in names:
        src = os.path.join(out, "runs", name)
        sm = _summary(src)
        if sm is None or sm.get("status") != "finished":
            continue
        _copy_run(src, os.path.join(results, "runs", name))
        n += 1
    return n


def restore_runs(out: str, results: str) -> int:
    """Put archived finished runs back under <out>/runs/ where the run folder is missing or unfinished (a fresh
    checkout); they then count as finished for the plan, the comparisons and the report. Returns how many."""
    root = os.path.join(results, "runs")
    n = 0
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        sm = _summary(os.path.join(root, name))
        if sm is None or finished(out, name, sm.get("step")) is not None:
            continue
        _copy_run(os.path.join(root, name), os.path.join(out, "runs", name))
        n += 1
    return n


def _copy_run(src: str, dst: str) -> None:
    """The ARCHIVED files of one run folder, src -> dst (either way: archive or restore)."""
    os.makedirs(dst, exist_ok=True)
    for f in ARCHIVED:
        if os.path.exists(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def _summary(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _needs_retrain(out: str, plan: dict) -> bool:
    """A ladder's longest run restored from the archive has no checkpoints: its unfinished branches cannot start
    from it, so it is trained again (deterministic: the same run)."""
    from pipeline.study.branches import checkpoints_of

    longest = plan["baselines"][-1]
    have = checkpoints_of(os.path.join(out, "runs", longest["name"]))
    return any(finished(out, b["name"], b["steps"]) is None and b["branch_step"] not in have
               for b in plan["baselines"][:-1] if b["branch_from"])


def run_job(job: Job, out: str, corpus: str) -> None:
    """Train one job in this process: a single run (resumed from its checkpoint if interrupted), or a ladder (the
    longest baseline, resumed likewise, then its decay branches through `train_baselines`)."""
    from pipeline.runner import train_in_process
    from pipeline.study.branches import run_config, train_baselines

    cfg = base_config(job.size, job.seed, out, corpus, job.lr)
    ck = job.plan["checkpoint_every"]
    if job.kind == "run":
        _fresh_unless_checkpointed(out, job.key)
        c = run_config(cfg, steps=job.T, bag_size=job.s, switch_fraction=job.r, name=job.key, checkpoint_every=ck,
                       keep=2)
        train_in_process(c, job.key, console=True)
        return
    longest = job.plan["baselines"][-1]
    if finished(out, longest["name"], longest["steps"]) is not None and _needs_retrain(out, job.plan):
        shutil.rmtree(os.path.join(out, "runs", longest["name"]), ignore_errors=True)
    if finished(out, longest["name"], longest["steps"]) is None:
        _fresh_unless_checkpointed(out, longest["name"])
        c = run_config(cfg, steps=longest["steps"], bag_size=1, switch_fraction=0.0, name=longest["name"],
                       checkpoint_every=ck, keep=longest["steps"] // ck + 2)
        train_in_process(c, longest["name"], console=True)
    train_baselines(cfg, job.plan, out, console=True, reuse=True, tag="[crossover]")


def _child(job: Job, out: str, corpus: str, log: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    t0 = time.process_time()
    run_job(job, out, corpus)
    print(f"[crossover] job {job.key} done, process CPU {time.process_time() - t0:.0f} s", flush=True)


# -- the scheduler --------------------------------------------------------------------------------------------------
def seconds_per_step(out: str, size: str, ledger: Optional[str] = None) -> float:
    """Median CPU seconds per step of this size's finished full runs in the ledger (process CPU: wall-clock
    overstated it 2.5x when the machine was shared), else the median wall-clock per step of its finished runs
    in the study (branches left out: they start from a checkpoint); a size with neither: the nearest measured
    size's rate scaled by FLOPs per position, else the tiny prior scaled the same way."""
    rate = _measured_s_per_step(out, size, ledger)
    if rate is not None:
        return rate
    flops = params_of(size)["flops_per_position"]
    measured = [(abs(math.log(params_of(o)["flops_per_position"] / flops)), o) for o in ALL_SIZES if o != size]
    for _, other in sorted(measured):
        r = _measured_s_per_step(out, other, ledger)
        if r is not None:
            return r * flops / params_of(other)["flops_per_position"]
    return PRIOR_S_PER_STEP * flops / params_of("tiny")["flops_per_position"]


def _measured_s_per_step(out: str, size: str, ledger: Optional[str]) -> Optional[float]:
    rates = [rec["cpu_s"] / rec.get("steps", rec["T"])  # a "run" trains T steps
             for rec in (read_ledger(ledger) if ledger else [])
             if rec.get("size") == size and rec.get("kind") == "run" and rec.get("exitcode") == 0
             and rec.get("cpu_s")]
    if rates:
        return statistics.median(rates)
    root = os.path.join(out, "runs")
    for n in os.listdir(root) if os.path.isdir(root) else []:
        if not n.startswith(f"{size}-") or os.path.exists(os.path.join(root, n, "BRANCH.json")):
            continue
        sm = _summary(os.path.join(root, n)) or {}
        if sm.get("status") == "finished" and sm.get("compute_s") and sm.get("step"):
            rates.append(sm["compute_s"] / sm["step"])
    return statistics.median(rates) if rates else None


def check_corpus(out: str, corpus: str, sizes) -> dict:
    """Prepare (or find) the token store once, before any child starts, and refuse a plan whose longest runs
    would read more than one epoch (the study must not repeat data)."""
    from pipeline.study.speedup import corpus_info, tokens_needed

    cfg = base_config(sizes[0], 0, out, corpus)
    info = corpus_info(cfg)
    B, L = cfg.train.global_batch_size, cfg.data.seq_len
    need = max(tokens_needed(T_SECOND, PAPER[1], PAPER[0], B, L),
               tokens_needed(int(LENGTHS[-1] * T_SECOND), 0.0, 1, B, L))
    info["max_epochs_needed"] = need / info["train_tokens"]
    if info["max_epochs_needed"] > 1.0:
        raise TSTError(f"[crossover] the longest run would read {info['max_epochs_needed']:.2f} epochs of "
                       f"{corpus}: chunk a larger corpus (tst data chunk-corpus --mb ...)")
    return info


def run_study(out: str, corpus: str, *, sizes=DEFAULT_SIZES, cpu_hours: float = 5.0, workers: int = 2,
              stop_at: Optional[float] = None, start_partial: bool = False, results: Optional[str] = None,
              command: str = "") -> dict:
    """Run (or resume) the plan under the budget, two children at a time, then write the report. start_partial:
    start jobs that --stop-at will cut (they keep their checkpoints and resume next time). A SIGTERM (e.g. from
    `timeout`) stops the running jobs the same way and records them in the ledger."""
    import multiprocessing as mp
    import signal

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)

    out = os.path.abspath(out)
    for d in ("runs", "logs"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    info = check_corpus(out, corpus, sizes)
    print(f"[crossover] corpus {info['train_tokens']:,} train tokens; the longest run reads "
          f"{info['max_epochs_needed']:.2f} epoch", flush=True)
    results = results or os.path.join(out, "results")
    restored = restore_runs(out, results)
    if restored:
        print(f"[crossover] {restored} finished runs restored from {results}/runs", flush=True)
    budget, spent = cpu_hours * 3600.0, 0.0
    ctx = mp.get_context("spawn")
    running: dict[str, tuple] = {}  # key -> (process, job, t0, estimate)
    failed: set[str] = set()
    ledger = os.path.join(results, "ledger.jsonl")  # with the archive: the CPU time of every session
    stopped = False
    try:
        while True:
            for key, (p, job, t0, est) in list(running.items()):
                if p.is_alive():
                    continue
                p.join()
                wall = time.time() - t0
                spent += wall
                del running[key]
                if p.exitcode == 0:
                    archive_runs(out, results, job_runs(job))
                else:  # most likely a bug every later job shares: start nothing more
                    failed.add(key)
                    stopped = True
                    print(f"[crossover] {key} failed: no new jobs (fix it and rerun: the study resumes)",
                          flush=True)
                _append(ledger, {"job": key, "kind": job.kind, "size": job.size, "T": job.T, "seed": job.seed,
                                 "steps": job.steps, "start_utc": _utc(t0), "wall_s": round(wall, 1),
                                 "cpu_s": _cpu_of(os.path.join(out, "logs", f"{key}.log")),
                                 "estimate_s": round(est), "exitcode": p.exitcode, "command": command})
                print(f"[crossover] {key}: {'done' if p.exitcode == 0 else 'FAILED, see logs'} in {wall:.0f} s "
                      f"(estimated {est:.0f} s); spent {spent / 3600:.2f} of {cpu_hours:g} CPU-h", flush=True)
            if stop_at and time.time() >= stop_at and running:
                print("[crossover] --stop-at reached: stopping the running jobs (they resume next time)", flush=True)
                spent += _stop_running(running, ledger, command)
                stopped = True
                break
            jobs, blocked = plan_jobs(out, corpus, sizes)
            jobs = [j for j in jobs if j.key not in running and j.key not in failed]
            while jobs and len(running) < workers and not stopped:
                j = jobs[0]
                est = j.steps * seconds_per_step(out, j.size, ledger)
                committed = spent + sum(max(e, time.time() - t0) for _, _, t0, e in running.values())
                if committed + est > budget or (stop_at and not start_partial and time.time() + est > stop_at):
                    why = "the CPU budget" if committed + est > budget else "--stop-at"
                    print(f"[crossover] next job {j.key} (~{est / 60:.0f} min) does not fit {why}: no new jobs",
                          flush=True)
                    stopped = True
                    break
                log = os.path.join(out, "logs", f"{j.key}.log")
                p = ctx.Process(target=_child, args=(j, out, corpus, log), name=j.key)
                p.start()
                running[j.key] = (p, j, time.time(), est)
                print(f"[crossover] start {j.key} ({j.kind}, phase {j.phase}, {j.steps} steps, "
                      f"~{est / 60:.0f} min; log {log})", flush=True)
                jobs = jobs[1:]
            if not running:
                if not jobs and not stopped:
                    print("[crossover] nothing left to run" + (": " + "; ".join(blocked) if blocked else ""),
                          flush=True)
                break
            time.sleep(5)
    except KeyboardInterrupt as e:
        print(f"[crossover] interrupted ({e}): stopping the running jobs (they resume next time)", flush=True)
        spent += _stop_running(running, ledger, command)
    from pipeline.study.crossover_report import write_report

    return write_report(out, corpus, sizes, results, spent_s=spent, command=command)


def compare_cell(out: str, corpus: str, size: str, seed: int, T: int, variant: str) -> Optional[dict]:
    """One comparison row (TST `variant` = paper | best against the cell's ladder), computed from the run folders
    once all of them finished; None before. Cached in <out>/cells/<cell>/<variant>/row.json."""
    lr = chosen_lr(out, size)
    if lr is None:
        return None
    sr = PAPER if variant == "paper" else chosen_tst(out, size, lr)
    if sr is None:
        return None
    cfg = base_config(size, seed, out, corpus, lr)
    lad = ladder(cfg, size, seed, lr, T)
    name = tst_name(size, seed, lr, *sr, T)
    if finished(out, name, T) is None or any(finished(out, b["name"], b["steps"]) is None
                                             for b in lad["baselines"]):
        return None
    cell = os.path.join(out, "cells", f"{size}-T{T}-seed{seed}", variant)
    cache = os.path.join(cell, "row.json")
    try:
        with open(cache) as f:
            row = json.load(f)
        if row.get("tst_run") == name:
            return row
    except (OSError, ValueError):
        pass
    from pipeline.study.speedup import compare

    os.makedirs(cell, exist_ok=True)
    plan = {"tst": {"name": name, "steps": T, "bag_size": sr[0], "switch_fraction": sr[1]},
            "baselines": lad["baselines"]}
    res = compare(out, plan, cell, cfg)
    pm = params_of(size)
    sp = res["speedup"]
    row = {"size": size, "params": pm["params"], "params_non_embedding": pm["params_non_embedding"], "T": T,
           "seed": seed, "lr": lr, "variant": variant, "s": sr[0], "r": sr[1], "tst_run": name,
           "tst_loss": res["equal_step"]["tst_loss"], "baseline_loss": res["equal_step"]["baseline_loss"],
           "diff_nats": res["equal_step"]["diff_nats"],
           "speedup_steps": sp["steps"]["ratio"], "speedup_steps_display": sp["steps"]["display"],
           "baseline_steps_needed": sp["steps"]["needed"], "speedup_wall": sp["wall_clock"]["ratio"],
           "speedup_wall_display": sp["wall_clock"]["display"], "speedup_flops": sp["flops"]["ratio"],
           "tst_wall_s": sp["wall_clock"]["tst"],
           "chosen_on": "" if variant == "paper" else "the grid at T=600, seed 0"
           if pm["params"] <= GRID_MAX_PARAMS else "no grid at this size: the paper setting"}
    with open(cache, "w") as f:
        json.dump(row, f, indent=1)
    return row


def _stop_running(running: dict, ledger: str, command: str) -> float:
    """Terminate the running children (a run stopped mid-way resumes from its last checkpoint next time), record
    them in the ledger as stopped; returns their seconds."""
    total = 0.0
    for key, (p, job, t0, est) in running.items():
        p.terminate()
    for key, (p, job, t0, est) in list(running.items()):
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
        wall = time.time() - t0
        total += wall
        _append(ledger, {"job": key, "kind": job.kind, "size": job.size, "T": job.T, "seed": job.seed,
                         "start_utc": _utc(t0), "wall_s": round(wall, 1), "estimate_s": round(est),
                         "exitcode": "stopped", "command": command})
        print(f"[crossover] stopped {key} after {wall:.0f} s", flush=True)
    running.clear()
    return total


def _cpu_of(log: str) -> Optional[float]:
    """The process CPU seconds a finished child printed last in its log (its wall-clock overstates the CPU when
    the cores are shared); None when it did not finish."""
    try:
        with open(log, errors="replace") as f:
            lines = [ln for ln in f if "done, process CPU" in ln]
        return float(lines[-1].rsplit("CPU", 1)[1].split()[0]) if lines else None
    except (OSError, ValueError, IndexError):
        return None


def read_ledger(path: str) -> list[dict]:
    """The ledger's records, oldest first ([] before the first job)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def sd(xs) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else math.nan
