"""`tst compare`: iso-loss speedup, equal-step difference and readers, on synthetic curves with known answers.

The baseline curve used throughout is loss(step) = 1000/step + 3 evaluated every 100 steps (13, 8, 6.333, 5.5,
5, 4.667, ...), so every interpolated answer below can be worked out by hand.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from pipeline.report.compare import compare_runs
from pipeline.report.curves import (compute_comparison, equal_step_difference, fmt_ratio, format_table,
                                    iso_loss_all_axes, iso_loss_speedup)
from pipeline.report.runs import RunCurves, read_mlflow_run, read_run_folder
from pipeline.errors import TSTError

A, OFF = 1000.0, 3.0
BASE_STEPS = list(range(100, 1001, 100))


def base_loss(step):
    return A / step + OFF


BASE_LOSSES = [base_loss(s) for s in BASE_STEPS]


# ---------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------


def test_iso_loss_interpolates_first_crossing_exactly():
    # target 4.8 lies between step 500 (5.0) and step 600 (4.6667): frac = 0.2 / (1/3) = 0.6 -> step 560
    r = iso_loss_speedup(BASE_STEPS, BASE_LOSSES, 4.8, 400)
    assert r.needed == pytest.approx(560.0, abs=1e-9)
    assert r.ratio == pytest.approx(1.4, abs=1e-12)
    assert not r.lower_bound and not r.upper_bound and r.reached
    assert fmt_ratio(r) == "1.40x"
    # a target exactly on an evaluation: that step
    r = iso_loss_speedup(BASE_STEPS, BASE_LOSSES, 5.0, 250)
    assert r.needed == pytest.approx(500.0) and r.ratio == pytest.approx(2.0)


def test_iso_loss_first_crossing_of_a_non_monotone_curve():
    steps = [100, 200, 300, 400]
    losses = [5.0, 3.0, 4.0, 2.0]  # reaches 3.5 first between 100 and 200
    r = iso_loss_speedup(steps, losses, 3.5, 100)
    assert r.needed == pytest.approx(175.0) and r.ratio == pytest.approx(1.75)


def test_iso_loss_never_reached_is_a_lower_bound():
    # the baseline ends at 4.0 (step 1000): TST's 3.9 is never reached -> >= 1000 / 400
    r = iso_loss_speedup(BASE_STEPS, BASE_LOSSES, 3.9, 400)
    assert r.lower_bound and not r.reached and not r.upper_bound
    assert r.needed == 1000.0
    assert r.ratio == pytest.approx(2.5)
    assert fmt_ratio(r) == "≥ 2.50x"


def test_iso_loss_already_below_at_first_eval_is_an_upper_bound():
    r = iso_loss_speedup(BASE_STEPS, BASE_LOSSES, 20.0, 400)
    assert r.upper_bound and not r.lower_bound
    assert r.needed == 100.0 and r.ratio == pytest.approx(0.25)
    assert fmt_ratio(r) == "≤ 0.25x"


def test_iso_loss_wall_clock_and_flops_share_the_crossing():
    base_el = [0.5 * s for s in BASE_STEPS]  # 0.5 s a step
    base_fl = [2e9 * s for s in BASE_STEPS]
    out = iso_loss_all_axes(BASE_STEPS, BASE_LOSSES, 4.8, 400, base_el, 0.6 * 400, base_fl, 2e9 * 400)
    assert out["steps"].needed == pytest.approx(560.0)
    assert out["wall_clock"].needed == pytest.approx(280.0)
    assert out["wall_clock"].ratio == pytest.approx(280.0 / 240.0)
    assert out["flops"].needed == pytest.approx(2e9 * 560)
    assert out["flops"].ratio == pytest.approx(1.4)
    # missing elapsed: no ratio, but the bound flags follow the steps axis
    out = iso_loss_all_axes(BASE_STEPS, BASE_LOSSES, 3.9, 400, None, 240.0, None, None)
    assert out["wall_clock"].ratio is None and out["wall_clock"].lower_bound
    assert out["steps"].ratio == pytest.approx(2.5)


def test_equal_step_difference():
    # baseline at 400 is 5.5; TST 4.8 -> +0.7 nats (TST better)
    assert equal_step_difference(BASE_STEPS, BASE_LOSSES, 400, 4.8) == pytest.approx(0.7)
    # between evaluations: 450 -> (5.5 + 5.0) / 2 = 5.25
    assert equal_step_difference(BASE_STEPS, BASE_LOSSES, 450, 5.5) == pytest.approx(-0.25)
    # beyond the baseline's last evaluation: not defined
    assert equal_step_difference(BASE_STEPS, BASE_LOSSES, 1200, 3.5) is None


def _curves(name, steps, losses, *, sec_per_step=None, flops_per_step=None, tokens_per_step=None,
            params=None):
    m = {"val_loss": list(zip(steps, losses)), "elapsed_s": [], "flops": [], "raw_tokens": []}
    if sec_per_step:
        m["elapsed_s"] = [(s, sec_per_step * s) for s in steps]
    if flops_per_step:
        m["flops"] = [(s, flops_per_step * s) for s in steps]
    if tokens_per_step:
        m["raw_tokens"] = [(s, tokens_per_step * s) for s in steps]
    return RunCurves(name=name, source="memory", metrics=m, params=params or {})


def test_compute_comparison_single_baseline():
    base = _curves("base", BASE_STEPS, BASE_LOSSES, sec_per_step=0.5, flops_per_step=2e9, tokens_per_step=1000)
    tst_steps = [100, 200, 300, 400]
    tst = _curves("tst", tst_steps, [9.0, 7.0, 5.2, 4.8], sec_per_step=0.6, flops_per_step=2e9,
                  tokens_per_step=2500, params={"train.steps": 400, "train.switch_fraction": 0.3, "data.bag_size": 6})
    res = compute_comparison(tst, [base])
    assert res["mode"] == "curve"
    assert res["target_loss"] == 4.8
    assert res["tst"]["final_val_loss"] == 4.8 and res["baselines"][0]["final_val_loss"] == pytest.approx(4.0)
    assert res["tst"]["raw_tokens"] == 1_000_000 and res["baselines"][0]["raw_tokens"] == 1_000_000
    assert res["tst"]["switch_step"] == 120  # floor(0.3 * 400 + 0.5)
    assert res["equal_step"]["diff_nats"] == pytest.approx(0.7)
    sp = res["speedup"]
    assert sp["steps"]["needed"] == pytest.approx(560.0) and sp["steps"]["ratio"] == pytest.approx(1.4)
    assert sp["wall_clock"]["ratio"] == pytest.approx(280 / 240)
    assert sp["flops"]["ratio"] == pytest.approx(1.4)
    table = format_table(res)
    assert "+0.7000 nats" in table and "1.40x" in table and "≥" not in table


def test_compute_comparison_multi_baseline_uses_final_points(tmp_path):
    # three fully-decayed baselines of lengths 1000, 1500, 2000 ending at 3.20, 3.10, 3.00. Their curves'
    # intermediate points are undecayed and higher; a curve-based reading would differ.
    b1 = _curves("b1000", [500, 1000], [3.6, 3.20], sec_per_step=1.0, flops_per_step=1e9)
    b2 = _curves("b1500", [500, 1000, 1500], [3.6, 3.35, 3.10], sec_per_step=1.0, flops_per_step=1e9)
    b3 = _curves("b2000", [500, 1000, 1500, 2000], [3.6, 3.35, 3.25, 3.00], sec_per_step=1.0, flops_per_step=1e9)
    tst = _curves("tst", [500, 1000], [3.9, 3.05], sec_per_step=1.25, flops_per_step=1e9)
    # given out of order: the final points are sorted by step
    res = compute_comparison(tst, [b3, b1, b2])
    assert res["mode"] == "final_points"
    sp = res["speedup"]
    # 3.05 lies half-way between (1500, 3.10) and (2000, 3.00) -> 1750 steps, 1.75x
    assert sp["steps"]["needed"] == pytest.approx(1750.0) and sp["steps"]["ratio"] == pytest.approx(1.75)
    assert not sp["steps"]["lower_bound"]
    assert sp["wall_clock"]["needed"] == pytest.approx(1750.0)
    assert sp["wall_clock"]["ratio"] == pytest.approx(1750.0 / 1250.0)
    assert sp["flops"]["ratio"] == pytest.approx(1.75)
    # equal-step: the same-length baseline (b1000) at step 1000
    assert res["equal_step"]["baseline"] == "b1000"
    assert res["equal_step"]["diff_nats"] == pytest.approx(0.15)
    # b2000's own curve at 1500 (3.25) would have given another answer: final points only
    only_b3 = compute_comparison(tst, [b3])
    assert only_b3["speedup"]["steps"]["needed"] == pytest.approx(1500 + 500 * (3.25 - 3.05) / (3.25 - 3.00))

    # never reached over the final points: lower bound 2000 / 1000
    tst_better = _curves("tst", [500, 1000], [3.9, 2.9], sec_per_step=1.25, flops_per_step=1e9)
    res = compute_comparison(tst_better, [b1, b2, b3])
    assert res["speedup"]["steps"]["lower_bound"] and res["speedup"]["steps"]["ratio"] == pytest.approx(2.0)
    assert res["speedup"]["steps"]["display"] == "≥ 2.00x"
    assert "lower bound" in format_table(res)

    # the figure with several baselines (their final points joined) and the JSON
    res = compare_runs(tst, [b3, b1, b2], out=tmp_path / "m.png", json_path=tmp_path / "m.json")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "m.json").read_text())["speedup"]["steps"]["ratio"] == pytest.approx(1.75)


def test_tst_detection_by_params():
    base = _curves("base", BASE_STEPS, BASE_LOSSES, params={"train.switch_fraction": "0.0", "data.bag_size": "1"})
    tst = _curves("tst", [100, 400], [9.0, 4.8],
                  params={"train.switch_fraction": "0.3", "data.bag_size": "6", "train.steps": "400"})
    res = compare_runs(base, [tst], out=None)
    assert res["tst"]["name"] == "tst" and res["baselines"][0]["name"] == "base"
    assert res["notes"] and "using 'tst' as the TST run" in res["notes"][0]
    assert res["speedup"]["steps"]["ratio"] == pytest.approx(1.4)
    # --no-detect keeps the order given
    res = compare_runs(base, [tst], out=None, detect_tst=False)
    assert res["tst"]["name"] == "base"


# ---------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------


def _write_run_folder(root, name, *, steps, eval_every, loss_fn, sec_per_step, flops_per_step, r, s, ppstep=1000):
    run = root / "runs" / name
    (run / "checkpoints" / f"step_{steps:08d}").mkdir(parents=True)
    sw = math.floor(r * steps + 0.5)
    lines, raw = [], 0
    for t in range(1, steps + 1):
        sup = t <= sw
        raw += ppstep * (s if sup else 1)
        if t % 10 == 0 or t == steps:
            lines.append({"step": t, "phase": "superposition" if sup else "recovery", "bag_size": s if sup else 1,
                          "elapsed_s": sec_per_step * t, "flops": flops_per_step * t, "raw_tokens": raw,
                          "train_loss": 1.0})
        if t % eval_every == 0:  # evaluation lines are separate, as the trainer may write them
            lines.append({"step": t, "phase": "superposition" if sup else "recovery", "val_loss": loss_fn(t),
                          "elapsed_s": sec_per_step * t})
    with open(run / "metrics.jsonl", "w") as f:
        for ln in lines:
            f.write(json.dumps(ln) + "\n")
        f.write("{not json\n")  # a torn last line (killed run) is skipped
    (run / "config.yaml").write_text(
        f"data:\n  bag_size: {s}\n  seq_len: 100\ntrain:\n  steps: {steps}\n  switch_fraction: {r}\n"
        f"run:\n  name: {name}\n  output_dir: {root}\n"
    )
    return run


def test_read_run_folder_and_compare(tmp_path):
    _write_run_folder(tmp_path, "base", steps=1000, eval_every=100, loss_fn=base_loss,
                      sec_per_step=0.5, flops_per_step=2e9, r=0.0, s=1)
    tst_dir = _write_run_folder(tmp_path, "tst", steps=400, eval_every=100,
                                loss_fn=lambda t: 4.8 if t == 400 else 9.0,
                                sec_per_step=0.6, flops_per_step=2e9, r=0.3, s=6)
    # a checkpoint folder inside the run is accepted (the reader walks up)
    ckpt = tst_dir / "checkpoints" / "step_00000400"
    with pytest.warns(UserWarning, match="malformed"):
        run = read_run_folder(ckpt)
    assert run.name == "tst" and run.path == str(tst_dir.resolve())
    assert run.eval_steps == [100, 200, 300, 400] and run.final_loss == 4.8
    assert run.switch_step == 120 and run.is_tst is True
    assert run.raw_tokens() == 120 * 6000 + 280 * 1000  # (r*s + 1 - r) * T * positions
    assert run.eval_axis("elapsed_s") == pytest.approx([60.0, 120.0, 180.0, 240.0])

    with pytest.warns(UserWarning):
        res = compare_runs(str(ckpt), [str(tmp_path / "runs" / "base")], out=None)
    assert res["tst"]["name"] == "tst" and res["baselines"][0]["raw_tokens"] == 1_000_000
    assert res["speedup"]["steps"]["needed"] == pytest.approx(560.0)
    assert res["speedup"]["wall_clock"]["ratio"] == pytest.approx(280 / 240)
    assert res["speedup"]["flops"]["ratio"] == pytest.approx(1.4)
    assert res["equal_step"]["diff_nats"] == pytest.approx(0.7)

    # a bare name falls back to <output_dir>/runs/NAME when there is no MLflow store
    with pytest.warns(UserWarning):
        res2 = compare_runs("tst", ["base"], output_dir=str(tmp_path), out=None,
                              tracking_uri=f"sqlite:///{tmp_path}/absent.db")
    assert res2["speedup"]["steps"]["ratio"] == pytest.approx(1.4)
    assert not (tmp_path / "absent.db").exists()  # the lookup did not create an empty store

    with pytest.raises(TSTError, match="metrics.jsonl"):
        read_run_folder(tmp_path)


def test_compare_resolves_the_tracking_uri_as_every_command_and_creates_nothing(tmp_path, monkeypatch):
    """One resolver (pipeline.report.tracking) for train, tune and compare: --tracking-uri, else
    $MLFLOW_TRACKING_URI, else sqlite:///<output-dir>/mlflow.db, SQLite paths made absolute; looking a run up
    makes no folder for a store that is not there."""
    from pipeline.report.runs import load_run
    from pipeline.report.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    assert resolve_tracking_uri(None, "out", create_dir=False) == f"sqlite:///{cwd}/out/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel/m.db", "out", create_dir=False) == f"sqlite:///{cwd}/rel/m.db"
    assert not (tmp_path / "out").exists() and not (tmp_path / "rel").exists()
    with pytest.raises(TSTError, match="does not exist"):
        load_run("nope", output_dir="absent")
    assert not (tmp_path / "absent").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None, "out") == "http://127.0.0.1:1"


# ---------------------------------------------------------------------------------------------------------
# MLflow and the CLI, end to end
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("tst", artifact_location=(d / "artifacts").as_uri())

    def make(name, steps, losses, sec_per_step, tokens_per_step, params):
        run = client.create_run(exp, run_name=name, tags={"tst.run_name": name})
        ms = []
        for st, loss in zip(steps, losses):
            ms += [Metric("val_loss", loss, 0, st), Metric("elapsed_s", sec_per_step * st, 0, st),
                   Metric("flops", 2e9 * st, 0, st), Metric("raw_tokens", tokens_per_step * st, 0, st)]
        client.log_batch(run.info.run_id, metrics=ms, params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    base_id = make("base", BASE_STEPS, BASE_LOSSES, 0.5, 1000,
                   {"train.steps": 1000, "train.switch_fraction": 0.0, "data.bag_size": 1})
    # TST ends at 3.9, which the baseline (4.0 at 1000) never reaches: a lower bound of 1000 / 400
    tst_id = make("tst-run", [100, 200, 300, 400], [9.0, 7.0, 5.0, 3.9], 0.6, 2500,
                  {"train.steps": 400, "train.switch_fraction": 0.3, "data.bag_size": 6})
    return {"uri": uri, "client": client, "base": base_id, "tst": tst_id, "mlflow": mlflow}


def test_read_mlflow_run_by_id_and_name(mlflow_store):
    uri = mlflow_store["uri"]
    by_id = read_mlflow_run(mlflow_store["tst"], uri)
    by_name = read_mlflow_run("tst-run", uri, experiment="tst")
    for r in (by_id, by_name):
        assert r.run_id == mlflow_store["tst"] and r.source == "mlflow"
        assert r.eval_steps == [100, 200, 300, 400] and r.final_loss == 3.9
        assert r.switch_step == 120 and r.is_tst is True and r.raw_tokens() == 1_000_000
    with pytest.raises(TSTError, match="no MLflow run"):
        read_mlflow_run("nope", uri)


def test_cli_compare_end_to_end(mlflow_store, tmp_path, capsys):
    from pipeline.cli import main

    png, js = tmp_path / "fig" / "cmp.png", tmp_path / "cmp.json"
    # baseline given first: detected by params and swapped
    rc = main(["compare", "base", "tst-run", "--tracking-uri", mlflow_store["uri"],
               "--out", str(png), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "≥ 2.50x" in out and "never reached" in out

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100

    res = json.loads(js.read_text())
    assert res["tst"]["name"] == "tst-run" and res["baselines"][0]["name"] == "base"
    st = res["speedup"]["steps"]
    assert st["lower_bound"] is True and st["ratio"] == pytest.approx(2.5) and st["needed"] == 1000
    assert res["speedup"]["wall_clock"]["ratio"] == pytest.approx(500 / 240)
    assert res["speedup"]["wall_clock"]["lower_bound"] is True
    assert res["speedup"]["flops"]["ratio"] == pytest.approx(2.5)
    assert res["equal_step"]["diff_nats"] == pytest.approx(5.5 - 3.9)
    assert res["tst"]["raw_tokens"] == 1_000_000 and res["baselines"][0]["raw_tokens"] == 1_000_000
    # the JSON is written before it is logged, so the console (and the return value) say where it went
    assert f"logged to MLflow run {mlflow_store['tst']}" in out

    arts = {a.path for a in mlflow_store["client"].list_artifacts(mlflow_store["tst"], "compare")}
    assert arts == {"compare/cmp.png", "compare/cmp.json"}


def test_mlflow_log_failure_is_a_warning(mlflow_store, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("artifact store down")

    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(MlflowClient, "log_artifact", boom)
    with pytest.warns(UserWarning, match="could not log"):
        res = compare_runs(mlflow_store["tst"], [mlflow_store["base"]], tracking_uri=mlflow_store["uri"],
                             out=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "logged_to" not in res and any("artifact store down" in n for n in res["notes"])
