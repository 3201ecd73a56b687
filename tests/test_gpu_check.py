"""The GPU check (bench/gpu_check.py) in its tiny CPU mode, so that the script never rots.

One module-scoped run of the whole script (`--tiny`, every section, small shapes, a few steps) on a small token
store prepared by the package (builtin:pydoc with a 512-id BPE: seconds); the tests then read its gpu_check.json.
The script reads the store through the project's torch-only reader, in a process where numpy is blocked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

EXPECTED = ("env", "correctness", "matmul", "kernels", "train", "compare", "kernels_compiled")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A token store of builtin:pydoc (the fixture keeps its old name: the store is what the script reads)."""
    from pipeline.config import DataConfig
    from pipeline.data import ensure_store
    from pipeline.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("gpu_check_data")
    cfg = DataConfig(source="builtin:pydoc", tokenizer="bpe:512", val_fraction=0.05)
    tok = load_tokenizer(cfg, str(d))
    prep = ensure_store(cfg, tok, str(d), "local")
    return Path(prep.uri), gpu_check.load_store(prep.uri)["header"]


@pytest.fixture(scope="module")
def report(packed, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu_check_out")
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--data", str(packed[0]), "--out", str(out_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rep = json.loads((out_dir / "gpu_check.json").read_text())
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
    src = gpu_check.make_source(gpu_check.load_store(str(out)), total_steps=10, switch_fraction=0.3, bag_size=6,
                                seq_len=16, global_batch_size=4, val_windows=5)
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
        assert rep["sections"][name]["seconds"] >= 0
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
        for v in case["err"].values():
            assert math.isfinite(v) and v >= 0
        if case["dtype"] == "float32":
            assert max(case["err"].values()) < 1e-4
    assert [e["s"] for e in c["bag_embedding"]] == [1, 6, 16]
    assert all(e["passed"] for e in c["bag_embedding"])


def test_kernel_and_matmul_figures(report):
    sec = report[0]["sections"]
    assert sec["matmul"]["result"]["tflops_per_s"] > 0
    rows = sec["kernels"]["result"]["configs"]
    assert [r["s"] for r in rows] == [1, 6, 16]
    for r in rows:
        for path in ("fused", "reference"):
            assert r[path]["ms_median"] > 0 and len(r[path]["ms_all"]) == 3
        assert r["fused_over_reference_time"] > 0


def test_training_figures(report):
    tr = report[0]["sections"]["train"]["result"]
    assert tr["runs"], tr
    run = tr["runs"][0]
    assert run["status"] == "finished" and run["fsdp"] is True and run["world_size"] == 1
    assert run["compile"] is False and run["switch_step"] == run["steps"] // 2
    assert run["source"] == "StoreSource"
    for ph in ("superposition", "recovery"):
        f = run[ph]
        assert f["intervals"] >= 1
        for k in ("steps_per_s", "positions_per_s", "tokens_per_s", "tflops_per_s", "mfu_vs_measured_matmul"):
            assert f[k] > 0 and math.isfinite(f[k]), (ph, k)
        assert f["mfu_datasheet"] is None  # no datasheet peak for a CPU
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
        assert math.isfinite(cp[k]), k
    assert cp["equal_step_diff_nats"] == pytest.approx(cp["final_val_loss_baseline"] - cp["final_val_loss_tst"])
    # same steps, same positions; TST reads (r*s + 1 - r) times the raw tokens
    assert cp["tst"]["raw_tokens"] == pytest.approx(cp["baseline"]["raw_tokens"] * (0.3 * 6 + 0.7), rel=0.05)
    steps_b = [s for s, _ in cp["baseline"]["val_curve"]]
    assert steps_b[-1] == 20 and len(cp["val_loss_diff_by_step"]) >= 4


def test_budget_skips_sections_and_records_them(packed, tmp_path):
    """--max-minutes 0: every section but env is skipped as over budget, and the run still writes its JSON."""
    rc = gpu_check.main(["--tiny", "--data", str(packed[0]), "--out", str(tmp_path), "--max-minutes", "0"])
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and rep["status"] == "passed"
    assert rep["sections"]["env"]["status"] == "ok"
    for name in EXPECTED[1:]:
        assert rep["sections"][name]["status"] == "skipped" and "over budget" in rep["sections"][name]["reason"]


def test_only_and_errors(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--only", "nonsense", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # train needs --data
        gpu_check.main(["--tiny", "--only", "train", "--out", str(tmp_path)])
    rc = gpu_check.main(["--tiny", "--only", "env,matmul", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and rep["sections"]["correctness"]["status"] == "skipped"
    assert rep["sections"]["matmul"]["status"] == "ok"


def test_script_imports_no_optional_stack():
    """The GPU machine has no Ray, MLflow, yaml or tokenizers: the check's imports must not need them."""
    code = (
        "import sys, builtins\n"
        "blocked = ('ray', 'mlflow', 'yaml', 'tokenizers')\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name.split('.')[0] in blocked: raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        f"sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import gpu_check, tst_ops, pipeline.model, pipeline.loop, pipeline.parallel, pipeline.metrics\n"
        "import pipeline.config, pipeline.checkpoint, pipeline.compare, pipeline.data, pipeline.data.reader\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
