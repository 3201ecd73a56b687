"""`tst tune`: real Ray Tune searches of real training runs, tracked in real MLflow stores.

- Spec, grid and naming rules (no Ray): the baseline's spellings merge into one trial and it is always there,
  FLOPs-changing keys are refused, the ASHA grace starts after the latest switch; sample mode's searcher
  suggests the baseline first and keeps it out of Optuna's study; names pickled by searches started before
  tune/search.py was split still resolve.
- A 4-trial grid (baseline + 3) on the bundled corpus, interrupted with SIGINT (Ctrl+C) after two trials
  finished, then restored by running the same search again: finished trials are not rerun, the MLflow store
  (SQLite) holds the parent and exactly 4 children with the right params and a finite final validation loss, the
  parent holds the CSV, table, heatmap and curves, and the printed table is the paper's layout.
- The TorchTrainer backend (Train V2 inside a Tune trial) gives the same losses as the one-process trials.
- Through `tst tune` (CLI, YAML spec) against a real `mlflow server` on loopback: sample mode (Optuna, baseline
  first) with ASHA cutting a trial after the switch + grace: the cut trial's child run is KILLED, not RUNNING.
"""

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from pipeline.config import Config, ConfigError, apply_overrides  # noqa: E402
from pipeline.local_cluster import mlflow_server_env  # noqa: E402
from pipeline.ray_env import free_ports  # noqa: E402

TINY = [
    "model.preset=tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "data.source=builtin:wiki", "data.max_documents=300", "data.tokenizer=bpe:512", "data.seq_len=32",
    "data.val_windows=8",
    "train.steps=12", "train.global_batch_size=4", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=4",
    "train.eval_every=4", "train.checkpoint_every=100",
    "scaling.num_workers=1", "scaling.cpus_per_worker=0.5",
]
T = 12


# -- rules, no Ray ------------------------------------------------------------------------------------------
def test_grid_merges_baseline_spellings_and_always_has_the_baseline():
    from tune.space import grid_points, is_baseline, parse_space, point_label

    base = apply_overrides(Config(), TINY)
    flat = base.flatten()
    dims, fixed = parse_space({"data.bag_size": [1, 2, 4], "train.switch_fraction": {"grid": [0, 0.3]}}, base)
    pts = grid_points(dims, fixed, base)
    assert [point_label(p, [d.key for d in dims], flat) for p in pts] == ["baseline", "s2-r0.3", "s4-r0.3"]
    assert pts[0] == {"data.bag_size": 1, "train.switch_fraction": 0.0}
    # no s=1 / r=0 in the space: the baseline is added anyway
    dims, fixed = parse_space({"data.bag_size": [2, 3], "train.switch_fraction": [0.25]}, base)
    pts = grid_points(dims, fixed, base)
    assert sum(is_baseline(p, flat) for p in pts) == 1 and len(pts) == 3
    # a baseline per learning rate; weights do not split the baseline
    dims, fixed = parse_space({"data.bag_size": [1, 4], "train.switch_fraction": [0.3], "train.lr": [1e-3, 3e-3],
                               "train.loss_weights": ["uniform", "power"]}, base)
    pts = grid_points(dims, fixed, base)
    labels = sorted(point_label(p, [d.key for d in dims], flat) for p in pts)
    assert labels == ["baseline-lr0.001", "baseline-lr0.003", "s4-r0.3-lr0.001-wpower", "s4-r0.3-lr0.001-wuniform",
                      "s4-r0.3-lr0.003-wpower", "s4-r0.3-lr0.003-wuniform"]


def test_space_refuses_flops_keys_and_bad_values():
    from tune.space import parse_space

    base = apply_overrides(Config(), TINY)
    for key in ("train.steps", "train.global_batch_size", "data.seq_len", "model.hidden_size"):
        with pytest.raises(ConfigError, match="equal FLOPs"):
            parse_space({key: [1, 2]}, base)
    with pytest.raises(ConfigError, match="switch_fraction"):
        from tune.space import grid_points

        grid_points(*parse_space({"train.switch_fraction": [0.3, 1.5]}, base), base)
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_space({"train.switch_fractoin": [0.3]}, base)
    dims, _ = parse_space({"train.switch_fraction": {"uniform": [0.1, 0.5]}, "data.bag_size": {"randint": [2, 8]}},
                          base)
    assert [(d.kind, d.args) for d in dims] == [("uniform", [0.1, 0.5]), ("randint", [2, 8])]


def test_asha_grace_starts_after_the_latest_switch():
    from tune.schedule import asha_grace
    from tune.space import parse_space

    base = apply_overrides(Config(), TINY + ["train.steps=200"])
    dims, _ = parse_space({"train.switch_fraction": [0.0, 0.2, 0.4], "data.bag_size": [2, 4]}, base)
    assert asha_grace(dims, base, 30) == 80 + 30  # switch step of r=0.4 at T=200, then 30 recovery steps
    dims, _ = parse_space({"train.switch_fraction": {"uniform": [0.1, 0.45]}}, base)
    assert asha_grace(dims, base, 0) == 90


def test_sample_mode_suggests_the_baseline_first_and_keeps_it_out_of_the_study():
    """Under the ConcurrencyLimiter that max_concurrent_trials wraps it in: trial 0 is the baseline (s=1, r=0, the
    base lr), even with s and r one-value choices that exclude it; then Optuna's points, none of them the baseline;
    the baseline's result never reaches Optuna's study (it is not a point of the space)."""
    from ray.tune.search import ConcurrencyLimiter

    from tune.schedule import make_searcher
    from tune.space import SearchSpec, parse_space

    base = apply_overrides(Config(), TINY)
    space = {"data.bag_size": {"grid": [2]}, "train.switch_fraction": {"grid": [0.25]},
             "train.lr": {"loguniform": [1e-6, 2e-6]}}
    dims, _ = parse_space(space, base)
    searcher = make_searcher(SearchSpec(mode="sample", space=space), dims, base.flatten())
    told = []  # what the wrapped Optuna searcher is told about finished trials
    optuna_complete = searcher.searcher.on_trial_complete
    searcher.searcher.on_trial_complete = lambda tid, **kw: (told.append(tid), optuna_complete(tid, **kw))
    limited = ConcurrencyLimiter(searcher, max_concurrent=1)
    assert limited.set_search_properties("val_loss", "min", {"trial": {"overrides": {d.key: d.domain()
                                                                                    for d in dims}}})
    first = limited.suggest("t_00000")["trial"]
    assert first == {"overrides": {"data.bag_size": 1, "train.switch_fraction": 0.0, "train.lr": 3e-3},
                     "baseline": True}
    assert limited.suggest("t_00001") is None  # max_concurrent=1: nothing more until the baseline ends
    limited.on_trial_complete("t_00000", {"val_loss": 5.0})
    for i in range(1, 4):
        ov = limited.suggest(f"t_{i:05d}")["trial"]["overrides"]
        assert ov["data.bag_size"] == 2 and ov["train.switch_fraction"] == 0.25 and 1e-6 <= ov["train.lr"] <= 2e-6
        limited.on_trial_complete(f"t_{i:05d}", {"val_loss": 6.0})
    assert told == ["t_00001", "t_00002", "t_00003"]


def test_names_pickled_by_searches_from_before_the_split_still_resolve():
    """Searches started before tune/search.py was split pickled `tune.search.<name>` (tuner.pkl: scheduler,
    search algorithm, trial name creators, callbacks; experiment_state: trial_dirname): restoring one, or reading
    its trials for the table, unpickles these."""
    import pickle

    from tune import schedule, search, space, trial

    for name, where in (("trial_dirname", space), ("BaselineFirst", schedule), ("BaselineKeepingASHA", schedule),
                        ("tst_trial", trial), ("Progress", search)):
        assert pickle.loads(f"ctune.search\n{name}\n.".encode()) is getattr(where, name)


def test_cli_builds_the_spec_from_flags(tmp_path):
    import argparse

    from tune.cli import build_spec, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["tune", "--grid", "data.bag_size=1,2", "train.switch_fraction=0,0.3",
                              "--output-dir", str(tmp_path), "train.steps=20"])
    spec = build_spec(args)
    assert spec.mode == "grid" and spec.space == {"data.bag_size": {"grid": ["1", "2"]},
                                                  "train.switch_fraction": {"grid": ["0", "0.3"]}}
    assert "train.steps=20" in spec.overrides and spec.name.startswith("tune-tiny-")
    assert build_spec(args).name == spec.name  # same command, same name: it resumes
    args = parser.parse_args(["tune", "--sample", "train.switch_fraction=uniform:0.1:0.5"])
    assert build_spec(args).mode == "sample"


# -- real searches ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback. Launched when the module's first search starts (it takes tens of
    seconds to come up on a busy 2-core machine, so its start overlaps that search), waited for when used."""
    root = tmp_path_factory.mktemp("mlflow_server")
    (port,) = free_ports(1)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port",
         str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=mlflow_server_env())
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "proc": proc, "log": root / "server.log"}
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this fixture started (server + its uvicorn workers)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _wait_healthy(server, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert server["proc"].poll() is None, open(server["log"]).read()[-2000:]
        try:
            if urllib.request.urlopen(server["url"] + "/health", timeout=2).read():
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not come up: " + open(server["log"]).read()[-2000:])


class InterruptAfter(tune.Callback):
    """Ctrl+C once, after N trials finished (Tune catches SIGINT, saves the search's state and returns). Tune
    pickles it into the search's tuner.pkl, so a restore brings it back: the marker file keeps it from firing twice."""

    def __init__(self, n, marker):
        self.n, self.marker, self.done = n, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done >= self.n and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def grid_search(ray_session, mlflow_server, tmp_path_factory):
    """Baseline + 3 TST trials, interrupted after 2 finished, then restored to the end (run once, shared)."""
    from tune.search import run_search
    from tune.space import SearchSpec

    out = tmp_path_factory.mktemp("tune_grid")
    spec = SearchSpec(overrides=TINY + [f"run.output_dir={out}"], name="grid4", mode="grid",
                      space={"data.bag_size": [2, 3, 4], "train.switch_fraction": [0.0, 0.4]})
    marker = str(out / "interrupted")
    t0 = time.time()
    first = run_search(spec, console=False, callbacks=[InterruptAfter(2, marker)])
    t1 = time.time()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        second = run_search(spec, console=True)
    return {"first": first, "second": second, "printed": buf.getvalue(), "out": out, "spec": spec,
            "times": (t1 - t0, time.time() - t1)}


def test_interrupted_search_restores_without_rerunning_finished_trials(grid_search):
    first, second = grid_search["first"], grid_search["second"]
    assert first.interrupted and os.path.exists(grid_search["out"] / "interrupted")
    done_first = {r["run_name"] for r in first.rows if r["status"] == "finished"}
    assert len(done_first) >= 2 and len(first.rows) == 4
    assert any(r["status"] in ("pending", "running") for r in first.rows)
    assert second.restored and not second.interrupted
    assert [r["status"] for r in second.rows] == ["finished"] * 4
    with open(os.path.join(second.exp_dir, "trial_starts.jsonl")) as f:
        starts = [json.loads(line)["run_name"] for line in f]
    for name in done_first:
        assert starts.count(name) == 1, (name, starts)  # finished before the interruption: never started again
    assert set(starts) == {r["run_name"] for r in second.rows}
    # the finished trials' results are the ones from the first session
    by_name = {r["run_name"]: r for r in second.rows}
    for r in first.rows:
        if r["status"] == "finished":
            assert by_name[r["run_name"]]["final_val_loss"] == r["final_val_loss"]


def test_mlflow_holds_parent_and_one_child_per_trial(grid_search):
    from mlflow.tracking import MlflowClient

    second = grid_search["second"]
    client = MlflowClient(tracking_uri=second.tracking_uri)
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["tst.kind"] == "tune"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{second.parent_run_id}'")
    assert len(children) == 4  # the trainer's own runs, one per trial, reused on restore (no second copies)
    rows = {r["run_name"]: r for r in second.rows}
    assert {c.data.tags["tst.run_name"] for c in children} == set(rows)
    for c in children:
        row = rows[c.data.tags["tst.run_name"]]
        assert c.info.status == "FINISHED"
        assert c.info.run_name == f"{row['label']} · {parent.data.tags['tst.run_name']}"  # the point first (legends)
        p = c.data.params
        assert int(p["data.bag_size"]) == row["s"] and float(p["train.switch_fraction"]) == row["r"]
        assert p["train.steps"] == str(T) and p["train.global_batch_size"] == "4" and p["data.seq_len"] == "32"
        hist = client.get_metric_history(c.info.run_id, "val_loss")
        last = max(hist, key=lambda m: m.step)
        assert last.step == T and math.isfinite(last.value)
        assert abs(last.value - row["final_val_loss"]) < 1e-9
        assert len({m.step for m in hist}) >= 3  # the history, not only the final value
    arts = {a.path for a in client.list_artifacts(second.parent_run_id)}
    assert {"results.csv", "table.txt", "heatmap.png", "best_vs_baseline.png"} <= arts
    assert parent.data.metrics["best_val_loss"] == min(r["final_val_loss"] for r in second.rows if not r["baseline"])
    assert parent.data.metrics["gain_nats"] == pytest.approx(second.summary["gain_nats"])


def test_printed_table_is_the_papers_layout(grid_search):
    second = grid_search["second"]
    lines = grid_search["printed"].splitlines()
    i = next(k for k, line in enumerate(lines) if line.strip().startswith("s \\ r"))
    assert lines[i].split("|")[1].split() == ["0", "0.4"]  # r across
    table = [line.split("|") for line in lines[i + 2:i + 6]]
    assert [int(a) for a, _ in table] == [1, 2, 3, 4]  # s down
    base = next(r for r in second.rows if r["baseline"])["final_val_loss"]
    for s, cells in table:
        vals = [float(v) for v in cells.split()]
        assert vals[0] == pytest.approx(base, abs=1e-4)  # r = 0 column: the baseline
        row = next(r for r in second.rows if r["s"] == int(s) and (r["r"] == 0.4 or int(s) == 1))
        assert vals[1] == pytest.approx(row["final_val_loss"], abs=1e-4)
    best = second.summary["best"]  # the best TST setting, whether or not it beats the baseline
    assert not best["baseline"]
    assert best["final_val_loss"] == min(r["final_val_loss"] for r in second.rows if not r["baseline"])
    gain = second.summary["gain_nats"]
    assert gain == pytest.approx(base - best["final_val_loss"])
    assert any(line.startswith("best: ") and f"{best['final_val_loss']:.4f}" in line for line in lines)
    csv_text = open(second.summary["artifacts"]["csv"]).read().splitlines()
    assert len(csv_text) == 5 and csv_text[0].startswith("label,run_name,s,r")


def test_a_search_name_is_not_reused_for_another_space(grid_search):
    """Same name, other space: refused (restore would run the old space); a new name whose runs would collide
    with an earlier search's run folders or MLflow runs: refused too (the trainer would resume those runs)."""
    import dataclasses

    from tune.search import run_search

    spec = grid_search["spec"]
    other = dataclasses.replace(spec, space={"data.bag_size": [2, 8], "train.switch_fraction": [0.4]})
    with pytest.raises(ConfigError, match="different space"):
        run_search(other, console=False)
    with pytest.raises(ConfigError, match="was used before"):
        run_search(dataclasses.replace(spec, name="grid4-s2"), console=False)


def test_cli_sample_search_with_asha_of_torchtrainer_trials_against_mlflow_server(grid_search, mlflow_server,
                                                                                   tmp_path, capsys):
    """`tst tune` with a YAML spec, Optuna sampling, ASHA, a real tracking server and backend ray_train: each trial
    is a TorchTrainer run (Train V2 inside a Tune function trainable, val_loss forwarded by a report callback).
    The sampled trial has a learning rate 1000x too small, so at the first rung after switch + grace it is clearly
    worse than the baseline and ASHA cuts it; its child run must end KILLED, not RUNNING. The baseline trial has
    the grid's one-process baseline config, seeds and data: it must end at the same loss."""
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    _wait_healthy(mlflow_server)
    out = grid_search["out"]  # shares the cached tokenizer and tokenized corpus
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "overrides": TINY + [f"run.output_dir={out}"], "mode": "sample", "search_alg": "optuna", "num_samples": 1,
        "space": {"data.bag_size": {"grid": [2]}, "train.switch_fraction": {"grid": [0.25]},
                  "train.lr": {"loguniform": [1e-6, 2e-6]}},
        "scheduler": "asha", "grace_steps": 2, "max_concurrent": 1, "name": "asha2", "backend": "ray_train"}))
    rc = main(["tune", "--config", str(spec), "--tracking-uri", mlflow_server["url"]])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "ASHA on val_loss from step 5" in printed  # switch at round(0.25*12)=3, + 2 recovery steps
    client = MlflowClient(tracking_uri=mlflow_server["url"])
    exp = client.get_experiment_by_name("tst")
    parents = client.search_runs([exp.experiment_id], "tags.`tst.run_name` = 'asha2'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")
    assert len(kids) == 2
    by_base = {k.data.params["data.bag_size"] == "1": k for k in kids}
    base, cut = by_base[True], by_base[False]
    assert base.info.status == "FINISHED" and math.isfinite(base.data.metrics["val_loss"])
    assert max(m.step for m in client.get_metric_history(base.info.run_id, "val_loss")) == T
    local_base = next(r for r in grid_search["second"].rows if r["baseline"])
    assert base.data.metrics["val_loss"] == pytest.approx(local_base["final_val_loss"], rel=1e-5, abs=1e-5)
    for k in kids:  # Ray Train's storage layout (step_N in the run folder), not the loop's checkpoints/
        run_dir = os.path.join(out, "runs", k.data.tags["tst.run_name"])
        assert any(d.startswith("step_") for d in os.listdir(run_dir)), os.listdir(run_dir)
    assert float(cut.data.params["train.lr"]) < 2e-6
    assert cut.info.status == "KILLED"  # stopped by the scheduler: not left RUNNING
    assert max(m.step for m in client.get_metric_history(cut.info.run_id, "val_loss")) < T
    assert math.isfinite(cut.data.metrics["val_loss"])
    assert "*" in printed and "stopped early" in printed
    arts = {a.path for a in client.list_artifacts(pid)}
    assert {"results.csv", "table.txt"} <= arts
