"""Checkpoints with `torch.distributed.checkpoint` (DCP): sharded, resharding on load, verified, atomic.

Layout of one checkpoint folder:
    .metadata, __<rank>_0.distcp   DCP of {"model": model state, "optimizer": optimizer state} (FQN-keyed, so a
                                   checkpoint made with N FSDP ranks loads with M, or in one process)
    meta.json                      step, phase, data position, schedule, the full config (written by rank 0)
    rng-<rank>.pt                  each rank's RNG state (torch CPU, CUDA, Python `random`), restored on resume by
                                   the rank of the same number (a rank with no file of its number, after a
                                   resize, seeds from (train.seed, rank, step))
    manifest-<rank>.json           the files this rank wrote: size and sha256 of each, written last
    tokenizer.json                 the tokenizer the run used (export ships it)

Complete means verified, not present: `verify()` reads the DCP metadata and checks that every shard file it
references exists and is long enough, and that every rank's manifest is there (as many as meta.json's
`world_size`) with each listed file at its written size (and, before a checkpoint is loaded, its sha256). Only
complete checkpoints are published, listed or chosen; `latest()` walks back past an incomplete newest one with a
one-line warning.

Atomicity: a checkpoint is first written to a staging folder and only becomes visible when complete: in the
Ray-free loop by an atomic `os.rename` of `.tmp-step_N` to `step_N` (a folder of the same name, left by an
earlier attempt, is first renamed aside, never deleted before the new one is in place); under Ray Train,
`ray.train.report(checkpoint=...)` registers a checkpoint only after every rank's upload finished, from per-rank
staging folders under `<tmp>/tst-staging/` that a later process removes if their writer died.

Trust: `.metadata` and the optimizer state are unpickled by DCP when loaded, so loading a checkpoint can run code
that its author put there. Load only checkpoints you (or your cluster) wrote. The weights-only path is an export
(`tst export`: safetensors), which `tst generate` and transformers read without unpickling anything.
"""

from __future__ import annotations

import contextlib
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
    """Write a complete checkpoint into `path` (a staging folder: nothing reads it until it is published).

    Every rank writes into its own `path` under Ray (Ray merges the folders) or all into one in a single
    process; each rank lists what it wrote in its manifest, last."""
    os.makedirs(path, exist_ok=True)
    before = set(os.listdir(path))
    state = model_optim_state(model, optimizer)
    _dcp().save(state, checkpoint_id=path)
    torch.save(rng_state(), os.path.join(path, f"rng-{rank}.pt"))
    if rank == 0:
        if tokenizer_path and os.path.exists(tokenizer_path):
            shutil.copyfile(tokenizer_path, os.path.join(path, "tokenizer.json"))
        _write_json_atomic(os.path.join(path, META), meta)
    mine = sorted(n for n in set(os.listdir(path)) - before
                  if not n.startswith("manifest-") and not n.endswith(".tmp")
                  and (rank == 0 or not _rank_zero_file(n)))
    _write_json_atomic(os.path.join(path, f"manifest-{rank}.json"),
                       {"rank": rank, "files": {n: _file_record(os.path.join(path, n)) for n in mine}})
    return path


def _rank_zero_file(name: str) -> bool:
    """Files only rank 0 writes (in a shared single-process folder another rank must not list them)."""
    return name in (META, "tokenizer.json", ".metadata")


def _file_record(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def _sha256(path: str) -> str:
    from pipeline.data.store import file_sha256

    return file_sha256(path)


def rng_state() -> dict:
    """This process's RNG state: what a resumed rank restores so that anything random continues as it would."""
    import random

    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(path: str, rank: int, seed: int, step: int) -> bool:
    """Restore rank's RNG from the checkpoint (True), or seed it from (seed, rank, step) when the checkpoint has
    no state for this rank (saved by fewer ranks) (False)."""
    import random

    f = os.path.join(path, f"rng-{rank}.pt")
    if not os.path.exists(f):
        torch.manual_seed(hash((seed, rank, step)) & 0x7FFF_FFFF)
        random.seed((seed, rank, step).__repr__())
        return False
    st = torch.load(f, weights_only=True)  # tensors and tuples of ints: no pickle of code
    torch.set_rng_state(st["torch"])
    random.setstate(_as_tuple(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    return True


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


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

    why = verify(path)
    if why is not None:
        raise FileNotFoundError(f"'{path}' is not a complete tst checkpoint ({why})")
    dcp = _dcp()
    md = dcp.FileSystemReader(path).read_metadata()
    state: dict[str, Any] = {"model": {}}
    for key, item in md.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            state["model"][key[len("model."):]] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(state, checkpoint_id=path)
    return state["model"], read_meta(path)


def verify(path: str, checksums: bool = False) -> Optional[str]:
    """None if `path` is a complete checkpoint, else what is wrong with it (one phrase).

    Sizes always (cheap: a stat per file); sha256 of every file with `checksums` (before a checkpoint is loaded).
    Checkpoints written before manifests existed are checked against the DCP metadata alone."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return "no DCP .metadata"
    if not os.path.isfile(os.path.join(path, META)):
        return f"no {META}"
    try:
        md = _dcp().FileSystemReader(path).read_metadata()
        meta = read_meta(path)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt metadata file is an incomplete checkpoint
        return f"unreadable metadata ({type(e).__name__})"
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in need.items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            return f"shard {name} missing"
        if os.path.getsize(f) < size:
            return f"shard {name} truncated ({os.path.getsize(f)} of {size} bytes)"
    manifests = [n for n in os.listdir(path) if n.startswith("manifest-") and n.endswith(".json")]
    if not manifests:
        return None  # a checkpoint from before manifests: the DCP check above is all there is
    world = int(meta.get("world_size") or 1)
    if len(manifests) < world:
        return f"{len(manifests)} of {world} ranks' manifests"
    for m in manifests:
        try:
            with open(os.path.join(path, m)) as fh:
                files = json.load(fh)["files"]
        except (OSError, ValueError, KeyError):
            return f"unreadable {m}"
        for name, rec in files.items():
            f = os.path.join(path, name)
            if not os.path.isfile(f):
                return f"{name} missing"
            if os.path.getsize(f) != rec["size"]:
                return f"{name} is {os.path.getsize(f)} bytes, written as {rec['size']}"
            if checksums and _sha256(f) != rec["sha256"]:
                return f"{name} does not match its sha256"
    return None


def is_complete(path: str) -> bool:
    return verify(path) is None


def _folder_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


@contextlib.contextmanager
def newest_verified(candidates: list, *, as_directory=contextlib.nullcontext, name=_folder_name,
                    checksums: bool = True, say=print):
    """Yield the local folder of the newest candidate (candidates oldest first) that verifies, or None; one warning
    line if newer ones did not. `as_directory(c)` is a context giving candidate c's local folder: the folder itself
    for local paths, Ray's `Checkpoint.as_directory` (a download from remote storage) on the Ray path, so only the
    candidates actually inspected are fetched. `name(c)` names a candidate in the warning."""
    skipped = []
    for cand in reversed(candidates):
        with as_directory(cand) as path:
            why = verify(path, checksums=checksums)
            if why is None:
                if skipped:
                    say(f"[tst] warning: skipped incomplete checkpoint(s) {'; '.join(skipped)}; resuming from "
                        f"{name(cand)}")
                yield path
                return
        skipped.append(f"{name(cand)} ({why})")
    if skipped:
        say(f"[tst] warning: no complete checkpoint ({'; '.join(skipped)}); starting from step 0")
    yield None


def choose_checkpoint(candidates: list[str], checksums: bool = True, say=print) -> Optional[str]:
    """The newest verified checkpoint folder of `candidates` (local paths, oldest first), or None."""
    with newest_verified(candidates, checksums=checksums, say=say) as path:
        return path


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
        why = verify(staging)
        if why is not None:
            raise RuntimeError(f"refusing to publish incomplete checkpoint {staging}: {why}")
        if os.path.exists(final):  # an earlier attempt at this step (e.g. redone after a walk-back): set aside
            aside = os.path.join(self.root, f".old-step_{step:08d}-{os.getpid()}")
            os.rename(final, aside)
        os.rename(staging, final)  # atomic on one filesystem: readers see all of it or none
        self.prune()
        return final

    def all_steps(self) -> list[str]:
        """Every published step folder, oldest first, complete or not."""
        out = [(int(m.group(1)), os.path.join(self.root, n)) for n in os.listdir(self.root)
               if (m := _STEP_DIR.match(n))]
        return [p for _, p in sorted(out)]

    def list(self) -> list[str]:
        return [p for p in self.all_steps() if is_complete(p)]

    def latest(self, say=print) -> Optional[str]:
        """The newest verified checkpoint (sizes and sha256), walking back past incomplete ones."""
        return choose_checkpoint(self.all_steps(), checksums=True, say=say)

    def prune(self) -> None:
        for path in self.list()[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):  # leftovers of crashed saves and set-aside attempts
            if name.startswith((".tmp-", ".old-")):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


STAGING_ROOT = "tst-staging"


def staging_dir(step: int, rank: int) -> str:
    """A rank's private staging folder under <tmp>/tst-staging, named with its pid so that `sweep_staging` can
    tell a dead writer's leftovers from a live one's."""
    import tempfile

    root = os.path.join(tempfile.gettempdir(), STAGING_ROOT)
    os.makedirs(root, exist_ok=True)
    sweep_staging(root)
    return tempfile.mkdtemp(prefix=f"step{step:08d}-rank{rank}-pid{os.getpid()}-", dir=root)


def sweep_staging(root: str) -> int:
    """Remove staging folders whose writing process is gone (a killed worker's). Returns how many."""
    n = 0
    for name in os.listdir(root):
        m = re.search(r"-pid(\d+)-", name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        n += 1
    return n


# -- resume: does this checkpoint continue this run? ----------------------------------------------------------------
CHECKPOINT_FORMAT = 2  # 1: no manifests/RNG/stream; 2: this file's layout. A newer format is refused.

# Keys that are not part of the data stream's identity but still make another run (the model is checked by the
# load itself: a different shape does not load).
RESUME_KEYS = ("train.steps", "train.switch_fraction", "train.global_batch_size", "data.bag_size", "data.seq_len",
               "train.seed")


def check_resume(cfg, meta: dict, source=None) -> None:
    """The one decision whether a checkpoint may continue under `cfg` reading `source`: refuse, in one line,
    anything that would change which tokens a step reads (the stores' content ids, their mixture weights, the
    layout, the shuffle and its seed, the schedule: `StoreSource.identity()`), the run's T/r/s/B/L/seed, or a
    checkpoint format this code does not know. `run.allow_resume_changes=true` continues anyway."""
    from pipeline.config import Config, ConfigError

    fmt = int(meta.get("format_version") or 1)
    if fmt > CHECKPOINT_FORMAT:
        raise ConfigError(f"cannot resume: the checkpoint has format {fmt}, this tst reads up to {CHECKPOINT_FORMAT}; "
                          f"upgrade tst")
    if cfg.run.allow_resume_changes:
        return
    fix = "; use the saved config, or set run.allow_resume_changes=true to continue anyway"
    saved = Config.from_dict({k: v for k, v in meta["config"].items() if k != "model"}).flatten()
    now = cfg.flatten()
    diff = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError("cannot resume: the checkpoint belongs to a different run (" + "; ".join(diff) + ")" + fix)
    stream = meta.get("stream")
    ident = source.identity() if source is not None and hasattr(source, "identity") else None
    if stream and ident:
        stream = json.loads(json.dumps(stream))  # tuples and lists compare alike
        ident = json.loads(json.dumps(ident))
        diff = [f"{k}: saved {stream.get(k)!r}, now {ident.get(k)!r}" for k in sorted(set(stream) | set(ident))
                if stream.get(k) != ident.get(k)]
        if diff:
            raise ConfigError("cannot resume: the data stream differs from the checkpoint's (" + "; ".join(diff) +
                              "); restore the data and data.* settings" + fix)
        return
    saved_store, store_id = meta.get("data_store"), getattr(source, "store_id", None)  # format 1 checkpoints
    if saved_store and store_id and saved_store != store_id:
        raise ConfigError(f"cannot resume: the checkpoint read token store {saved_store}, but data.source or the "
                          f"tokenizer now give store {store_id} (the corpus changed); restore the data" + fix)


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
