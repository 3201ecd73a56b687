"""Parallelism, activation checkpointing and compile, applied to an UNCHANGED model (torchtitan style).

The model file knows nothing of this module. Order matters, as in torchtitan: activation checkpointing, then
compile (per transformer block, so FQNs and the state dict stay those of the plain model), then FSDP2
(`fully_shard` per block, then the root, which also owns the embeddings and the LM head: the fused loss runs
inside the root's forward, so the head weight is unsharded when it is used).

CPU runs use gloo and float32; GPU runs use NCCL and bf16 mixed precision (parameters cast to bf16 for
compute, gradients reduced in float32, master weights and optimizer state in float32).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward. Wraps the block's forward in place
    (instead of `checkpoint_wrapper`) so that parameter names, and thus checkpoints, do not change."""
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: nn.Module) -> None:
    """`torch.compile` each block in place (`Module.compile` keeps FQNs), like torchtitan."""
    for block in _blocks(model):
        block.compile(dynamic=False)


def apply_fsdp(model: nn.Module, mesh=None, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """FSDP2: shard every block, then the root. Needs an initialised process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    blocks = list(_blocks(model))
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again right away by the root's backward: keep them gathered
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def parallelize(model: nn.Module, *, distributed: bool, activation_checkpointing: bool = False,
                compile: bool = False, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if distributed:
        apply_fsdp(model, param_dtype=param_dtype)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of gradient accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (all ranks), clipped in place; returns the norm before clipping as a plain tensor."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


def _blocks(model: nn.Module):
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError("model has no `layers` ModuleList of transformer blocks")
    return layers.values() if isinstance(layers, nn.ModuleDict) else layers


def init_single_process_group(device: torch.device) -> None:
    """A one-rank process group (gloo on CPU, NCCL on CUDA) on a free local port, so that the Ray-free loop
    applies FSDP2 (+ the bf16 MixedPrecisionPolicy) in one process, exactly as each rank of a multi-worker run
    does (bench/gpu_check.py's throughput runs). Nothing when a group exists already."""
    import socket

    if dist.is_initialized():
        return
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
