"""A Ray Tune search over TST settings at equal FLOPs, tracked in MLflow (`tst tune`).

The search spec
---------------
Search keys are the config's own dotted keys (`data.bag_size`, `train.switch_fraction`, `train.lr`,
`train.loss_weights`, ...). A spec YAML (see recipes/tune_tiny.yaml) is its own file, not part of `Config`:

    base: recipes/tiny.yaml             # the recipe every trial starts from
    overrides: [train.steps=200]        # dotted overrides applied to it (the same for every trial)
    mode: grid                          # grid: the paper's table; sample: Ray Tune search algorithm
    space:
      data.bag_size: {grid: [1, 2, 4]}  # or a plain list; sample mode also takes
      train.switch_fraction: [0.0, 0.3] #   {uniform: [lo, hi]}, {loguniform: [lo, hi]},
                                        #   {randint: [lo, hi]} (hi included), {quniform: [lo, hi, q]}
    num_samples: 8                      # sample mode: trials besides the baseline
    search_alg: optuna                  # sample mode: optuna | random
    scheduler: none                     # none | asha (see "Early stopping")
    grace_steps: 20                     # asha: recovery steps after the latest switch before any cut
    max_concurrent: null                # null: as many as the CPUs allow (see "Resources")
    backend: auto                       # auto | local | ray_train (see "Trials")

or CLI flags: `tst tune --config recipes/tiny.yaml --grid data.bag_size=1,2,4 train.switch_fraction=0,0.3`.

Decisions
---------
- Equal FLOPs: keys that change the cost of a step (`train.steps`, `train.global_batch_size`, `data.seq_len`,
  `model.*`) are refused in the space, so every trial runs the same optimizer steps on the same number of latent
  positions per step and trials differ only in TST settings (and lr / weights when searched).
- The baseline: s = 1 with any r, and r = 0 with any s, are the same run (no superposition step). Grid mode
  canonicalises all of them to one trial (s=1, r=0), shown in the table's s=1 row and r=0 column, and the
  baseline is always added (once per combination of the other searched keys, e.g. per lr). Sample mode puts
  the baseline first (`BaselineFirst` wraps the search algorithm).
- Objective: `val_loss`, the final next-token loss on the held-out windows (evaluated at the last step of
  every run), minimised.
- Early stopping (`scheduler: asha`): ASHA compares trials on `val_loss` only, reported only at evaluation
  steps, with `grace_period = latest switch step in the space + grace_steps`. Why: before its switch a TST
  trial is optimising the multi-hot loss, whose value floors near log(s) and is a different quantity from
  next-token loss; and its next-token loss right after the switch is still recovering. Comparing a trial in
  (or just out of) superposition with the baseline would cut exactly the trials TST is about. The baseline is
  never cut (it is the reference of the gain). ASHA's `max_t` is T + 1 so that no trial is stopped by reaching
  its last step before it has closed its MLflow run.
- Trials: every trial is the trainer's own `run_training`: a `TorchTrainer` run (backend `ray_train`, the Train
  V2 pattern: a function trainable that builds and fits the TorchTrainer with a report callback forwarding
  rank 0's `val_loss` to Tune), or the Ray-free one-process loop inside the trial's process when a trial fits
  one worker (backend `local`, the default for `scaling.num_workers <= 1`: no Train controller, worker group,
  placement group or process group). Measured on the 2-core dev box under load, 4 tiny trials two at a time:
  one-process trials took 8-10 s each and the search 83 s; TorchTrainer trials 52-65 s each and the search
  170 s, with identical final losses (same seeds, same loop). Multi-worker trials use the TorchTrainer. In the
  local backend the loop's metrics reach Tune through `run_training(on_metrics=...)` (`_tune_reporter`).
- Resources: trials run concurrently up to what the CPUs (and GPUs) allow: on a local machine the budget is
  the real cores (not Ray's logical CPUs), on a cluster the cluster's CPUs. A trial costs its training CPUs
  (the token store is prepared once on the driver before any trial starts, by Ray Data with `data_mode:
  ray`, in-process with `data_mode: memory`; trials only read it, so they have no data share). Torch intra-op threads per trial are set to the
  trial's CPUs so concurrent trials do not oversubscribe (2 cores: two 1-thread trials at a time).
- MLflow: one parent run for the search (created on the driver) and one child per trial, which is the
  trainer's own run nested through `run.parent_run_id` (no MLflowLoggerCallback, so no second copy). A trial
  stopped by the scheduler closes its run as KILLED; any child still RUNNING when the search returns (a killed
  trial process, an interrupted search) is marked KILLED from the driver, and reopened as RUNNING when its
  trial resumes. The parent gets the results CSV, the table, a heatmap and best-vs-baseline curves.
- Names and restore: the search is `<output_dir>/tune/<name>`; a grid trial's run name is
  `<name>-s<s>-r<r>` (`<name>-baseline`, plus `-lr<lr>` / `-w<weights>` when those are searched), a sampled
  trial's `<name>-t<index>-...`, so a restored search finds the same run folders (the trainer resumes from
  their checkpoints) and the same MLflow runs. Running the same spec again under the same name, or
  `tst tune --resume NAME`, restores the search with `Tuner.restore`: finished trials are not rerun.
  Each trial start is appended to `<search dir>/trial_starts.jsonl`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

from ray import tune as ray_tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from pipeline.config import Config, ConfigError, apply_overrides, load_config, validate
from pipeline.ray_internals import set_search_properties_compat

S_KEY = "data.bag_size"
R_KEY = "train.switch_fraction"
LR_KEY = "train.lr"
W_KEY = "train.loss_weights"
FLOPS_KEYS = ("train.steps", "train.global_batch_size", "data.seq_len", "train.micro_batch_size")
SHORT = {S_KEY: "s", R_KEY: "r", LR_KEY: "lr", W_KEY: "w"}
DIST_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")
METRIC = "val_loss"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the spec -------------------------------------------------------------------------------------------------
@dataclass
class Dim:
    """One searched key: a finite grid, or a distribution (sample mode)."""

    key: str
    kind: str  # grid | uniform | loguniform | randint | quniform
    args: list

    @property
    def finite(self) -> bool:
        return self.kind == "grid"

    def domain(self):
        if self.kind == "grid":
            return ray_tune.choice(list(self.args))
        lo, hi = self.args[0], self.args[1]
        if self.kind == "uniform":
            return ray_tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return ray_tune.loguniform(lo, hi)
        if self.kind == "randint":
            return ray_tune.randint(int(lo), int(hi) + 1)  # the spec's hi is included
        return ray_tune.quniform(lo, hi, self.args[2])

    def describe(self) -> str:
        if self.kind == "grid":
            return "{" + ", ".join(_fmt(v) for v in self.args) + "}"
        return f"{self.kind}({', '.join(_fmt(v) for v in self.args)})"


@dataclass
class SearchSpec:
    base: Optional[str] = None  # recipe YAML; None: the built-in defaults (recipes/tiny.yaml via the CLI)
    overrides: list = field(default_factory=list)
    space: dict = field(default_factory=dict)  # key -> list | {grid: [...]} | {uniform: [lo, hi]} | scalar
    mode: str = "grid"  # grid | sample
    num_samples: int = 8  # sample mode: trials besides the baseline
    search_alg: str = "optuna"  # sample mode: optuna | random
    scheduler: str = "none"  # none | asha
    grace_steps: int = 0  # asha: steps after the latest switch in the space before trials may be cut
    reduction_factor: int = 2  # asha
    max_concurrent: Optional[int] = None  # None: from the CPUs / GPUs (see module docstring)
    cpus_per_trial: Optional[float] = None  # None: training CPUs + data share
    backend: str = "auto"  # auto | local | ray_train
    data_mode: str = "memory"  # memory | ray (ray_train backend only)
    name: Optional[str] = None
    seed: int = 0  # the search algorithm's seed

    def to_dict(self) -> dict:
        return asdict(self)


SPEC_KEYS = {f for f in SearchSpec.__dataclass_fields__}


def load_spec(path: str) -> SearchSpec:
    """Read a search-spec YAML (`base`, `overrides`, `space`, `mode`, ...). Unknown keys are errors."""
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"search spec '{path}' not found; see recipes/tune_tiny.yaml for an example")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"search spec '{path}' must be a mapping")
    if "space" not in raw and "model" in raw:
        # a plain recipe: use it as the base; the space comes from --grid / --sample
        return SearchSpec(base=path)
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"unknown search-spec key '{unknown[0]}' in {path}; valid keys: {', '.join(sorted(SPEC_KEYS))}"
                          " (trial config keys go under `overrides:` as key=value)")
    spec = SearchSpec(**raw)
    if spec.base:
        spec.base = _resolve_path(spec.base, path)
    if spec.name is None:
        spec.name = os.path.splitext(os.path.basename(path))[0]
    if isinstance(spec.overrides, dict):
        spec.overrides = [f"{k}={v}" for k, v in spec.overrides.items()]
    return spec


def _resolve_path(p: str, spec_path: str) -> str:
    for cand in (p, os.path.join(os.path.dirname(os.path.abspath(spec_path)), p), os.path.join(REPO_ROOT, p)):
        if os.path.exists(cand):
            return os.path.abspath(cand)
    raise ConfigError(f"base recipe '{p}' (from {spec_path}) not found")


def parse_cli_dims(grid: list[str], sample: list[str]) -> dict:
    """`--grid key=v1,v2,...` and `--sample key=uniform:lo:hi|loguniform:lo:hi|randint:lo:hi|choice:a,b` -> space."""
    space: dict = {}
    for item in grid or []:
        key, vals = _split(item, "--grid")
        space[key] = {"grid": [v.strip() for v in vals.split(",") if v.strip()]}
    for item in sample or []:
        key, vals = _split(item, "--sample")
        kind, _, rest = vals.partition(":")
        if kind not in DIST_KINDS:
            raise ConfigError(f"--sample {item}: distribution must be one of {', '.join(DIST_KINDS)} "
                              f"(e.g. train.switch_fraction=uniform:0.1:0.5)")
        args = rest.split(",") if kind in ("grid", "choice") else rest.split(":")
        space[key] = {kind: [a.strip() for a in args if a.strip()]}
    return space


def _split(item: str, flag: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"{flag} {item!r} is not of the form key=values (e.g. data.bag_size=1,2,4)")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def parse_space(space: dict, base: Config) -> tuple[list[Dim], dict]:
    """Space entries -> (searched dims, fixed overrides). Values are typed by the config; bad keys fail here."""
    dims, fixed = [], {}
    for key, entry in (space or {}).items():
        if key in FLOPS_KEYS or key.startswith("model."):
            raise ConfigError(
                f"'{key}' cannot be searched: it changes the FLOPs of a step, and trials must run at equal FLOPs "
                f"(same steps, batch and latent positions per step); set it once in the recipe or `overrides:`")
        if isinstance(entry, dict):
            if len(entry) != 1 or next(iter(entry)) not in DIST_KINDS:
                raise ConfigError(f"space entry '{key}: {entry}' must be one of {{grid|choice|uniform|loguniform|"
                                  f"randint|quniform: ...}} or a list of values")
            kind, args = next(iter(entry.items()))
        elif isinstance(entry, (list, tuple)):
            kind, args = "grid", list(entry)
        else:
            fixed[key] = _typed(base, key, entry)
            continue
        kind = "grid" if kind == "choice" else kind
        args = list(args) if isinstance(args, (list, tuple)) else [args]
        if kind == "grid":
            if not args:
                raise ConfigError(f"space entry '{key}' has no values")
            vals = []
            for v in args:
                tv = _typed(base, key, v)
                if tv not in vals:
                    vals.append(tv)
            dims.append(Dim(key, "grid", vals))
        else:
            need = 3 if kind == "quniform" else 2
            if len(args) != need:
                raise ConfigError(f"space entry '{key}: {kind}' needs {need} numbers, got {args}")
            try:
                nums = [float(a) for a in args]
            except (TypeError, ValueError):
                raise ConfigError(f"space entry '{key}: {kind}' needs numbers, got {args}") from None
            if nums[0] >= nums[1] or (kind == "loguniform" and nums[0] <= 0):
                raise ConfigError(f"space entry '{key}: {kind}' needs 0 < lo < hi (loguniform) or lo < hi, got {args}")
            for v in nums[:2]:  # both ends must be valid values of the key
                _check_point(base, {key: int(v) if kind == "randint" else v})
            dims.append(Dim(key, kind, [int(n) for n in nums] if kind == "randint" else nums))
    return dims, fixed


def _typed(base: Config, key: str, value):
    """The value as the config types it, checked by the config's own validation (e.g. r in [0, 1])."""
    try:
        cfg = apply_overrides(base, {key: value})
        validate(cfg)
        return cfg.flatten()[key]
    except ConfigError as e:
        raise ConfigError(f"search space: {e}") from None


def _check_point(base: Config, point: dict) -> Config:
    try:
        cfg = apply_overrides(base, point)
        validate(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"search space point {point}: {e}") from None


# -- trial points and names -----------------------------------------------------------------------------------
def is_baseline(point: dict, base_flat: dict) -> bool:
    s = int(point.get(S_KEY, base_flat[S_KEY]))
    r = float(point.get(R_KEY, base_flat[R_KEY]))
    return s == 1 or r == 0.0


def canonical(point: dict, base_flat: dict) -> dict:
    """The baseline's many spellings (s=1 with any r, r=0 with any s, any slot weights) -> s=1, r=0."""
    p = dict(point)
    if is_baseline(p, base_flat):
        p[S_KEY], p[R_KEY] = 1, 0.0
        if W_KEY in p:
            p[W_KEY] = base_flat[W_KEY]
    return p


def grid_points(dims: list[Dim], fixed: dict, base: Config) -> list[dict]:
    """The cross product of the grid, baseline spellings merged into one trial, the baseline always present
    (once per combination of the non-TST keys, e.g. per learning rate). Baseline(s) first."""
    base_flat = base.flatten()
    keys = [d.key for d in dims]
    for k in (S_KEY, R_KEY):
        if k not in keys and k not in fixed:
            fixed = {**fixed, k: base_flat[k]}
    points: list[dict] = []
    for combo in itertools.product(*[d.args for d in dims]):
        p = canonical({**fixed, **dict(zip(keys, combo))}, base_flat)
        if p not in points:
            points.append(p)
    others = [k for k in keys if k not in (S_KEY, R_KEY, W_KEY)]
    for combo in {tuple(p.get(k) for k in others) for p in points}:
        b = canonical({**fixed, **dict(zip(others, combo)), S_KEY: 1, R_KEY: 0.0}, base_flat)
        for k in keys:
            b.setdefault(k, base_flat[k])
        b = canonical(b, base_flat)
        if b not in points:
            points.append(b)
    for p in points:
        _check_point(base, p)
    points.sort(key=lambda p: (not is_baseline(p, base_flat), [str(p.get(k)) for k in others]))
    return points


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def point_label(point: dict, varying: list[str], base_flat: dict) -> str:
    """`baseline` or `s4-r0.3`, plus `-lr0.003` / `-wpower` for other searched keys (stable across restores)."""
    base = is_baseline(point, base_flat)
    s, r = point.get(S_KEY, base_flat[S_KEY]), point.get(R_KEY, base_flat[R_KEY])
    parts = ["baseline" if base else f"s{s}-r{_fmt(float(r))}"]
    for k in varying:
        if k in (S_KEY, R_KEY) or (k == W_KEY and base) or k not in point:
            continue
        v = point[k]
        parts.append(f"{SHORT.get(k, k.split('.')[-1])}{_fmt(v) if not isinstance(v, float) else f'{v:.4g}'}")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def trial_label(trial_cfg: dict, trial_id: str, varying: list[str], base_flat: dict) -> str:
    """A trial's label: the grid label, or `t<index>-<point label>` for a sampled trial (stable on restore)."""
    if trial_cfg.get("label"):
        return trial_cfg["label"]
    ov = dict(trial_cfg.get("overrides", {}))
    point = {S_KEY: ov.get(S_KEY, base_flat[S_KEY]), R_KEY: ov.get(R_KEY, base_flat[R_KEY]), **ov}
    return f"t{trial_id.split('_')[-1]}-" + point_label(point, varying, base_flat)


def trial_dirname(trial) -> str:
    """Tune's folder for a trial: the run label (grid) or the trial index (sample)."""
    t = trial.config.get("trial", {})
    return t.get("label") or f"t{trial.trial_id.split('_')[-1]}"


# -- the trainable (runs in a Tune trial process) -------------------------------------------------------------
def tst_trial(config: dict) -> None:
    """One trial: the trainer's own run (TorchTrainer, or the one-process loop), nested in the search's MLflow
    parent; `val_loss` is reported to Tune at evaluation steps and, at the end, the final one."""
    import ray.tune

    from pipeline.runner import run_training

    meta, trial = config["tst"], config["trial"]
    overrides = dict(trial["overrides"])
    base = Config.from_dict(meta["base"])
    cfg = apply_overrides(base, overrides)
    base_flat = base.flatten()
    label = trial_label(trial, ray.tune.get_context().get_trial_id(), meta["varying"], base_flat)
    name = f"{meta['search']}-{label}"
    cfg.run.name = name
    cfg.run.parent_run_id = meta["parent_run_id"]
    T = cfg.train.steps
    _append_jsonl(meta["starts_file"], {"run_name": name, "trial_id": ray.tune.get_context().get_trial_id(),
                                        "pid": os.getpid(), "time": time.time()})
    if cfg.run.tracking:
        _reopen_child(cfg, name)
    try:
        if meta["backend"] == "local":
            summary = run_training(cfg, use_ray=False, name=name, console=meta.get("console", False),
                                   on_metrics=_tune_reporter(T))
        else:
            summary = run_training(cfg, use_ray=True, name=name, console=meta.get("console", False),
                                   extra_callbacks=[ValLossToTune(T)], data_mode=meta.get("data_mode", "memory"))
    except SystemExit:  # Tune stopped this trial (scheduler decision): its run did not fail, it was cut
        if cfg.run.tracking:
            _close_child(cfg, name, "KILLED", {"tst.tune.stopped_early": "true"})
        raise
    final = {
        METRIC: summary.get("final_val_loss"),
        "step": summary.get("step"),
        "final": 1,
        "status": summary.get("status"),
        "raw_tokens": summary.get("raw_tokens"),
        "epochs": summary.get("epochs"),
        "wall_s": summary.get("wall_s"),
        "run_name": name,
        "run_dir": summary.get("run_dir"),
        "mlflow_run_id": summary.get("mlflow_run_id") or "",
    }
    ray.tune.report({k: v for k, v in final.items() if v is not None})


def _tune_metrics(m: dict) -> dict:
    out = {k: m[k] for k in (METRIC, "step", "train_loss", "raw_tokens", "elapsed_s", "epoch", "bag_size")
           if isinstance(m.get(k), (int, float))}
    out["phase"] = m.get("phase", "")
    out["final"] = 0
    return out


def _forward(m: Optional[dict], total_steps: int) -> bool:
    """Tune sees evaluation records only (every result carries `val_loss`), and not the last step's: that one
    is reported by the trainable once the run is closed (so a scheduler never cuts a run at its last step)."""
    return bool(m) and m.get(METRIC) is not None and m.get("kind") != "final" and 0 < int(m.get("step", 0)) < total_steps


def _tune_reporter(total_steps: int):
    """The local backend's hook (`run_training(on_metrics=...)`): every record the one-process loop logs (after
    JSONL and MLflow) that carries `val_loss` is also sent to `ray.tune.report`."""
    import ray.tune

    def report(metrics: dict) -> None:
        if _forward(metrics, total_steps):
            ray.tune.report(_tune_metrics(metrics))

    return report


class ValLossToTune(TuneReportCallback):
    """`TuneReportCallback` that forwards only rank 0's evaluation records (with `val_loss`) to Tune."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = total_steps

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = metrics[0] if metrics else None
        if _forward(m, self.total_steps):
            self._training_actor_item_queue.put(_tune_metrics(m))


def _append_jsonl(path: str, rec: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _client(cfg: Config):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.run.tracking_uri)


def _reopen_child(cfg: Config, name: str) -> None:
    """A resumed trial's child run (closed KILLED when its process died) is RUNNING again while it trains."""
    from pipeline.report.tracking import MlflowTracker

    try:
        rid = MlflowTracker.find_run(cfg.run.tracking_uri, cfg.run.experiment, name)
        if rid and _client(cfg).get_run(rid).info.status != "RUNNING":
            _client(cfg).update_run(rid, status="RUNNING")
    except Exception as e:  # tracking problems surface in run_training with their own message
        warnings.warn(f"could not reopen MLflow run {name}: {e}")


def _close_child(cfg: Config, name: str, status: str, tags: Optional[dict] = None) -> None:
    from pipeline.report.tracking import MlflowTracker

    try:
        rid = MlflowTracker.find_run(cfg.run.tracking_uri, cfg.run.experiment, name)
        if rid:
            c = _client(cfg)
            for k, v in (tags or {}).items():
                c.set_tag(rid, k, v)
            c.set_terminated(rid, status=status)
    except Exception as e:
        warnings.warn(f"could not close MLflow run {name}: {e}")


# -- early stopping -------------------------------------------------------------------------------------------
class BaselineKeepingASHA(ASHAScheduler):
    """ASHA on `val_loss` that never cuts the baseline (the reference every gain is measured against)."""

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and _trial_is_baseline(trial):
            return TrialScheduler.CONTINUE
        return decision


def _trial_is_baseline(trial) -> bool:
    t = trial.config.get("trial", {})
    if "baseline" in t:
        return bool(t["baseline"])
    ov = t.get("overrides", {})
    base = trial.config.get("tst", {}).get("base", {})
    s = ov.get(S_KEY, base.get("data", {}).get("bag_size", 1))
    r = ov.get(R_KEY, base.get("train", {}).get("switch_fraction", 0.0))
    return int(s) == 1 or float(r) == 0.0


def asha_grace(points_or_dims, base: Config, grace_steps: int) -> int:
    """Steps before any comparison: the latest switch step any trial can have, plus the recovery grace."""
    from tst_ops.schedule import switch_step

    T = base.train.steps
    rs = []
    for item in points_or_dims:
        if isinstance(item, Dim):
            if item.key == R_KEY:
                rs.append(max(float(a) for a in (item.args if item.finite else item.args[:2])))
        else:
            rs.append(float(item.get(R_KEY, base.train.switch_fraction)))
    r_max = max(rs) if rs else base.train.switch_fraction
    return switch_step(T, r_max) + int(grace_steps)


# -- resources ------------------------------------------------------------------------------------------------
@dataclass
class ResourcePlan:
    usable_cpus: float
    train_cpus: float
    data_cpus: float
    per_trial_cpus: float
    max_concurrent: int
    threads: int
    trial_resources: dict
    note: str


def plan_resources(cfg: Config, spec: SearchSpec, backend: str, n_trials: int) -> ResourcePlan:
    import ray

    sc, d = cfg.scaling, cfg.data
    cluster = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    on_cluster = os.environ.get("RAY_ADDRESS", "local") not in ("", "local") or len(alive) > 1
    cpus = float(cluster.get("CPU", 1.0))
    usable = cpus if on_cluster else min(cpus, float(os.cpu_count() or 1))
    workers = 1 if backend == "local" else max(1, sc.num_workers)
    # A training process keeps at least one core busy whatever fraction of a logical CPU it reserved (the
    # tiny recipe's workers ask for 0.5 to dodge the 2-core trap), so the budget counts whole cores per worker.
    train_cpus = workers * max(1.0, sc.cpus_per_worker)
    # The driver prepares the token store before any trial starts; trials only read it (no data share).
    data_cpus = 0.0
    per_trial = float(spec.cpus_per_trial or train_cpus)
    limit = max(1, int(usable // per_trial + 1e-9))
    if sc.use_gpu:
        gpus = float(cluster.get("GPU", 0.0))
        per_gpu = workers * sc.gpus_per_worker
        limit = min(limit, max(1, int(gpus // per_gpu))) if per_gpu else limit
    max_conc = max(1, min(spec.max_concurrent or limit, n_trials or 1))
    threads = cfg.train.threads or max(1, int(train_cpus // workers))
    if backend == "local":
        res = {"cpu": train_cpus}
        if sc.use_gpu:
            res["gpu"] = sc.gpus_per_worker
    else:
        res = {"cpu": 0.1}  # the trainable only waits on fit(); the TorchTrainer's workers reserve their own
    note = (f"{usable:g} CPUs usable ({'cluster' if on_cluster else 'local cores'}), {per_trial:g} per trial "
            f"(train {train_cpus:g} + data {data_cpus:g}), {threads} torch thread(s) per worker: "
            f"{max_conc} trial(s) at a time")
    return ResourcePlan(usable, train_cpus, data_cpus, per_trial, max_conc, threads, res, note)


# -- the driver -----------------------------------------------------------------------------------------------
@dataclass
class SearchOutcome:
    name: str
    exp_dir: str
    tracking_uri: Optional[str]
    parent_run_id: Optional[str]
    rows: list  # one dict per trial (see tune.report.collect_rows)
    summary: dict  # best, baseline, gain, table text, artifacts
    interrupted: bool
    restored: bool


def build_base_config(spec: SearchSpec, cli_overrides: Optional[list] = None) -> Config:
    cfg = load_config(spec.base, list(spec.overrides or []) + list(cli_overrides or []))
    cfg.run.output_dir = os.path.abspath(cfg.run.output_dir)
    if cfg.run.tracking:
        from pipeline.report.tracking import resolve_tracking_uri

        cfg.run.tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri, cfg.run.output_dir)
    if cfg.run.storage_path and "://" not in cfg.run.storage_path:
        cfg.run.storage_path = os.path.abspath(cfg.run.storage_path)
    cfg.run.name = None
    cfg.run.parent_run_id = None
    return cfg


def choose_backend(spec: SearchSpec, cfg: Config) -> str:
    if spec.backend not in ("auto", "local", "ray_train"):
        raise ConfigError(f"backend must be auto, local or ray_train, got {spec.backend!r}")
    if spec.backend == "auto":
        return "local" if cfg.scaling.num_workers <= 1 else "ray_train"
    if spec.backend == "local" and cfg.scaling.num_workers > 1:
        raise ConfigError("backend 'local' runs one process per trial; scaling.num_workers > 1 needs ray_train")
    return spec.backend


def search_dir(output_dir: str, name: str) -> str:
    return os.path.join(os.path.abspath(output_dir), "tune", name)


def run_search(spec: SearchSpec, *, cli_overrides: Optional[list] = None, console: bool = True,
               callbacks: Optional[list] = None, resume: Optional[bool] = None) -> SearchOutcome:
    """Run (or restore and finish) a search; print and log the table. `resume=None`: restore when a search of
    this name with the same spec exists; True: it must exist; False: it must not."""
    from ray import tune

    from pipeline.train.ray_train import ensure_ray

    if spec.mode not in ("grid", "sample"):
        raise ConfigError(f"mode must be grid or sample, got {spec.mode!r}")
    if spec.scheduler not in ("none", "asha"):
        raise ConfigError(f"scheduler must be none or asha, got {spec.scheduler!r}")
    base = build_base_config(spec, cli_overrides)
    base_flat = base.flatten()
    dims, fixed = parse_space(spec.space, base)
    if fixed:
        base = apply_overrides(base, fixed)
        base_flat = base.flatten()
    if not dims:
        raise ConfigError("the search space is empty: give `space:` in the spec or --grid / --sample flags "
                          "(e.g. --grid data.bag_size=1,2,4 train.switch_fraction=0,0.3)")
    backend = choose_backend(spec, base)
    name = spec.name or "tune"
    exp_dir = search_dir(base.run.output_dir, name)
    varying = [d.key for d in dims]

    if spec.mode == "grid":
        bad = [d.key for d in dims if not d.finite]
        if bad:
            raise ConfigError(f"grid mode needs finite values; '{bad[0]}' is a distribution (use mode: sample)")
        points = grid_points(dims, {}, base)
        n_trials = len(points)
    else:
        points = []
        n_trials = spec.num_samples + 1
        if any(d.key == S_KEY and (1 in (d.args if d.finite else [d.args[0]])) for d in dims) or any(
                d.key == R_KEY and 0.0 in (d.args if d.finite else [d.args[0]]) for d in dims):
            warnings.warn("sample mode: the space includes s=1 or r=0, which are baseline runs; the baseline is "
                          "already trial 0", stacklevel=2)

    state_file = os.path.join(exp_dir, "search.json")
    fingerprint = {"spec": {k: v for k, v in spec.to_dict().items() if k not in ("max_concurrent", "cpus_per_trial")},
                   "base": _fingerprint_cfg(base), "points": points}
    from ray.tune import Tuner

    can_restore = os.path.isdir(exp_dir) and Tuner.can_restore(exp_dir)
    if resume is True and not can_restore:
        raise ConfigError(f"no search to resume at {exp_dir}")
    if resume is False and can_restore:
        raise ConfigError(f"a search named '{name}' already exists at {exp_dir}; pick another --name or resume it")
    saved = None
    if can_restore and os.path.exists(state_file):
        with open(state_file) as f:
            saved = json.load(f)
        if not _same_search(saved.get("fingerprint") or {}, json.loads(json.dumps(fingerprint))):
            raise ConfigError(
                f"a search named '{name}' with a different space or base config exists at {exp_dir}; pass another "
                f"--name to start a new one, or `tst tune --resume {name}` to finish that one as it was")
    restoring = can_restore

    if console:
        print(f"[tune] search '{name}' ({spec.mode}, {n_trials} trials{', restoring' if restoring else ''}): "
              + ", ".join(f"{d.key} in {d.describe()}" for d in dims)
              + f"; T={base.train.steps} steps x {base.train.global_batch_size}x{base.data.seq_len} latent positions "
                f"(equal FLOPs); backend {backend}", flush=True)

    if not restoring:
        _refuse_reused_name(base, name, mlflow=False)
    ensure_ray(base)
    # The data share of the driver: tokenizer (trained when bpe:N) and the token store, once, before any trial
    # starts (by Ray Data with data_mode: ray, else in-process); every trial then reads the same store and
    # tokenizes nothing. Bad input fails here.
    from pipeline.runner import prepare_data

    prepare_data(base, base.run.output_dir, "ray" if spec.data_mode == "ray" else "local", wait="complete",
                 console=console)

    plan = plan_resources(base, spec, backend, n_trials)
    if base.train.threads is None:
        base.train.threads = plan.threads
    if console:
        print(f"[tune] resources: {plan.note}", flush=True)

    parent_id = saved.get("parent_run_id") if saved else None
    tracker = None
    if base.run.tracking:
        from pipeline.report.tracking import MlflowTracker, check_reachable, environment_tags

        check_reachable(base.run.tracking_uri)
        if not restoring:
            _refuse_reused_name(base, name)
        tracker = MlflowTracker(base.run.tracking_uri, base.run.experiment, name, run_id=parent_id)
        parent_id = tracker.run_id
        tracker.client.update_run(parent_id, status="RUNNING")
        tracker.set_tags({"tst.kind": "tune", "tst.tune.mode": spec.mode, "tst.tune.backend": backend,
                          **environment_tags(1)})
        params = {k: v for k, v in base.flatten().items() if k not in varying}
        params.update({f"tune.space.{d.key}": d.describe() for d in dims})
        params.update({"tune.mode": spec.mode, "tune.trials": n_trials, "tune.scheduler": spec.scheduler,
                       "tune.search_alg": spec.search_alg if spec.mode == "sample" else "grid",
                       "tune.backend": backend, "tune.base": spec.base or "defaults"})
        tracker.log_params(params)

    meta = {"search": name, "base": base.to_dict(), "parent_run_id": parent_id, "backend": backend,
            "data_mode": spec.data_mode, "varying": varying, "starts_file": os.path.join(exp_dir, "trial_starts.jsonl"),
            "console": False}
    if not restoring:
        os.makedirs(exp_dir, exist_ok=True)
        with open(state_file, "w") as f:
            json.dump({"fingerprint": fingerprint, "parent_run_id": parent_id, "spec": spec.to_dict(),
                       "tracking_uri": base.run.tracking_uri, "experiment": base.run.experiment,
                       "output_dir": base.run.output_dir, "created": time.time()}, f, indent=1, default=str)

    trainable = ray_tune.with_resources(tst_trial, plan.trial_resources)
    progress = Progress(console, base.train.steps, varying, base.flatten())
    if restoring:  # the callbacks are those the search started with (Tune keeps its RunConfig)
        tuner = Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(spec, base, dims, points, meta, trainable, plan, exp_dir, name,
                           [progress] + list(callbacks or []), console)
    t0 = time.perf_counter()
    with _tune_console(new_search=not restoring):
        tuner.fit()
    wall = time.perf_counter() - t0

    from tune import report as rep

    rows = rep.collect_rows(exp_dir, base, varying, points, n_trials)
    interrupted = any(r["status"] in ("pending", "running") for r in rows)
    if base.run.tracking:
        rep.close_stale_children(base.run.tracking_uri, parent_id,
                                 stopped=[r["run_name"] for r in rows if r["status"] == "stopped"])
    summary = rep.summarize(rows, base, varying, spec.mode)
    summary["wall_s"] = wall
    text = rep.render(summary, rows, base, name, spec.mode, interrupted, varying)
    artifacts = rep.write_artifacts(exp_dir, rows, summary, text, name)
    summary["text"] = text
    summary["artifacts"] = artifacts
    if tracker is not None:
        rep.log_parent(tracker, summary, artifacts)
        tracker.set_tags({"tst.tune.state": "interrupted" if interrupted else "finished"})
        tracker.end("KILLED" if interrupted else "FINISHED")
    if console:
        print(text, flush=True)
        if interrupted:
            print(f"[tune] interrupted: resume with `tst tune --resume {name} --output-dir {base.run.output_dir}` "
                  f"(finished trials are not rerun)", flush=True)
        if tracker is not None:
            from pipeline.report.tracking import mlflow_command

            print(f"[tune] MLflow: parent run {parent_id} in {base.run.tracking_uri} "
                  f"(`{mlflow_command()} ui --backend-store-uri {base.run.tracking_uri}`); artifacts in {exp_dir}", flush=True)
    return SearchOutcome(name, exp_dir, base.run.tracking_uri if base.run.tracking else None, parent_id, rows,
                         summary, interrupted, restoring)


def _refuse_reused_name(base: Config, name: str, mlflow: bool = True) -> None:
    """A new search must not inherit runs of an earlier search of the same name: the trainer would resume their
    checkpoints and reopen their MLflow runs (nested under the old parent)."""
    import glob

    old = sorted(glob.glob(os.path.join(base.run.output_dir, "runs", glob.escape(name) + "-*")))
    where = f"run folders such as {old[0]}" if old else None
    if not old and mlflow and base.run.tracking:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=base.run.tracking_uri)
        exp = client.get_experiment_by_name(base.run.experiment)
        if exp is not None:
            q = name.replace("'", "")
            hits = [r for f in (f"tags.`tst.run_name` = '{q}'", f"tags.`tst.run_name` LIKE '{q}-%'")
                    for r in client.search_runs([exp.experiment_id], f, max_results=1)]
            if hits:
                where = f"MLflow runs in {base.run.tracking_uri} (e.g. '{hits[0].data.tags.get('tst.run_name')}')"
    if where:
        raise ConfigError(f"the search name '{name}' was used before ({where}) but there is no search to restore "
                          f"at {search_dir(base.run.output_dir, name)}; pass another --name")


def _same_search(saved: dict, now: dict) -> bool:
    """The same spec, points and base config. A config key added to the code since the search started (absent
    from the saved config) is not a difference: the saved trials' configs get its default when they load."""
    if saved.get("spec") != now.get("spec") or saved.get("points") != now.get("points"):
        return False
    old, new = saved.get("base", {}), now.get("base", {})
    return all(k in new and new[k] == v for k, v in old.items())


def _fingerprint_cfg(cfg: Config) -> dict:
    d = cfg.flatten()
    for k in ("train.threads", "run.name", "run.parent_run_id"):
        d.pop(k, None)
    return json.loads(json.dumps(d, default=str))


@contextlib.contextmanager
def _tune_console(new_search: bool):
    """Tune's console is ours (`Progress`): RAY_AIR_NEW_OUTPUT=0 (the legacy reporter, silent at verbose=0; the
    new one prints a table and "View detailed results here" at any verbosity) and, for a new search, no automatic
    loggers (`_new_tuner` passes Tune's CSV and JSON loggers itself, so no TensorBoard logger and no TensorBoard
    hint; a search restored from before keeps what it started with). The user's own values win."""
    wanted = {"RAY_AIR_NEW_OUTPUT": "0"}
    if new_search:
        wanted["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    set_here = [k for k in wanted if k not in os.environ]
    for k in set_here:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in set_here:
            os.environ.pop(k, None)


def _new_tuner(spec, base, dims, points, meta, trainable, plan, exp_dir, name, callbacks, console):
    tune = ray_tune
    base_flat = base.flatten()
    varying = meta["varying"]
    if spec.mode == "grid":
        trials = [{"label": point_label(p, varying, base_flat), "overrides": p,
                   "baseline": is_baseline(p, base_flat)} for p in points]
        param_space = {"tst": meta, "trial": tune.grid_search(trials)}
        search_alg, num_samples = None, 1
    else:
        param_space = {"tst": meta, "trial": {"overrides": {d.key: d.domain() for d in dims}}}
        baseline = {S_KEY: 1, R_KEY: 0.0}
        for d in dims:
            baseline.setdefault(d.key, base_flat[d.key])
        if spec.search_alg not in ("optuna", "random"):
            raise ConfigError(f"search_alg must be optuna or random, got {spec.search_alg!r}")
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = (optuna.samplers.TPESampler(seed=spec.seed) if spec.search_alg == "optuna"
                   else optuna.samplers.RandomSampler(seed=spec.seed))
        search_alg = BaselineFirst(OptunaSearch(sampler=sampler), {"trial": {"overrides": baseline,
                                                                             "baseline": True}})
        num_samples = spec.num_samples + 1
    scheduler = None
    if spec.scheduler == "asha":
        grace = asha_grace(points or dims, base, spec.grace_steps)
        T = base.train.steps
        if grace >= T:
            warnings.warn(f"asha: grace period {grace} (latest switch + grace_steps) leaves no step to compare "
                          f"before T={T}; running without early stopping", stacklevel=2)
        else:
            scheduler = BaselineKeepingASHA(time_attr="step", max_t=T + 1, grace_period=max(1, grace),
                                                  reduction_factor=spec.reduction_factor)
            if console:
                print(f"[tune] ASHA on val_loss from step {grace} (latest switch + {spec.grace_steps} recovery "
                      f"steps), reduction factor {spec.reduction_factor}; the baseline is never cut", flush=True)
    tune_config = tune.TuneConfig(
        metric=METRIC, mode="min", search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
        max_concurrent_trials=plan.max_concurrent, reuse_actors=False,
        trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    run_config = tune.RunConfig(  # the loggers ExperimentAnalysis reads (tune.report), and no TensorBoard logger
        name=name, storage_path=os.path.dirname(exp_dir), verbose=0,
        callbacks=list(callbacks) + [CSVLoggerCallback(), JsonLoggerCallback()],
        failure_config=tune.FailureConfig(max_failures=0),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


class BaselineFirst(Searcher):
    """Sample mode: the first trial is always the baseline (s=1, r=0, the base values of the other searched keys),
    the others come from the wrapped search algorithm. The baseline is outside the sampled space (Optuna refuses
    an enqueued s=1 that is not among its choices), so its result is not fed to the algorithm. A wrapper with a
    `searcher` attribute and get_state/set_state, like Tune's ConcurrencyLimiter, so Tune saves and restores it."""

    def __init__(self, searcher: Searcher, baseline: dict):
        self.searcher = searcher
        self.baseline = baseline
        self.baseline_id: Optional[str] = None
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return set_search_properties_compat(self.searcher.set_search_properties, metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str):
        if self.baseline_id is None:
            self.baseline_id = trial_id
            return json.loads(json.dumps(self.baseline))
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.baseline_id:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id != self.baseline_id:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return json.loads(json.dumps(state, default=str))

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(trial_id)


class Progress(ray_tune.Callback):
    """One console line per evaluation and per finished trial (Tune's own tables are off: verbose=0)."""

    def __init__(self, console: bool, total_steps: int, varying: list[str], base_flat: dict):
        self.console = console
        self.total_steps = total_steps
        self.varying = varying
        self.base_flat = base_flat

    def _name(self, trial) -> str:
        try:
            return trial_label(trial.config.get("trial", {}), trial.trial_id, self.varying, self.base_flat)
        except Exception:
            return trial.trial_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.console and not result.get("final") and result.get(METRIC) is not None:
            print(f"[tune]   {self._name(trial):<28} step {int(result.get('step', 0)):>6}/{self.total_steps} "
                  f"({result.get('phase', '')}) val_loss {result[METRIC]:.4f}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.console:
            return
        r = trial.last_result or {}
        v = r.get(METRIC)
        how = "done" if r.get("final") else f"stopped at step {r.get('step', '?')}"
        loss = f": val_loss {v:.4f}" if isinstance(v, float) else ""
        print(f"[tune] {self._name(trial):<30} {how}{loss}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.console:
            print(f"[tune] {self._name(trial)} failed: see {trial.local_path}/error.txt", flush=True)


__all__ = ["SearchSpec", "Dim", "load_spec", "parse_cli_dims", "parse_space", "grid_points", "point_label",
           "run_search", "tst_trial", "plan_resources", "asha_grace", "is_baseline", "canonical", "trial_label"]
