"""The search space of `tst tune` and its trial points: the spec (YAML or CLI flags), the searched keys (`Dim`),
the grid with the baseline merged and always present, and the labels that name trials, run folders and MLflow
runs. Ray-free (Ray's distributions are built only in `Dim.domain`).

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
    scheduler: none                     # none | asha (see "Early stopping" in tune/search.py)
    grace_steps: 20                     # asha: recovery steps after the latest switch before any cut
    max_concurrent: null                # null: as many as the CPUs allow (see tune/resources.py)
    backend: auto                       # auto | local | ray_train (see "Trials" in tune/search.py)

or CLI flags: `tst tune --config recipes/tiny.yaml --grid data.bag_size=1,2,4 train.switch_fraction=0,0.3`.
Keys that change the FLOPs of a step are refused (`FLOPS_KEYS`, `model.*`); the decisions behind the rules
here (equal FLOPs, the baseline's spellings) are in tune/search.py.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from pipeline.config import Config, ConfigError, apply_overrides, validate

S_KEY = "data.bag_size"
R_KEY = "train.switch_fraction"
LR_KEY = "train.lr"
W_KEY = "train.loss_weights"
FLOPS_KEYS = ("train.steps", "train.global_batch_size", "data.seq_len", "train.micro_batch_size")
SHORT = {S_KEY: "s", R_KEY: "r", LR_KEY: "lr", W_KEY: "w"}
DIST_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")
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
        """The Ray Tune domain of this key (sample mode)."""
        from ray import tune as ray_tune

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


__all__ = ["SearchSpec", "Dim", "load_spec", "parse_cli_dims", "parse_space", "grid_points", "is_baseline",
           "canonical", "point_label", "trial_label", "trial_dirname"]
