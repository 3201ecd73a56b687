"""Which trials run and which are cut: sample mode's baseline-first search algorithm (Optuna's TPE or random
sampler behind `BaselineFirst`) and early stopping (`BaselineKeepingASHA` with `asha_grace`). See "Early
stopping" and "The baseline" in tune/search.py for the decisions.
"""

from __future__ import annotations

import json
import warnings
from typing import Optional

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from pipeline.config import Config, ConfigError
from pipeline.ray_internals import set_search_properties_compat
from tune.space import R_KEY, S_KEY, Dim, SearchSpec


# -- sample mode: the baseline first, then the search algorithm -----------------------------------------------
def make_searcher(spec: SearchSpec, dims: list[Dim], base_flat: dict) -> "BaselineFirst":
    """Optuna (TPE, or its random sampler for `search_alg: random`) seeded with `spec.seed`, behind
    `BaselineFirst` so that trial 0 is the baseline: s=1, r=0 and the base values of the other searched keys."""
    if spec.search_alg not in ("optuna", "random"):
        raise ConfigError(f"search_alg must be optuna or random, got {spec.search_alg!r}")
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    baseline = {S_KEY: 1, R_KEY: 0.0}
    for d in dims:
        baseline.setdefault(d.key, base_flat[d.key])
    sampler = (optuna.samplers.TPESampler(seed=spec.seed) if spec.search_alg == "optuna"
               else optuna.samplers.RandomSampler(seed=spec.seed))
    return BaselineFirst(OptunaSearch(sampler=sampler), {"trial": {"overrides": baseline, "baseline": True}})


class BaselineFirst(Searcher):
    """Sample mode: the first trial is always the baseline (s=1, r=0, the base values of the other searched keys),
    the others come from the wrapped search algorithm. The baseline is outside the sampled space, so its result is
    not fed to the algorithm. A wrapper with a `searcher` attribute and get_state/set_state, like Tune's
    ConcurrencyLimiter, so Tune saves and restores it (and `max_concurrent_trials` wraps it in one).

    Why not Tune's own `OptunaSearch(points_to_evaluate=[baseline])` (checked against Ray 2.60.0, Optuna 5.0.0):
    it does suggest the point first (Optuna's `enqueue_trial`; ConcurrencyLimiter keeps the order), but
    - a baseline outside a categorical dimension is refused: with `data.bag_size: {grid: [2]}` (as in
      tests/test_tune.py's sample search) `suggest` raises `ValueError: '1' not in (2,)`, because Optuna's
      `CategoricalDistribution.to_internal_repr` has no index for s=1;
    - outside a numeric range (s=1 under `randint: [2, 8]`, r=0 under `uniform: [0.1, 0.5]`) Optuna only warns
      and then tells TPE the baseline's result, so the baseline, which is not a point of the space, shapes the
      samples: with TPE seed 0 and the same losses, the first 9 sampled points were the same and the 10th to
      13th differed (counting the baseline, TPE ends its 10 random startup trials one trial early, and its model
      then includes the baseline's loss);
    - the suggested config holds only the searched keys, not our `baseline: True` marker.
    `BasicVariantGenerator(points_to_evaluate=...)` would take the point as given, but it is Tune's random search,
    not Optuna's (other samples for the same seed), and there is no TPE behind it."""

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


def make_scheduler(spec: SearchSpec, base: Config, points_or_dims, console: bool) -> Optional[BaselineKeepingASHA]:
    """`scheduler: asha`: ASHA on `val_loss` from the latest switch + `grace_steps`, `max_t` = T + 1 (so no trial
    is stopped by reaching its last step before it has closed its MLflow run); None without early stopping."""
    if spec.scheduler != "asha":
        return None
    grace = asha_grace(points_or_dims, base, spec.grace_steps)
    T = base.train.steps
    if grace >= T:
        warnings.warn(f"asha: grace period {grace} (latest switch + grace_steps) leaves no step to compare "
                      f"before T={T}; running without early stopping", stacklevel=2)
        return None
    if console:
        print(f"[tune] ASHA on val_loss from step {grace} (latest switch + {spec.grace_steps} recovery "
              f"steps), reduction factor {spec.reduction_factor}; the baseline is never cut", flush=True)
    return BaselineKeepingASHA(time_attr="step", max_t=T + 1, grace_period=max(1, grace),
                               reduction_factor=spec.reduction_factor)


__all__ = ["BaselineFirst", "BaselineKeepingASHA", "asha_grace", "make_searcher", "make_scheduler"]
