"""Activation checkpointing and torch.compile are applied to an unchanged model and must not change numerics
(torchtitan's rule: a refactor that should not alter numerics shows the same loss under a fixed seed)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import Config, apply_overrides
from pipeline.train.loop import build_model, make_batch
from pipeline.train.parallel import parallelize

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.intermediate_size=128"]


def _loss_and_grads(layers=2, **kw):
    cfg = apply_overrides(Config(), SMALL + [f"model.num_layers={layers}"])
    model, _ = build_model(cfg, 300, torch.device("cpu"))
    names = [n for n, _ in model.named_parameters()]
    parallelize(model, distributed=False, **kw)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints stay interchangeable
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 300, (2, 4 * 16 + 4), generator=g)
    inputs, targets = make_batch(windows, 4, 16)  # superposition: (2, 16, 4) bags, (2, 16, 4) targets
    loss = model(inputs, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check(layers, **kw):
    ref_loss, ref_grads = _loss_and_grads(layers)
    loss, grads = _loss_and_grads(layers, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_keeps_loss_and_grads():
    _check(2, activation_checkpointing=True)


def test_compile_keeps_loss_and_grads():
    _check(1, compile=True)  # one block: inductor's CPU compile is the slow part, not the check


# ---------------------------------------------------------------------------------------------------------------
# bf16: the two ways the trainer runs it (pipeline/train/loop.py Trainer: train.dtype=bfloat16), on CPU
# ---------------------------------------------------------------------------------------------------------------
BF16 = SMALL + ["data.seq_len=16", "data.bag_size=4", "train.global_batch_size=2", "train.steps=4",
                "train.switch_fraction=0.5", "train.warmup_steps=1", "scaling.num_workers=1"]


class _NoSource:
    """train_step is handed its windows; nothing else of a source is used here."""


def _bf16_and_fp32_steps(tmp: str) -> dict:
    """One training step (s = 4, 2 windows) in float32 and in bfloat16 from the same initial weights, with the
    dtypes seen inside. Without a process group the bf16 step runs under torch.autocast; inside a (1-rank, gloo)
    group it runs FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)."""
    from pipeline.train.loop import LocalReporter, Trainer

    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 300, (2, 4 * 16 + 4), generator=g)
    out = {}
    for dt in ("float32", "bfloat16"):
        cfg = apply_overrides(Config(), BF16 + [f"train.dtype={dt}"])
        tr = Trainer(cfg, _NoSource(), LocalReporter(os.path.join(tmp, dt), None, resume=False), vocab_size=300)
        seen = set()
        for block in tr.model.layers:  # what the matmuls of each block put out
            for lin in (block.attention.wq, block.attention.wo, block.feed_forward.w1, block.feed_forward.w2):
                lin.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype)))
        grads = {}
        step = tr.optimizer.step

        def keep_grads_then_step(*a, **k):
            for n, p in tr.model.named_parameters():
                gr = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[n] = (str(p.grad.dtype), gr.double().tolist())
            return step(*a, **k)

        tr.optimizer.step = keep_grads_then_step
        loss, gnorm = tr.train_step(0, windows)
        out[dt] = {"autocast": tr.autocast, "fsdp": type(tr.model).__name__.startswith("FSDP"), "loss": loss,
                   "grad_norm": gnorm, "matmul_out": sorted(seen), "grads": grads,
                   "params": sorted({str(p.dtype) for p in tr.model.parameters()})}
    return out


def _check_bf16_against_fp32(out: dict) -> None:
    """Tolerances: bf16 keeps 8 significant bits (a relative rounding of 2^-9 per value); the matmuls accumulate
    in float32 and the loss's softmax runs in float32. The loss, a mean over 128 targets of ~5.7 nats, agrees
    within 1e-3 relative (seen: 2e-5); each parameter's gradient within 5 % in relative norm (seen: <= 1 %)."""
    f, b = out["float32"], out["bfloat16"]
    assert f["matmul_out"] == ["torch.float32"] and b["matmul_out"] == ["torch.bfloat16"], (f, b)
    # master weights and gradients stay float32 (the optimizer's state and update are float32)
    assert f["params"] == b["params"] == ["torch.float32"]
    assert {dt for dt, _ in b["grads"].values()} == {"torch.float32"}
    assert b["loss"] != f["loss"]  # the bf16 step really computed in bf16 ...
    assert abs(b["loss"] - f["loss"]) <= 1e-3 * f["loss"], (b["loss"], f["loss"])  # ... and stayed close
    assert abs(b["grad_norm"] - f["grad_norm"]) <= 2e-2 * f["grad_norm"], (b["grad_norm"], f["grad_norm"])
    assert f["grads"].keys() == b["grads"].keys()
    for n in f["grads"]:
        gf, gb = torch.tensor(f["grads"][n][1]), torch.tensor(b["grads"][n][1])
        assert ((gb - gf).norm() / gf.norm()).item() < 5e-2, n


def test_bf16_autocast_step_on_cpu_matches_fp32(tmp_path):
    out = _bf16_and_fp32_steps(str(tmp_path))
    assert out["bfloat16"]["autocast"] and not out["bfloat16"]["fsdp"] and not out["float32"]["autocast"]
    _check_bf16_against_fp32(out)


FSDP_BF16 = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
torch.set_num_threads(1)
import test_parallel
print("RESULT " + json.dumps(test_parallel._bf16_and_fp32_steps({tmp!r})))
dist.destroy_process_group()
"""


def test_bf16_fsdp2_mixed_precision_step_on_cpu_matches_fp32(tmp_path):
    """The GPU machine's path (FSDP2, bf16 parameters for compute, float32 reduction), on a 1-rank gloo group in
    its own process (a process group in the test process would make every later Trainer distributed)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = FSDP_BF16.format(tests=tests, store=str(tmp_path / "pg"), tmp=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(tests), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert out["bfloat16"]["fsdp"] and out["float32"]["fsdp"] and not out["bfloat16"]["autocast"]
    _check_bf16_against_fp32(out)
