"""Checkpoints with `torch.distributed.checkpoint` (DCP): sharded, resharding on load, atomic.

Layout of one checkpoint folder:
    .metadata, __<rank>_0.distcp   DCP of {"model": model state, "optimizer": optimizer state} (FQN-keyed, so a
                                   checkpoint made with N FSDP ranks loads with M, or in one process)
    meta.json                      step, phase, data position, schedule, RNG, the full config (written by rank 0)
    tokenizer.json                 the tokenizer the run used (export ships it)

Atomicity: a checkpoint is first written to a staging folder and only becomes visible when complete: in the
Ray-free loop by an atomic `os.rename` of `.tmp-step_N` to `step_N` (a crash mid-save leaves a `.tmp-*` folder
that is never read and is cleaned up later); under Ray Train, `ray.train.report(checkpoint=...)` registers a
checkpoint only after every rank's upload finished. `latest_checkpoint()` only ever returns folders that have
both `.metadata` and `meta.json`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

import torch

META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _dcp():
    import warnings

    import torch.distributed.checkpoint as dcp

    # One process with no process group (the Ray-free loop, export) is a supported DCP mode, not a problem.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    return dcp


def model_optim_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    """FQN-keyed (possibly DTensor-sharded) state, valid with or without FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(path: str, model, optimizer, meta: dict, rank: int, tokenizer_path: Optional[str] = None) -> str:
    """Write a complete checkpoint into `path` (a staging folder: nothing reads it until it is published)."""
    os.makedirs(path, exist_ok=True)
    state = model_optim_state(model, optimizer)
    _dcp().save(state, checkpoint_id=path)
    if rank == 0:
        if tokenizer_path and os.path.exists(tokenizer_path):
            shutil.copyfile(tokenizer_path, os.path.join(path, "tokenizer.json"))
        _write_json_atomic(os.path.join(path, META), meta)
    return path


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Load model and optimizer state in place (resharding as needed); returns meta.json."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = model_optim_state(model, optimizer)
    _dcp().load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return read_meta(path)


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def load_model_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's full (unsharded) float state dict and meta.json, in one process with no process group.

    Used by export and generate; works for checkpoints written by any number of FSDP ranks.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not is_complete(path):
        raise FileNotFoundError(f"'{path}' is not a complete tst checkpoint (needs .metadata and {META})")
    dcp = _dcp()
    md = dcp.FileSystemReader(path).read_metadata()
    state: dict[str, Any] = {"model": {}}
    for key, item in md.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            state["model"][key[len("model."):]] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(state, checkpoint_id=path)
    return state["model"], read_meta(path)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, META))


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LocalCheckpointManager:
    """Checkpoints of the Ray-free loop under `<run_dir>/checkpoints/step_XXXXXXXX`, newest `keep` kept."""

    def __init__(self, run_dir: str, keep: int = 3):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep = keep
        os.makedirs(self.root, exist_ok=True)

    def staging_dir(self, step: int) -> str:
        path = os.path.join(self.root, f".tmp-step_{step:08d}")
        shutil.rmtree(path, ignore_errors=True)
        return path

    def publish(self, staging: str, step: int) -> str:
        final = os.path.join(self.root, f"step_{step:08d}")
        if not is_complete(staging):
            raise RuntimeError(f"refusing to publish incomplete checkpoint {staging}")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(staging, final)  # atomic on one filesystem: readers see all of it or none
        self.prune()
        return final

    def list(self) -> list[str]:
        out = []
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            path = os.path.join(self.root, name)
            if m and is_complete(path):
                out.append((int(m.group(1)), path))
        return [p for _, p in sorted(out)]

    def latest(self) -> Optional[str]:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def prune(self) -> None:
        for path in self.list()[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):  # leftovers of crashed saves
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def find_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder / checkpoints folder (its latest checkpoint)."""
    if is_complete(path):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(root):
            cands = []
            for name in os.listdir(root):
                p = os.path.join(root, name)
                if os.path.isdir(p) and is_complete(p) and not name.startswith(".tmp-"):
                    cands.append((read_meta(p).get("step", -1), p))
            if cands:
                return max(cands)[1]
    raise FileNotFoundError(f"no complete tst checkpoint at '{path}'; pass a checkpoint folder or a run folder")
