"""bench/ops.py stays importable and reusable (bench/gpu_check.py calls it): a tiny CPU run of its helpers."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ops():
    spec = importlib.util.spec_from_file_location("tst_bench_ops_test", ROOT / "bench" / "ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_paths_agree_and_report_numbers():
    ops = _ops()
    res = ops.time_paths(["reference", "fused"], 64, 16, 130, 3, repeats=1, warmup=1, chunk_size=7)
    assert res["fused"]["loss"] == pytest.approx(res["reference"]["loss"], rel=1e-5)
    assert all(r["time_s"] > 0 for r in res.values())
    one = ops.run_one("fused", 64, 16, 130, 3, repeats=1, chunk_size=7)
    assert one["loss"] == pytest.approx(res["reference"]["loss"], rel=1e-5)
    assert one["peak_bytes"] >= 0 and one["chunk_size"] == 7
    rows = [dict(s=3, path=p, time_s=t, peak_bytes=m) for p, t, m in
            [("reference", 2.0, 400), ("reference_compiled", 1.0, 200), ("fused", 1.1, 50)]]
    lines = ops.summarize(rows)
    assert "time x0.550 (min x0.550)  peak memory x0.125" in lines[0] and "x1.100" in lines[2]
