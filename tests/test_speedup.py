"""The speedup study (pipeline.study.speedup, bench/speedup.py's package): the plan (branch points, token needs), the
settings vs their recipes, and a tiny end-to-end run whose WSD decay branches (pipeline.study.branches) must equal
separately trained baselines exactly; the branches of a finished run (`train_branches`). The script itself runs
once, as a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.study import branches, speedup

REPO = Path(__file__).resolve().parents[1]


def test_plan_branch_points_and_cadence():
    cfg = speedup.setting_config("cpu")
    plan = speedup.plan_runs(cfg, steps=600, bag_size=6, switch_fraction=0.3, lengths=[0.5, 0.75, 1, 1.5, 2],
                             mode="branches", prefix="cpu-")
    bases = {b["steps"]: b for b in plan["baselines"]}
    assert sorted(bases) == [300, 450, 600, 900, 1200]
    assert bases[1200]["branch_from"] is None  # the long run itself
    # decay starts T_k - round(0.1 T_k); the cadence is their gcd, so every branch starts exactly there
    assert {t: bases[t]["decay_start"] for t in (300, 450, 600, 900)} == {300: 270, 450: 405, 600: 540, 900: 810}
    assert plan["checkpoint_every"] == 135
    assert all(bases[t]["branch_step"] == bases[t]["decay_start"] for t in (300, 450, 600, 900))
    # a fine gcd falls back to T_max/40 and the branch starts from the checkpoint before its decay
    plan = speedup.plan_runs(cfg, steps=610, bag_size=6, switch_fraction=0.3, lengths=[1, 1.5, 2],
                             mode="branches", prefix="")
    assert [b["decay_start"] for b in plan["baselines"][:2]] == [549, 823]  # gcd 1
    assert plan["checkpoint_every"] == 1220 // 40
    for b in plan["baselines"][:2]:
        assert b["branch_step"] % 30 == 0 and b["branch_step"] <= b["decay_start"] < b["branch_step"] + 30
    # separate mode: no branches
    plan = speedup.plan_runs(cfg, steps=600, bag_size=6, switch_fraction=0.3, lengths=[1, 2], mode="separate",
                             prefix="")
    assert all(b["branch_from"] is None for b in plan["baselines"]) and plan["checkpoint_every"] is None


def test_tokens_needed_tst_reads_rs_plus_1_minus_r():
    # s=6, r=0.3: TST reads (r*s + 1 - r) = 2.5x the baseline's raw tokens for the same steps (plus window tails)
    tst = speedup.tokens_needed(600, 0.3, 6, 16, 128)
    base = speedup.tokens_needed(600, 0.0, 1, 16, 128)
    assert base == 600 * 16 * 128 + 1
    assert tst == (180 * 6 + 420) * 16 * 128 + 1
    assert math.isclose(tst / base, 2.5, rel_tol=1e-4)


@pytest.mark.parametrize("setting", ["cpu", "gpu"])
def test_settings_match_recipes(setting):
    yaml = pytest.importorskip("yaml")
    from pipeline.config import Config, flatten_dict

    rec = yaml.safe_load((REPO / speedup.SETTINGS[setting]["recipe"]).read_text())
    from_recipe = Config.from_dict(rec).flatten()
    from_dict = speedup.setting_config(setting).flatten()
    for k in speedup.SETTINGS[setting]["config"]:
        a, b = from_recipe[k], from_dict[k]
        if k in ("data.source", "run.output_dir"):  # resolved against the repository in the dict form
            a, b = os.path.basename(str(a)), os.path.basename(str(b))
        assert a == b, f"{setting}: {k} recipe {a!r} vs SETTINGS {b!r}"
    assert set(flatten_dict(rec)) <= set(speedup.SETTINGS[setting]["config"])
    gpu = speedup.gpu_setting()
    assert gpu.model.preset == "125M" and gpu.train.dtype == "bfloat16" and gpu.scaling.use_gpu


def test_tiny_end_to_end_branches_equal_separate(tmp_path, capsys):
    common = ["--setting", "tiny", "--steps", "20", "--baseline-lengths", "1,2", "--quiet"]
    r = subprocess.run([sys.executable, str(REPO / "bench" / "speedup.py"), *common, "--out", str(tmp_path / "br")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "iso-loss speedup" in r.stdout and "equal-step loss difference" in r.stdout
    rep = json.loads((tmp_path / "br" / "tiny" / "speedup.json").read_text())
    assert rep["baseline_steps"] == [20, 40]
    assert rep["branches"]["tiny-base-T20"]["step"] == 18
    assert (tmp_path / "br" / "tiny" / "speedup.png").is_file()
    res = rep["comparison"]
    assert res["mode"] == "final_points" and res["equal_step"]["step"] == 20
    assert res["speedup"]["steps"]["ratio"] is not None
    # no run repeats data; TST reads 2.5x the same-length baseline's tokens
    assert max(r["epochs"] for r in rep["runs"].values()) < 1.0
    tst = rep["runs"]["tiny-tst-s6-r0.3-T20"]
    assert math.isclose(tst["raw_tokens"] / rep["runs"]["tiny-base-T20"]["raw_tokens"], 2.5)
    # equal FLOPs per step: the same cumulative FLOPs at the same step in every run
    assert res["tst"]["flops"] == res["baselines"][0]["flops"]

    speedup.run_speedup("tiny", steps=20, lengths=[1, 2], out=str(tmp_path / "sep"), mode="separate", console=False)
    assert "iso-loss speedup" in capsys.readouterr().out
    sep = json.loads((tmp_path / "sep" / "tiny" / "speedup.json").read_text())
    for name in ("tiny-base-T20", "tiny-base-T40", "tiny-tst-s6-r0.3-T20"):
        assert rep["runs"][name]["final_val_loss"] == sep["runs"][name]["final_val_loss"], name

    # a cadence that misses the decay start: the branch resumes at step 15 and retrains 15..17 itself
    rep5 = speedup.run_speedup("tiny", steps=20, lengths=[1, 2], out=str(tmp_path / "br5"), console=False,
                               checkpoint_every=5)
    assert rep5["branches"]["tiny-base-T20"] == {"from": "tiny-base-T40", "step": 15, "decay_start": 18}
    assert rep5["runs"]["tiny-base-T20"]["final_val_loss"] == sep["runs"]["tiny-base-T20"]["final_val_loss"]

    # --compare-only trains nothing and leaves unfinished baselines out
    rc = speedup.run_speedup("tiny", steps=20, lengths=[1, 2, 3], out=str(tmp_path / "br"), console=False,
                             compare_only=True)
    assert rc["missing_baselines"] == ["tiny-base-T60"]
    assert rc["comparison"]["equal_step"]["diff_nats"] == rep["comparison"]["equal_step"]["diff_nats"]
    assert not (tmp_path / "br" / "runs" / "tiny-base-T60").exists()

    # the branches of a finished run: br5's long baseline kept a checkpoint every 5 steps, so its 20-step branch
    # resumes at 15 (decay start 18) and ends exactly where the separately trained 20-step run ends
    long_run = tmp_path / "br5" / "runs" / "tiny-base-T40"
    got = branches.train_branches(str(long_run), [20], console=False)
    assert got[20]["final_val_loss"] == sep["runs"]["tiny-base-T20"]["final_val_loss"]
    meta = json.loads((tmp_path / "br5" / "runs" / "tiny-base-T40-branch-T20" / "BRANCH.json").read_text())
    assert meta["branched_from"] == "tiny-base-T40" and meta["step"] == 15
    assert [os.path.basename(p) for p in branches.branches_of(str(long_run))] == [
        "tiny-base-T20", "tiny-base-T40-branch-T20"]  # the study's own branch, and this one
    # the same from the command line (a fraction of the run's T), then `tst compare --branches` reads them all
    from pipeline.cli import main

    assert main(["train-branches", str(long_run), "--steps", "0.75"]) == 0  # 30 steps, from the step-25 checkpoint
    assert "tiny-base-T40-branch-T30" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "br5" / "runs" / "tiny-tst-s6-r0.3-T20"), str(long_run), "--branches",
                 "--no-log", "--out", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["mode"] == "final_points" and [b["final_step"] for b in res["baselines"]] == [40, 20, 20, 30]
    assert res["equal_step"]["diff_nats"] == rep5["comparison"]["equal_step"]["diff_nats"]
    with pytest.raises(ValueError, match="shorter than"):
        branches.train_branches(str(long_run), [40], console=False)
    with pytest.raises(ValueError, match="TST run"):
        branches.train_branches(str(tmp_path / "br5" / "runs" / "tiny-tst-s6-r0.3-T20"), [10], console=False)


def test_switch_diag_reads_adam_state_and_trains_a_branch(tmp_path, capsys):
    """bench/switch_diag.py (run as a script): Adam's v against the gradients on both sides of the switch, then a
    branch from the switch checkpoint with v refreshed, trained to the end by the ordinary loop."""
    from pipeline.runner import train_in_process

    def switch_diag(*args):
        out = tmp_path / "diag.json"
        r = subprocess.run([sys.executable, str(REPO / "bench" / "switch_diag.py"), *args, "--json", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SystemExit(r.stderr.strip().splitlines()[-1])
        print(r.stdout)
        return json.loads(out.read_text())

    cfg = speedup.setting_config("tiny", [f"run.output_dir={tmp_path}"])
    c = branches.run_config(cfg, steps=12, bag_size=4, switch_fraction=0.5, name="tst")
    tst = train_in_process(c, "tst", console=False)
    diag = switch_diag(str(tmp_path / "runs" / "tst"), "--batches", "2", "--intervene", "refresh_v")
    assert diag["switch_step"] == 6
    assert set(diag["rms"]) == {"embedding", "norms", "attention", "mlp", "lm_head"}
    assert all(math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0 for a, b in diag["rms"].values())
    br = diag["branch"]
    assert br["status"] == "finished" and br["step"] == 12 and math.isfinite(br["final_val_loss"])
    assert br["final_val_loss"] != tst["final_val_loss"]  # the changed optimizer state changed the run
    assert json.loads((tmp_path / "runs" / "tst-refresh_v" / "BRANCH.json").read_text())["step"] == 6
    assert "rms g/sqrt(v)" in capsys.readouterr().out
    # reinit: phase 1 thrown away (fresh weights and optimizer at the switch), same data and schedule after it
    re = switch_diag(str(tmp_path / "runs" / "tst"), "--batches", "1", "--intervene", "reinit")["branch"]
    assert re["status"] == "finished" and re["final_val_loss"] not in (br["final_val_loss"], tst["final_val_loss"])
    with pytest.raises(SystemExit, match="no superposition phase"):
        c = branches.run_config(cfg, steps=4, bag_size=1, switch_fraction=0.0, name="base")
        train_in_process(c, "base", console=False)
        switch_diag(str(tmp_path / "runs" / "base"))


def test_chunk_corpus_splits_shuffles_and_caps(tmp_path):
    from pipeline.data.corpus import chunk_corpus

    src = tmp_path / "corpus"
    src.mkdir()
    docs = [{"text": "".join(f"doc{i} line {j}\n" for j in range(400)), "source": f"s{i}"} for i in range(3)]
    docs.append({"text": "x" * 5000, "source": "long-line"})
    with open(src / "corpus-00000.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    (src / "SOURCES.md").write_text("not read: only *.jsonl")
    info = chunk_corpus(str(src), str(tmp_path / "chunks"), max_chars=1000, seed=0)
    rows = [json.loads(x) for x in (tmp_path / "chunks" / "corpus-00000.jsonl").read_text().splitlines()]
    assert all(len(r["text"]) <= 1000 for r in rows)
    # nothing lost, nothing added (the pieces of each document, in order, rebuild it)
    for d in docs:
        parts = [r["text"] for r in rows if r["source"] == d["source"]]
        assert sum(len(p) for p in parts) == len(d["text"])
    assert [r["source"] for r in rows] != sorted(r["source"] for r in rows)  # shuffled across documents
    assert info["pieces_written"] == len(rows) and (tmp_path / "chunks.json").is_file()
    assert not list((tmp_path / "chunks").glob("*.json"))  # only data inside the folder
    capped = chunk_corpus(str(src), str(tmp_path / "capped"), max_chars=1000, max_mb=0.002)
    assert capped["pieces_written"] < info["pieces_written"]
