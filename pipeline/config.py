"""One dataclass config tree for a TST run (Levanter style).

Why one tree: the same dotted keys (`train.switch_fraction`, `data.bag_size`, ...) are what a user writes in a
recipe YAML, what they override on the command line (`tst train key=value`), what Ray Tune searches over, and
what MLflow records as params. `flatten()` gives those keys; `apply_overrides()` sets them.

Imports nothing but the standard library (yaml is imported only when a YAML file is loaded), so the Ray-free
loop and the GPU check can use it with PyTorch alone.

Why our own parsing (~130 lines: `_from_dict`, `_coerce`, `apply_overrides`) and not a library (issue 17 weighed
three):
- OmegaConf structured configs would give merging, dotted overrides and type checks, but it is not installed on
  the GPU machine (PyTorch and Triton only, no package registry: bench/gpu_check.py builds a Config there), and it
  rejects the `Union`/`Optional` container fields we use (`train.loss_weights`, `scaling.worker_resources`
  written as `{train_node: 1}`) unless typed as `Any`, which gives its type checking up again.
- draccus (Levanter's) parses `--key value` flags into the same dataclasses, but our override syntax `key=value`
  is shared by `tst train`, `tst tune --grid key=a,b` and the MLflow param names; switching would change every
  documented command for no new behaviour.
- tyro generates a CLI with help from docstrings, which `pipeline/cli/help.py` already does from this file's
  comments (with the recipe's values), and does not merge YAML recipes.
Revisit if the tree grows interpolation or config groups (OmegaConf's strengths); tests/test_faults.py (refused
values, names, secrets) and tests/test_cli.py (help, recipe defaults) pin the behaviour a replacement must keep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config that cannot run. The message names the key and the fix."""


@dataclass
class ModelConfig:
    """The decoder's shape. `preset` fills every field left at None (see `pipeline.model.transformer.PRESETS`)."""

    preset: str = "tiny"  # tiny | 5M | 13M | 29M | 125M | 270M | 600M | 3B | tiny-moe | 10B-A1B (see pipeline/model/transformer.py)
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    hidden_size: Optional[int] = None  # D: model width (None: the preset's)
    num_layers: Optional[int] = None  # decoder blocks
    num_heads: Optional[int] = None  # attention query heads (head dim = hidden_size / num_heads)
    num_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention; divides num_heads)
    intermediate_size: Optional[int] = None  # SwiGLU MLP width of the dense layers
    rope_theta: Optional[float] = None  # RoPE base frequency
    rms_norm_eps: Optional[float] = None  # RMSNorm epsilon
    max_position_embeddings: Optional[int] = None  # longest sequence the exported config declares
    # Mixture-of-Experts (pipeline/model/moe.py; Qwen3-MoE). num_experts 0 = dense (the Llama presets).
    num_experts: Optional[int] = None  # E: experts per MoE layer
    experts_per_token: Optional[int] = None  # k: top-k token-choice routing (Qwen3 num_experts_per_tok)
    moe_intermediate_size: Optional[int] = None  # each expert's SwiGLU width
    moe_every: Optional[int] = None  # layer i is MoE when (i + 1) % moe_every == 0 (Qwen3 decoder_sparse_step)
    router_aux_loss_coef: Optional[float] = None  # Switch load-balancing loss weight (aux = 1 at uniform routing)
    router_z_loss_coef: Optional[float] = None  # ST-MoE router z-loss weight; 0 = off
    qk_norm: Optional[bool] = None  # Qwen3's per-head RMSNorm of queries and keys (on for the MoE presets)
    init_std: float = 0.02  # std of the normal weight initialisation


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and the window shape of each phase."""

    # A file, folder, glob, comma-separated list, s3:// or gs:// URI, or "builtin:wiki" (the bundled corpus).
    source: str = "builtin:wiki"
    format: str = "auto"  # auto | text | jsonl | parquet
    text_field: str = "text"  # JSON Lines field / Parquet column holding the document
    text_split: str = "file"  # text files: "file" (one document per file) or "blank_line"
    val_source: Optional[str] = None  # a separate held-out path; None: split off val_fraction of documents
    val_fraction: float = 0.01  # share of documents held out for validation (when val_source is None)
    val_windows: int = 64  # held-out next-token windows scored at each evaluation
    # Tokenizer: "gpt2" (bundled GPT-2 BPE), "bpe:N" (byte-level BPE of vocab N trained on the corpus and
    # cached in the output dir), or a path to any tokenizer.json.
    tokenizer: str = "bpe:4096"  # gpt2 | bpe:N (trained on the corpus, cached) | a tokenizer.json path
    seq_len: int = 128  # L: latent positions per window (the baseline's context length)
    bag_size: int = 1  # s: tokens per bag in the superposition phase (1 = no superposition)
    doc_boundary: str = "cross"  # cross | mask (see tst_ops.next_bag_targets)
    on_bad_record: str = "skip"  # skip | fail: malformed JSON lines / unreadable Parquet files
    num_tokenize_actors: int = 1  # Ray Data tokenizer actors of a prepare
    tokenize_batch_size: int = 256  # documents per tokenizer call
    max_documents: Optional[int] = None  # cap on documents read (smoke tests, quick looks)
    split_seed: int = 0  # seeds the hash that picks the val_fraction of held-out documents
    eos_token: Optional[str] = None  # a tokenizer.json's end-of-document token; None: <|endoftext|>, </s>, ...
    tokenizer_train_bytes: int = 200_000_000  # bpe:N trains on at most this much train-split text
    max_epochs: Optional[int] = None  # passes over a small corpus a run may make; None: as many as needed
    prefetch_steps: int = 2  # steps each worker reads ahead of the one it trains on (a background thread)
    s3_endpoint: Optional[str] = None  # e.g. http://127.0.0.1:5000 (else $AWS_ENDPOINT_URL, else AWS)
    # The token store (pipeline/data/store.py): the corpus tokenized once into shards + index, shared by every
    # run and trial on the same data. None: <run.output_dir>/stores; multi-node runs need s3://, gs:// or a
    # shared filesystem (then set store_shared=true).
    store: Optional[str] = None
    store_shared: bool = False  # a local-path store on a filesystem every node mounts (NFS, Lustre, ...)
    shard_tokens: int = 1 << 22  # tokens per shard (4M = 8 MB as uint16): a streaming run starts after one; in the id
    verify_checksums: bool = True  # sha256 of each local shard at its first read in a process
    # a store writer silent this long is dead: preparers and a reading run's driver take its work over; readers
    # fail after twice this
    writer_timeout_s: float = 120.0
    read_block_mb: float = 1.0  # object stores: ranged-read block size (read-ahead per lane; 2 blocks kept per row)
    # What a batch is (pipeline/data/lanes.py): "lanes" (row b of every step reads lane b of the shuffled epoch)
    # or "stream" (B consecutive windows in stream order; with shuffle=false it trains behind a store being written)
    batch_layout: str = "lanes"  # lanes (row b of every step reads lane b of the epoch) | stream (consecutive)
    shuffle: bool = True  # permute the epoch by chunks, anew each epoch from (shuffle_seed, epoch); false: file order
    shuffle_chunk_tokens: int = 65536  # shuffle granularity (memory: one int per chunk)
    shuffle_seed: Optional[int] = None  # None: train.seed (so TST and its baseline with one seed read one stream)
    # A weighted mixture of corpora: {name: {source: ..., weight: ..., [format, text_field, ...]}}; each gets its own
    # store and its share of every batch's rows. Empty: data.source alone.
    sources: dict = field(default_factory=dict)
    # Ray mode prepare: resources of the Ray Data read tasks and tokenizer actors; actor_resources
    # (e.g. {"data_node": 0.001}) pins them to CPU nodes of a cluster.
    read_cpus: float = 0.5  # CPUs of each Ray Data read task
    tokenize_actor_cpus: float = 1.0  # CPUs (and tokenizer threads) of each tokenizer actor
    actor_resources: dict = field(default_factory=dict)  # extra Ray resources of read tasks and tokenizer actors


@dataclass
class TrainConfig:
    """The optimisation: steps, the two phases, AdamW and the warmup-stable-decay schedule."""

    steps: int = 400  # T: optimizer steps in the whole run, both phases
    switch_fraction: float = 0.0  # r: the first floor(r*T + 0.5) steps are superposition
    global_batch_size: int = 16  # windows per optimizer step, across all workers and micro-batches
    micro_batch_size: Optional[int] = None  # windows per forward/backward; None: the whole per-rank batch
    # MoE with > 1 micro-batch per rank: a no-grad routing pre-pass counts the step's expert choices first, so the
    # load-balancing loss uses the global batch's token fractions exactly (one more forward of the layers per step,
    # up to ~1/3 more compute); false: each micro-step's own fractions (approximate). One micro-batch: no pre-pass.
    moe_aux_prepass: bool = True
    lr: float = 3e-3  # AdamW peak learning rate (after warmup, before decay)
    min_lr_ratio: float = 0.1  # learning rate at the end of the decay, as a fraction of lr
    warmup_steps: int = 40  # linear warmup from 0 to lr
    decay_fraction: float = 0.1  # WSD: decay over the last 10% of steps (paper)
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    loss_weights: str = "uniform"  # uniform | power (w_i = 1/i, the paper's choice for s >= 8)
    seed: int = 0  # model initialisation (and, unless data.shuffle_seed, the data order)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile each decoder block
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    fused_loss_chunk: Optional[int] = None  # rows per chunk of the fused LM-head loss; None: automatic
    log_every: int = 10  # steps between progress lines and logged training metrics
    eval_every: int = 50  # steps between validation losses (also at the switch and the last step)
    checkpoint_every: int = 100  # steps between checkpoints (also at the switch and the last step)
    keep_checkpoints: int = 3  # newest checkpoints kept; older ones are deleted
    threads: Optional[int] = None  # torch intra-op threads per worker (CPU); None: leave torch's default


@dataclass
class ScalingConfig:
    """Where the loop runs. `num_workers = 0` runs the Ray-free loop in this process."""

    num_workers: int = 1  # Ray Train workers (ranks); 0: the Ray-free loop in this process
    min_workers: Optional[int] = None  # set (with num_workers as max) for elastic training
    use_gpu: bool = False  # one GPU per worker (NCCL, bf16); false: CPU workers on gloo
    cpus_per_worker: float = 0.5  # CPUs each worker asks Ray for (a local Ray has max(4, cores) logical CPUs)
    gpus_per_worker: float = 1.0  # GPUs each worker asks Ray for (use_gpu=true)
    # extra Ray resources per worker, e.g. {"train_node": 1} to target a node type; {"GPU": 1} with use_gpu=false
    # reserves a (declared) GPU but trains on CPU (the local autoscaling exercise, pipeline/local_cluster.py)
    worker_resources: dict = field(default_factory=dict)
    elastic_resize_interval_s: float = 60.0  # elastic runs: seconds between checks for capacity to grow back
    max_failures: int = 3  # worker failures Ray Train restarts from the last checkpoint before giving up
    # seconds a collective waits for a rank that stopped answering (SIGSTOP, a frozen node) before the others fail
    # and Ray restarts the group from the last checkpoint (Ray's default is 1800)
    collective_timeout_s: int = 600
    ray_num_cpus: Optional[int] = None  # logical CPUs for a local ray.init(); None: max(4, real cores)
    ray_dashboard: bool = False  # a local Ray (no $RAY_ADDRESS): also start Ray's dashboard (web UI; ~1.5 s more)


@dataclass
class RunConfig:
    """Names, outputs and tracking."""

    name: Optional[str] = None  # None: derived from the recipe and a timestamp
    output_dir: str = "outputs"  # checkpoints, metrics JSONL, tokenizer cache, local MLflow store
    storage_path: Optional[str] = None  # Ray Train storage (s3://..., NFS); None: <output_dir>/runs (the run folders)
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite:///<output_dir>/mlflow.db
    experiment: str = "tst"  # MLflow experiment name
    tracking: bool = True  # record the run in MLflow (false: metrics.jsonl and summary.json only)
    parent_run_id: Optional[str] = None  # nest this run under an MLflow parent (Tune)
    display_name: Optional[str] = None  # MLflow's run name in the UI (None: run.name); Tune sets "s4-r0.3 · search"
    resume: bool = True  # continue from the run's latest checkpoint when one exists
    allow_resume_changes: bool = False  # resume even if T, r, s, batch or data differ from the checkpoint


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # -- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flatten(self) -> dict[str, Any]:
        """Dotted keys -> values: MLflow params, Tune's search space keys, CLI overrides."""
        return flatten_dict(self.to_dict())

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _from_dict(cls, d or {}, prefix="")

    def copy(self) -> "Config":
        return Config.from_dict(json.loads(json.dumps(self.to_dict())))


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:  # sections recurse; dict-valued fields stay leaves
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def _from_dict(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        t = hints[f.name]
        v = d[f.name]
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _from_dict(t, v, prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(v, t, prefix + f.name)
    return cls(**kwargs)


def _base_types(t) -> tuple:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(t) if a is not type(None))
    return (origin or t,)


def _coerce(v: Any, t, key: str) -> Any:
    """Parse a value (from YAML or a `key=value` string) into the field's type, or fail naming the key."""
    optional = type(None) in typing.get_args(t)
    if v is None or (isinstance(v, str) and v.lower() in ("none", "null", "~")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be null")
    base = _base_types(t)[0]
    try:
        if base is bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(v, str) and v.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(v)
        if base is int:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError(v)
            if isinstance(v, str):
                f = float(v)
                if not f.is_integer():
                    raise ValueError(v)
                return int(f)
            return int(v)
        if base is float:
            return float(v)
        if base is str:
            return str(v)
        if base is dict:
            if isinstance(v, str):
                import yaml

                v = yaml.safe_load(v)
            if not isinstance(v, dict):
                raise ValueError(v)
            return dict(v)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' expects {base.__name__}, got {v!r}") from None
    return v


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Set dotted keys: `["train.switch_fraction=0.3", "data.bag_size=6"]` or a `{key: value}` dict."""
    d = cfg.to_dict()
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown config key '{key}'; run `tst train --help` for the list of keys")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key '{key}'; run `tst train --help` for the list of keys")
        if isinstance(value, str) and isinstance(node[parts[-1]], dict):
            import yaml

            value = yaml.safe_load(value)
        node[parts[-1]] = value
    return Config.from_dict(d)


def _split_override(o: str) -> tuple[str, str]:
    if "=" not in o:
        raise ConfigError(f"override '{o}' is not of the form key=value (e.g. train.switch_fraction=0.3)")
    k, v = o.split("=", 1)
    return k.strip(), v.strip()


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a recipe YAML (or the defaults), apply `key=value` overrides, and validate."""
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file '{path}' not found; pass a recipe such as recipes/tiny.yaml")
        import yaml

        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        cfg = Config.from_dict(raw)
    else:
        cfg = Config()
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject configs that cannot run, with the key and the fix in the message."""
    t, d, s = cfg.train, cfg.data, cfg.scaling
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if not 0.0 <= t.switch_fraction <= 1.0:
        raise ConfigError(f"train.switch_fraction must be in [0, 1], got {t.switch_fraction}")
    if d.bag_size < 1:
        raise ConfigError(f"data.bag_size must be >= 1, got {d.bag_size}")
    if d.seq_len < 2:
        raise ConfigError(f"data.seq_len must be >= 2, got {d.seq_len}")
    if t.loss_weights not in ("uniform", "power"):
        raise ConfigError(f"train.loss_weights must be 'uniform' or 'power', got {t.loss_weights!r}")
    if d.doc_boundary not in ("cross", "mask"):
        raise ConfigError(f"data.doc_boundary must be 'cross' or 'mask', got {d.doc_boundary!r}")
    if d.on_bad_record not in ("skip", "fail"):
        raise ConfigError(f"data.on_bad_record must be 'skip' or 'fail', got {d.on_bad_record!r}")
    if t.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"train.dtype must be auto, float32 or bfloat16, got {t.dtype!r}")
    world = max(1, s.num_workers)
    if s.min_workers is not None and not 1 <= s.min_workers <= s.num_workers:
        raise ConfigError(f"scaling.min_workers must be in [1, num_workers], got {s.min_workers}")
    wr = s.worker_resources or {}
    if "CPU" in wr:
        raise ConfigError(f"scaling.worker_resources has CPU={wr['CPU']}; set scaling.cpus_per_worker instead")
    if "GPU" in wr and s.use_gpu:
        raise ConfigError(f"scaling.worker_resources has GPU={wr['GPU']} with scaling.use_gpu=true; set "
                          f"scaling.gpus_per_worker instead (GPU in worker_resources is for use_gpu=false: reserve, "
                          f"train on CPU)")
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    # Any worker count works (rows are split as evenly as B allows; the loss uses global counts), as long as every
    # rank has a row for each of the step's micro-batches, at every elastic size.
    for w in range(s.min_workers or world, world + 1):
        if t.global_batch_size < w:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is smaller than {w} workers; every "
                              f"worker needs at least one row")
        small, large = t.global_batch_size // w, -(-t.global_batch_size // w)
        micro = t.micro_batch_size or large
        n_micro = -(-large // micro)
        if small <= (n_micro - 1) * micro:
            raise ConfigError(
                f"with {w} workers the per-worker batch is {small}-{large} rows, {n_micro} micro-batches of "
                f"train.micro_batch_size={micro}: a worker would run an empty micro-batch; pick a micro_batch_size "
                f"that divides the per-worker batch, or unset it")
    if t.warmup_steps < 0 or not 0.0 <= t.decay_fraction <= 1.0:
        raise ConfigError("train.warmup_steps must be >= 0 and train.decay_fraction in [0, 1]")
    m = cfg.model
    for k in ("num_experts", "experts_per_token", "moe_intermediate_size", "router_aux_loss_coef", "router_z_loss_coef"):
        if getattr(m, k) is not None and getattr(m, k) < 0:
            raise ConfigError(f"model.{k} must be >= 0, got {getattr(m, k)}")
    if m.moe_every is not None and m.moe_every < 1:
        raise ConfigError(f"model.moe_every must be >= 1, got {m.moe_every}")
    if m.num_experts and m.experts_per_token and m.experts_per_token > m.num_experts:
        raise ConfigError(f"model.experts_per_token ({m.experts_per_token}) must be <= model.num_experts "
                          f"({m.num_experts})")
    for k in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, k) < 1:
            raise ConfigError(f"train.{k} must be >= 1, got {getattr(t, k)}")
    _check_numbers(cfg)
    check_run_name(cfg.run.name)


def _check_numbers(cfg: Config) -> None:
    """Values torch would reject inside the workers (after Ray started, retried as if a node had died): refuse
    them here, in a second, once."""
    import math

    t, d, s = cfg.train, cfg.data, cfg.scaling
    positive = {"train.lr": t.lr, "train.eps": t.eps,
                "scaling.cpus_per_worker": s.cpus_per_worker, "data.read_block_mb": d.read_block_mb,
                "data.writer_timeout_s": d.writer_timeout_s}
    for k, v in positive.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{k} must be a finite number > 0, got {v!r}")
    unit = {"train.min_lr_ratio": t.min_lr_ratio, "train.beta1": t.beta1, "train.beta2": t.beta2}
    for k, v in unit.items():
        if not 0.0 <= v <= 1.0 or (k != "train.min_lr_ratio" and v == 1.0):
            raise ConfigError(f"{k} must be in [0, 1{']' if k == 'train.min_lr_ratio' else ')'}, got {v!r}")
    for k, v in {"train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip}.items():
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"{k} must be >= 0 (grad_clip 0: no clipping), got {v!r}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction!r}")
    if d.val_windows < 1:
        raise ConfigError(f"data.val_windows must be >= 1, got {d.val_windows}")
    if d.batch_layout not in ("lanes", "stream"):
        raise ConfigError(f"data.batch_layout must be 'lanes' or 'stream', got {d.batch_layout!r}")
    if s.num_workers < 0 or s.max_failures < 0:
        raise ConfigError("scaling.num_workers and scaling.max_failures must be >= 0")


_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+=@")


def check_run_name(name: Optional[str]) -> None:
    """A run name is a folder under <output_dir>/runs and an MLflow run name used in a search filter: plain
    characters only, so that it can neither escape the folder (`../x`) nor break the filter (`'`)."""
    if name is None:
        return
    bad = sorted(set(name) - _NAME_OK)
    if not name or name in (".", "..") or name.startswith(".") or bad:
        raise ConfigError(f"run name {name!r} is not allowed ({'characters ' + repr(''.join(bad)) if bad else 'a dot-name'}); "
                          f"use letters, digits and . _ - + = @ (no '/', quotes or spaces), not starting with '.'")


_URI_PASSWORD = None
_QUERY_SECRET = None


def redact_secrets(value: Any) -> Any:
    """A copy with credentials masked, for what leaves the machine (MLflow params and artifacts): passwords in
    URIs (`scheme://user:PASSWORD@host`) and secret-looking query parameters (`?token=...`, `X-Amz-Signature=...`).
    The run's own config.yaml keeps the values (a resume needs them)."""
    import re

    global _URI_PASSWORD, _QUERY_SECRET
    if _URI_PASSWORD is None:
        _URI_PASSWORD = re.compile(r"(://[^/@:\s]+:)([^/@\s]+)(@)")
        _QUERY_SECRET = re.compile(r"(?i)([?&][\w.-]*(?:token|secret|password|passwd|signature|credential|key)"
                                   r"[\w.-]*=)([^&\s]+)")
    if isinstance(value, str):
        return _QUERY_SECRET.sub(r"\1***", _URI_PASSWORD.sub(r"\1***\3", value))
    if isinstance(value, dict):
        return {k: redact_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    return value
