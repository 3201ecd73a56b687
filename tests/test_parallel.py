"""Activation checkpointing and torch.compile are applied to an unchanged model and must not change numerics
(torchtitan's rule: a refactor that should not alter numerics shows the same loss under a fixed seed)."""

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
