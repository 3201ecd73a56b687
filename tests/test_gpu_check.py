"""The GPU check (bench/gpu_check.py) in its tiny CPU mode, so that the script never rots.

One module-scoped run of the whole script (`--tiny`, every section, small shapes, a few steps) on a small token
store prepared by the package (builtin:pydoc with a 512-id BPE: seconds); the tests then read its gpu_check.json.
The script reads the store through the project's torch-only reader, in a process where numpy is blocked. The
script is only ever run (as a subprocess); the figures' arithmetic is tested on the package functions it calls
(tst_ops.check, tst_ops.bench, pipeline.train.metrics, pipeline.study.pair).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.data import store_folder_info
from pipeline.data.batch import StoreSource
from pipeline.data.plan import StreamPlan
from pipeline.study.pair import compare_pair
from pipeline.train.metrics import phase_figures
from tst_ops import bench, check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)

EXPECTED = ("env", "correctness", "matmul", "kernels", "train", "compare", "kernels_compiled")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A token store of builtin:pydoc (the fixture keeps its old name: the store is what the script reads)."""
    from pipeline.config import DataConfig
    from pipeline.data import ensure_store
    from pipeline.data.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("gpu_check_data")
    cfg = DataConfig(source="builtin:pydoc", tokenizer="bpe:512", val_fraction=0.05)
    tok = load_tokenizer(cfg, str(d))
    prep = ensure_store(cfg, tok, str(d), "local")
    return Path(prep.uri), store_folder_info(prep.uri)


@pytest.fixture(scope="module")
def report(packed, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu_check_out")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--data", str(packed[0]), "--out", str(out_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    wall = time.perf_counter() - t0  # the script's whole life, timed here: its sections fit inside it
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rep = json.loads((out_dir / "gpu_check.json").read_text())
    rep["_test_wall_s"] = wall
    return rep, r.stdout


def _all_finite(x, path="") -> list[str]:
    """Paths of numbers that are not finite (None counts as missing only where a figure is expected)."""
    bad = []
    if isinstance(x, dict):
        for k, v in x.items():
            bad += _all_finite(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            bad += _all_finite(v, f"{path}[{i}]")
    elif isinstance(x, float) and not math.isfinite(x):
        bad.append(path)
    return bad


def test_store_header_and_torch_only_source(packed):
    """The header the report records comes from the store's index; the source is the project's StoreSource, and
    the reader imports without numpy (the GPU machine may lack it)."""
    out, h = packed
    assert h["format"] == "tst-token-store" and h["dtype"] == "uint16"
    assert h["vocab_size"] == 512 and 0 <= h["eos_id"] < 512 and h["val_tokens"] > 0
    src = StoreSource(str(out), StreamPlan(total_steps=10, switch_fraction=0.3, bag_size=6, seq_len=16,
                                           global_batch_size=4, val_windows=5))
    w = src.step_windows(0, 0, 1)
    assert w.shape == (4, 6 * 16 + 6) and w.dtype == torch.int64 and int(w.max()) < 512
    assert int((src.store.read("train", 0, h["train_tokens"]) == h["eos_id"]).sum()) == h["train_documents"]
    code = ("import sys; sys.modules['numpy'] = None; sys.path.insert(0, %r)\n"
            "from pipeline.data.reader import TokenStore; st = TokenStore(%r); print(st.tokens('train'))"
            % (str(REPO), str(out)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and int(r.stdout.strip()) == h["train_tokens"], r.stderr[-2000:]


def test_every_section_ran_with_finite_figures(report):
    rep, stdout = report
    assert rep["status"] == "passed"
    assert tuple(rep["sections"]) == EXPECTED
    for name in EXPECTED[:-1]:
        assert rep["sections"][name]["status"] == "ok", (name, rep["sections"][name].get("reason"))
    # section times are seconds of this run: together no longer than the process, timed by the test itself
    seconds = [rep["sections"][name]["seconds"] for name in EXPECTED]
    assert all(0 < x for x in seconds) and sum(seconds) <= rep["_test_wall_s"], (seconds, rep["_test_wall_s"])
    # the compiled kernel reference is skipped on CPU unless --tiny-compile, and says so
    assert rep["sections"]["kernels_compiled"]["status"] == "skipped"
    assert "tiny-compile" in rep["sections"]["kernels_compiled"]["reason"]
    assert _all_finite(rep) == []  # strict JSON: no NaN/inf anywhere
    # the table is printed last
    assert stdout.strip().splitlines()[0].startswith("[gpu_check]")
    assert "gpu_check (tiny, cpu): passed" in stdout
    assert stdout.strip().splitlines()[-1].startswith("  compare ")


def test_correctness_checks_pass(report):
    c = report[0]["sections"]["correctness"]["result"]
    assert c["passed"]
    assert c["triton"]["available"] is False and c["note"].startswith("triton: ")
    seen = {(x["dtype"], x["s"], x["backend"]) for x in c["fused_loss"]}
    assert seen == {(d, s, "torch") for d in ("bfloat16", "float32") for s in (1, 6, 16)}
    for case in c["fused_loss"]:
        assert case["passed"], case
        assert case["vocab"] % 2 == 1  # a vocabulary that is a multiple of no block
        assert case["rows"] % case["chunk"] != 0  # a partial last chunk
        # the design's tolerances, stated here: fp32 1e-4; bf16 1e-2 on the loss, 0.1 (the cap) on gradients
        if case["dtype"] == "float32":
            assert max(case["err"].values()) < 1e-4, case["err"]
        else:
            assert case["err"]["loss"] < 1e-2 and max(case["err"].values()) < 0.1, case["err"]
    assert [e["s"] for e in c["bag_embedding"]] == [1, 6, 16]
    assert all(e["passed"] for e in c["bag_embedding"])


def test_kernel_and_matmul_figures(report):
    """Shapes and units of the real run; the arithmetic is checked on known timings below."""
    sec = report[0]["sections"]
    mm = sec["matmul"]["result"]
    assert mm["n"] == 256 and len(mm["ms_all"]) == 3 and mm["ms_median"] == statistics.median(mm["ms_all"])
    # a 256^3 fp32 matmul on one CPU thread: between 0.1 GFLOP/s and 1 TFLOP/s (a unit slip is 1e3 off)
    assert 1e-4 < mm["tflops_per_s"] < 1.0, mm
    rows = sec["kernels"]["result"]["configs"]
    assert [r["s"] for r in rows] == [1, 6, 16]
    for r in rows:
        for path in ("fused", "reference"):
            assert len(r[path]["ms_all"]) == 3 and r[path]["ms_median"] == statistics.median(r[path]["ms_all"])
            assert 1e-3 < r[path]["ms_median"] < 1e4, r[path]  # milliseconds, not seconds or microseconds


def test_training_figures(report):
    tr = report[0]["sections"]["train"]["result"]
    assert tr["runs"], tr
    run = tr["runs"][0]
    assert run["status"] == "finished" and run["fsdp"] is True and run["world_size"] == 1
    assert run["compile"] is False and run["switch_step"] == run["steps"] // 2
    assert os.path.basename(run["data_store"]) == report[0]["data"]["store"]  # the store given, read by the runner
    for ph in ("superposition", "recovery"):
        f = run[ph]
        assert f["intervals"] >= 1
        assert f["mfu_datasheet"] is None  # no datasheet peak for a CPU
    # every logged interval: a step is 4 windows x 32 latent positions (tp_batch x tp_seq), each position reading
    # s = 6 raw tokens in superposition and 1 in recovery, so rate x seconds-per-step gives those counts back
    intervals = [r for r in run["intervals"] if r.get("step_time_s") is not None]
    assert {r["phase"] for r in intervals} == {"superposition", "recovery"}
    for r in intervals:
        assert r["positions_per_s"] * r["step_time_s"] == pytest.approx(128, rel=1e-9), r
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(128 * (6 if r["phase"] == "superposition" else 1),
                                                                     rel=1e-9), r
    assert run["superposition"]["bag_size"] == 6 and run["recovery"]["bag_size"] == 1
    # raw tokens per latent position: exactly s in superposition, 1 in recovery (rates from the same intervals)
    sup, rec = run["superposition"], run["recovery"]
    assert sup["tokens_per_s"] / sup["positions_per_s"] == pytest.approx(6.0)
    assert rec["tokens_per_s"] / rec["positions_per_s"] == pytest.approx(1.0)
    assert run["raw_token_rate_ratio"] > 1
    assert any("compile=True" in s for s in tr["skipped"])


def test_compare_figures(report):
    cp = report[0]["sections"]["compare"]["result"]
    st = cp["settings"]
    assert st["steps"] == 20 and st["tst_bag_size"] == 6 and st["tst_switch_fraction"] == 0.3
    for k in ("final_val_loss_baseline", "final_val_loss_tst", "equal_step_diff_nats"):
        assert math.isfinite(cp[k]), k  # the values themselves: test_compare_section_on_known_curves
    # same steps, same positions; TST reads (r*s + 1 - r) times the raw tokens
    assert cp["tst"]["raw_tokens"] == pytest.approx(cp["baseline"]["raw_tokens"] * (0.3 * 6 + 0.7), rel=0.05)
    steps_b = [s for s, _ in cp["baseline"]["val_curve"]]
    assert steps_b[-1] == 20 and len(cp["val_loss_diff_by_step"]) >= 4


# ---------------------------------------------------------------------------------------------------------------
# The figures' arithmetic on known inputs (values worked out by hand in the comments)
# ---------------------------------------------------------------------------------------------------------------
CPU = torch.device("cpu")


def test_error_measures_and_tolerances_by_hand():
    # max |a - ref| / max |ref| = 0.5 / 2
    assert check.rel_err(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])) == pytest.approx(0.25)
    bf16, fp32 = check.TOL["bfloat16"], check.TOL["float32"]
    assert check.grad_ok(0.02, 1.0, bf16)  # under the plain 3e-2
    assert check.grad_ok(0.05, 0.03, bf16)  # 0.05 <= min(0.1, 2 x 0.03)
    assert not check.grad_ok(0.07, 0.03, bf16)  # 0.07 > 0.06
    assert not check.grad_ok(0.11, 1.0, bf16)  # over the 0.1 cap whatever unfused bf16 does
    assert not check.grad_ok(2e-4, 1.0, fp32)  # fp32 has no "no worse than unfused" escape


def test_time_ms_counts_calls_and_reports_milliseconds():
    calls = []

    def nap():
        calls.append(1)
        time.sleep(0.02)

    ms = bench.time_ms(nap, CPU, reps=3, warmup=2)
    assert len(calls) == 5 and len(ms) == 3
    assert all(20.0 <= x < 1000.0 for x in ms), ms  # 20 ms sleeps, in milliseconds


def test_matmul_and_kernel_rates_from_known_timings(monkeypatch):
    monkeypatch.setattr(bench, "time_ms", lambda fn, dev, reps, warmup: [2.0, 1.0, 4.0])  # median 2 ms
    mm = bench.matmul_rate(256, CPU, reps=3)
    # 2 x 256^3 = 33,554,432 FLOP in 2 ms: 1.6777216e10 FLOP/s
    assert mm["ms_median"] == 2.0 and mm["tflops_per_s"] == pytest.approx(0.016777216, rel=1e-12)
    assert mm["flops_per_s"] == pytest.approx(1.6777216e10, rel=1e-12)
    row = bench.measure_loss_config(256, 64, 1003, 6, torch.float32, CPU, "fused", reps=3, warmup=1)
    # the three matmuls of forward + backward: 6 x 256 x 64 x 1003 = 98,598,912 FLOP in 2 ms
    assert row["ms_median"] == 2.0 and row["matmul_tflops_per_s"] == pytest.approx(0.049299456, rel=1e-12)
    r = {"fused": {"ms_median": 3.0, "above_inputs_bytes": 100}, "reference": {"ms_median": 12.0, "above_inputs_bytes": 400}}
    bench.ratios(r, "reference", "reference")
    assert r["fused_over_reference_time"] == 0.25 and r["fused_over_reference_peak_memory"] == 0.25
    r = {"fused": {"ms_median": 3.0}, "reference_compiled": {"ms_median": 2.0}}  # CPU: no memory figures
    bench.ratios(r, "reference_compiled", "compiled_reference")
    assert r == {"fused": {"ms_median": 3.0}, "reference_compiled": {"ms_median": 2.0},
                 "fused_over_compiled_reference_time": 1.5}


def test_phase_figures_from_known_intervals():
    def rec(step, phase, t, pos, tok, tfl, wait, **kw):
        return dict(step=step, phase=phase, bag_size=6 if phase == "superposition" else 1, step_time_s=t,
                    positions_per_s=pos, tokens_per_s=tok, tflops_per_s=tfl, data_wait_frac=wait, **kw)

    records = [
        rec(2, "superposition", 9.0, 1.0, 6.0, 1e-5, 0.9),  # first interval of the phase: warm-up, dropped
        rec(4, "superposition", 0.5, 256.0, 1536.0, 0.002, 0.1),
        rec(6, "superposition", 7.0, 1.0, 6.0, 1e-5, 0.9, val_loss=5.0),  # includes an evaluation: dropped
        rec(8, "superposition", 0.25, 512.0, 3072.0, 0.004, 0.0),
        rec(10, "superposition", 1.0, 128.0, 768.0, 0.001, 0.3),
        rec(12, "recovery", 0.1, 1280.0, 1280.0, 0.02, 0.0),  # the other phase: not counted
        rec(12, "superposition", 0.01, 1e6, 1e6, 9.0, 0.0, kind="final"),  # the final record: not counted
    ]
    f = phase_figures(records, "superposition", matmul_flops=1e10)
    # medians of the three steady intervals: 0.5 s/step, 256 positions/s, 1536 tokens/s, 0.002 TFLOP/s, 0.1
    assert f == {"intervals": 3, "steps_per_s": 2.0, "step_time_s": 0.5, "positions_per_s": 256.0,
                 "tokens_per_s": 1536.0, "tflops_per_s": 0.002, "data_wait_frac": 0.1, "bag_size": 6,
                 "mfu_datasheet": None, "mfu_vs_measured_matmul": pytest.approx(0.2)}  # 2e9 / 1e10
    assert phase_figures(records[:1], "superposition", 1e10) == {"intervals": 0}


def test_compare_section_on_known_curves():
    """The compare section's figures (pipeline.study.pair.compare_pair) on two hand-made runs: the curves' own
    numbers and their differences."""
    val = {"compare_baseline": {5: 6.0, 10: 5.5, 15: 5.0, 20: 4.75},
           "compare_tst": {5: 5.75, 10: 5.0, 15: 4.875, 20: 4.5}}

    def fake_run(name, switch_fraction, bag_size, steps=20, seq_len=32, batch=4):
        records = [{"step": st, "phase": "recovery", "train_loss": v + 0.1, "val_loss": v, "elapsed_s": 1.0 * st,
                    "flops": 1e9 * st, "raw_tokens": 128 * st} for st, v in val[name].items()]
        return {"name": name, "records": records, "steps": steps, "global_batch_size": batch, "seq_len": seq_len,
                "params": 1000, "vocab_size": 512, "flops_per_position": 6000, "wall_s": 2.0,
                "switch_step": int(switch_fraction * steps), "bag_size": bag_size, "switch_fraction": switch_fraction,
                "summary": {"final_val_loss": val[name][20], "status": "finished", "raw_tokens": 128 * 20,
                            "epochs": 0.1}}

    cp = compare_pair(fake_run("compare_baseline", 0.0, 1), fake_run("compare_tst", 0.3, 6))
    assert cp["final_val_loss_baseline"] == 4.75 and cp["final_val_loss_tst"] == 4.5
    assert cp["equal_step_diff_nats"] == pytest.approx(0.25)  # baseline 4.75 - TST 4.5 at step 20: TST better
    assert [(st, pytest.approx(d)) for st, d in cp["val_loss_diff_by_step"]] == [
        (5, 0.25), (10, 0.5), (15, 0.125), (20, 0.25)]
    assert cp["flops_per_run"] == 6000.0 * 4 * 32 * 20  # flops per position x B x L x T


def _scaled_grad(x, f):
    """x in value (exactly, also in bf16), with its gradient multiplied by f."""
    return (x.float() * f - (f - 1) * x.detach().float()).to(x.dtype)


@pytest.mark.parametrize("defect", ["loss", "grad_hidden", "grad_weight"])
def test_correctness_check_fails_for_a_wrong_fused_loss(monkeypatch, defect):
    """The correctness section must fail every case when one output of the fused loss is 5 % off and the others
    are right: the value (right gradients), or the gradient of the hidden states or of the head alone. Each such
    defect is seen by one of its checks only."""
    import tst_ops

    real = tst_ops.fused_linear_multi_hot_cross_entropy

    def wrong(h, w, *a, **k):
        if defect == "loss":
            loss = real(h, w, *a, **k)
            return loss + 0.05 * loss.detach()
        if defect == "grad_hidden":
            return real(_scaled_grad(h, 1.05), w, *a, **k)
        return real(h, _scaled_grad(w, 1.05), *a, **k)

    monkeypatch.setattr(tst_ops, "fused_linear_multi_hot_cross_entropy", wrong)
    c = check.check_correctness(CPU)  # the tiny profile's shapes are its defaults
    assert c["passed"] is False and not any(case["passed"] for case in c["fused_loss"])
    for case in c["fused_loss"]:
        err = case["err"]
        lo, hi = (0.049, 0.051) if case["dtype"] == "float32" else (0.03, 0.1)  # bf16 rounding moves the 5 %
        assert lo < err[defect] < hi and all(v < 0.02 for k, v in err.items() if k != defect), (case["dtype"], err)


def test_budget_skips_sections_and_records_them(packed, tmp_path):
    """--max-minutes 0: every section but env is skipped as over budget, and the run still writes its JSON."""
    r = run_script("--tiny", "--data", str(packed[0]), "--out", str(tmp_path), "--max-minutes", "0")
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r.returncode == 0 and rep["status"] == "passed", r.stderr[-2000:]
    assert rep["sections"]["env"]["status"] == "ok"
    for name in EXPECTED[1:]:
        assert rep["sections"][name]["status"] == "skipped" and "over budget" in rep["sections"][name]["reason"]


def test_only_and_errors(tmp_path):
    r = run_script("--tiny", "--only", "nonsense", "--out", str(tmp_path))
    assert r.returncode != 0 and "unknown section 'nonsense'" in r.stderr
    r = run_script("--tiny", "--only", "train", "--out", str(tmp_path))  # train needs --data
    assert r.returncode != 0 and "need --data" in r.stderr
    r = run_script("--tiny", "--only", "env,matmul", "--out", str(tmp_path))
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r.returncode == 0 and rep["sections"]["correctness"]["status"] == "skipped"
    assert rep["sections"]["matmul"]["status"] == "ok"


def test_script_imports_no_optional_stack(packed, tmp_path):
    """The GPU machine has no Ray, MLflow, yaml or tokenizers: the check's imports must not need them, nor its
    training section at run time (the runner's Ray-free driver on the store folder, which compare uses too)."""
    code = (
        "import sys, builtins\n"
        "blocked = ('ray', 'mlflow', 'yaml', 'tokenizers')\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name.split('.')[0] in blocked: raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        f"sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import gpu_check, tst_ops, pipeline.model.transformer, pipeline.train.loop, pipeline.train.parallel, pipeline.train.metrics\n"
        "import pipeline.config, pipeline.train.checkpoint, pipeline.report.compare, pipeline.data, pipeline.data.reader\n"
        "import pipeline.runner, pipeline.study.pair, pipeline.study.branches, pipeline.study.speedup, tst_ops.check, tst_ops.bench\n"
        f"rc = gpu_check.main(['--tiny', '--only', 'train', '--data', {str(packed[0])!r}, '--out', {str(tmp_path)!r}])\n"
        "print('ok' if rc == 0 else 'failed')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "ok", r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["sections"]["train"]["status"] == "ok"
