"""The crossover study's plan, jobs, comparisons and report (pipeline/study/crossover.py), on a toy model: the
plan's dependencies (TST and the ladder wait for the lr search), every job kind trained in-process, the ladder's
T-length decay branch bit-identical to the lr-search run it repeats, the comparison rows and the report files,
and resuming in a fresh checkout from the committed archive of finished runs alone."""

import csv
import os
import shutil

import torch

from pipeline.study import crossover as X
from pipeline.study import crossover_report as R
from pipeline.study.speedup import setting_config


def _small(size, seed, out, corpus, lr=1e-3):
    return setting_config("tiny", {
        "model.preset": size, "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
        "model.num_kv_heads": 1, "model.intermediate_size": 64, "train.seed": seed, "train.lr": lr,
        "data.source": corpus, "run.output_dir": out, "data.seq_len": 16, "train.global_batch_size": 2,
        "train.warmup_steps": 2, "train.eval_every": 10, "train.log_every": 1000, "data.val_windows": 4,
        "train.threads": 1})


def test_crossover_plan_jobs_and_report(tmp_path, monkeypatch):
    monkeypatch.setattr(X, "base_config", _small)
    monkeypatch.setattr(X, "T_FIRST", 40)
    monkeypatch.setattr(X, "GRID", ((4, 0.3), (6, 0.3)))  # two TST runs fewer than the study's grid
    out, corpus = str(tmp_path / "study"), "builtin:wiki"
    jobs, blocked = X.plan_jobs(out, corpus, ("tiny",))
    assert [j.key for j in jobs] == [X.lrsearch_name("tiny", lr) for lr in X.LRS]
    assert any("wait for the lr search" in b for b in blocked)
    ran = []
    while jobs:
        for j in jobs:
            X.run_job(j, out, corpus)
            ran.append((j.kind, j.key))
        jobs, blocked = X.plan_jobs(out, corpus, ("tiny",))
    lr = X.chosen_lr(out, "tiny")
    assert lr in X.LRS
    assert [k for k, _ in ran].count("ladder") == 1 and len(ran) == 3 + 1 + len(X.GRID)
    assert any("phase 2" in b for b in blocked)  # one size: no deciding pair
    # the ladder's T-length branch is the lr-search run at the chosen lr, bit for bit
    branch = X.finished(out, f"tiny-seed0-lr{lr:g}-base-T40", 40)
    assert branch["final_val_loss"] == X.finished(out, X.lrsearch_name("tiny", lr), 40)["final_val_loss"]
    # each run's summary.json names the machine its float32 numerics came from (bit-identical only on one machine)
    machine = X.finished(out, X.lrsearch_name("tiny", lr), 40)["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert len(machine["cpu_flags_sha256"]) == 12
    paper = X.compare_cell(out, corpus, "tiny", 0, 40, "paper")
    best = X.compare_cell(out, corpus, "tiny", 0, 40, "best")
    assert (paper["s"], paper["r"]) == X.PAPER and (best["s"], best["r"]) == X.chosen_tst(out, "tiny", lr)
    assert abs(paper["diff_nats"] - (paper["baseline_loss"] - paper["tst_loss"])) < 1e-9
    res = tmp_path / "results"
    rep = R.write_report(out, corpus, ("tiny",), str(res))
    with open(res / "crossover.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["paper", "best"] and rep["pending"] == []
    md = (res / "crossover.md").read_text()
    assert os.path.exists(res / "crossover.png") and "own best" in md
    # the curves around the switch: the paper run against the cell's T-step baseline, at each tenth of the run
    line = next(ln for ln in md.splitlines() if ln.startswith("| tiny | 0 |"))
    base = R._val_curve(out, f"tiny-seed0-lr{lr:g}-base-T40")
    tst = R._val_curve(out, X.tst_name("tiny", 0, lr, *X.PAPER, 40))
    assert "(first after switch)" in md and line.split("|")[-2].strip() == f"{base[40] - tst[40]:+.3f}"
    assert abs(base[40] - tst[40] - paper["diff_nats"]) < 1e-9

    # a later session's fresh checkout keeps only the committed archive (outputs/ is not committed)
    names = sorted(os.listdir(os.path.join(out, "runs")))
    assert X.archive_runs(out, str(res), names) == len(names)
    assert not any(os.path.exists(res / "runs" / n / "checkpoints") for n in names)
    fresh = str(tmp_path / "fresh")
    assert X.restore_runs(fresh, str(res)) == len(names) and X.restore_runs(fresh, str(res)) == 0
    assert X.plan_jobs(fresh, corpus, ("tiny",))[0] == []  # nothing is trained again
    again = X.compare_cell(fresh, corpus, "tiny", 0, 40, "paper")
    assert {k: again[k] for k in ("diff_nats", "speedup_steps", "tst_loss")} == \
        {k: paper[k] for k in ("diff_nats", "speedup_steps", "tst_loss")}
    # a branch lost: the restored longest baseline has no checkpoints, so the ladder job trains it again (the
    # same run, bit for bit) before the branch
    short = f"tiny-seed0-lr{lr:g}-base-T20"
    want = X.finished(fresh, short, 20)["final_val_loss"]
    shutil.rmtree(os.path.join(fresh, "runs", short))
    jobs, _ = X.plan_jobs(fresh, corpus, ("tiny",))
    assert [j.kind for j in jobs] == ["ladder"] and X._needs_retrain(fresh, jobs[0].plan)
    X.run_job(jobs[0], fresh, corpus)
    assert X.finished(fresh, short, 20)["final_val_loss"] == want
    # the ledger's CPU seconds: the last line a finished child printed; none for a job that did not finish
    log = tmp_path / "job.log"
    log.write_text("step 600/600\n[crossover] job x done, process CPU 412 s\n")
    assert X._cpu_of(str(log)) == 412.0 and X._cpu_of(str(tmp_path / "stopped.log")) is None
