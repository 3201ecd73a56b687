"""A Ray Tune search over TST settings at equal FLOPs, tracked in MLflow (`tst tune`): `run_search`, the driver.

It reads the spec and its points (tune/space.py), plans the resources (tune/resources.py), prepares the data once,
opens the MLflow parent run, builds (or restores) the Tuner with the trainable (tune/trial.py), the search
algorithm and the scheduler (tune/schedule.py), runs it, and hands the trials to tune/report.py for the table,
the CSV and the figures. The spec's format is in tune/space.py.

Decisions
---------
- Equal FLOPs: keys that change the cost of a step (`train.steps`, `train.global_batch_size`, `data.seq_len`,
  `model.*`) are refused in the space, so every trial runs the same optimizer steps on the same number of latent
  positions per step and trials differ only in TST settings (and lr / weights when searched).
- The baseline: s = 1 with any r, and r = 0 with any s, are the same run (no superposition step). Grid mode
  canonicalises all of them to one trial (s=1, r=0), shown in the table's s=1 row and r=0 column, and the
  baseline is always added (once per combination of the other searched keys, e.g. per lr). Sample mode puts
  the baseline first (`tune.schedule.BaselineFirst` wraps the search algorithm; it says why not Tune's
  `points_to_evaluate`).
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
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

from ray import tune as ray_tune

from pipeline.config import Config, ConfigError, apply_overrides, load_config
from tune.resources import ResourcePlan, plan_resources
from tune.schedule import BaselineFirst, BaselineKeepingASHA, make_scheduler, make_searcher
from tune.space import (R_KEY, S_KEY, Dim, SearchSpec, grid_points, is_baseline, parse_space, point_label,
                        trial_dirname, trial_label)
from tune.trial import METRIC, tst_trial

# Searches started before tune/search.py was split into tune/ modules pickled these as `tune.search.<name>`
# (tuner.pkl: the TuneConfig's scheduler and search algorithm, the trial name creators, the callbacks;
# experiment_state-*.json: trial_dirname), so restoring or reading such a search looks them up here.
PICKLED_BEFORE_THE_SPLIT = (BaselineFirst, BaselineKeepingASHA, trial_dirname, tst_trial)


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




@dataclass
class _Search:
    """What `run_search` settles before anything runs: the base config, the space, the points, the names."""

    spec: SearchSpec
    base: Config
    dims: list[Dim]
    points: list[dict]  # grid mode: one per trial, baseline(s) first; sample mode: none (drawn by the searcher)
    n_trials: int
    backend: str
    name: str
    exp_dir: str
    fingerprint: dict  # what must be equal for a search of this name to be restored (search.json)

    @property
    def varying(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def state_file(self) -> str:
        return os.path.join(self.exp_dir, "search.json")


def run_search(spec: SearchSpec, *, cli_overrides: Optional[list] = None, console: bool = True,
               callbacks: Optional[list] = None, resume: Optional[bool] = None) -> SearchOutcome:
    """Run (or restore and finish) a search; print and log the table. `resume=None`: restore when a search of
    this name with the same spec exists; True: it must exist; False: it must not."""
    from pipeline.ray_session import ensure_ray

    s = _settle(spec, cli_overrides)
    saved, restoring = _find_saved(s, resume)
    if console:
        _announce(s, restoring)
    if not restoring:
        _refuse_reused_name(s.base, s.name, mlflow=False)
    ensure_ray(s.base)
    plan = _prepare(s, console)
    tracker, parent_id = _open_parent(s, saved, restoring)
    if not restoring:
        _save_state(s, parent_id)
    wall = _fit(s, plan, parent_id, restoring, callbacks, console)
    return _finish(s, tracker, parent_id, wall, restoring, console)


def _settle(spec: SearchSpec, cli_overrides: Optional[list]) -> _Search:
    """Check the spec, build the base config, parse the space and (grid mode) list the points. Nothing runs."""
    if spec.mode not in ("grid", "sample"):
        raise ConfigError(f"mode must be grid or sample, got {spec.mode!r}")
    if spec.scheduler not in ("none", "asha"):
        raise ConfigError(f"scheduler must be none or asha, got {spec.scheduler!r}")
    base = build_base_config(spec, cli_overrides)
    dims, fixed = parse_space(spec.space, base)
    if fixed:
        base = apply_overrides(base, fixed)
    if not dims:
        raise ConfigError("the search space is empty: give `space:` in the spec or --grid / --sample flags "
                          "(e.g. --grid data.bag_size=1,2,4 train.switch_fraction=0,0.3)")
    backend = choose_backend(spec, base)
    name = spec.name or "tune"
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
                          "already trial 0", stacklevel=3)
    fingerprint = {"spec": {k: v for k, v in spec.to_dict().items() if k not in ("max_concurrent", "cpus_per_trial")},
                   "base": _fingerprint_cfg(base), "points": points}
    return _Search(spec, base, dims, points, n_trials, backend, name, search_dir(base.run.output_dir, name),
                   fingerprint)


def _find_saved(s: _Search, resume: Optional[bool]) -> tuple[Optional[dict], bool]:
    """(the saved search.json or None, whether to restore): a search of this name restores only if it is the
    same search (`_same_search`); `resume` True / False demands that one exists / does not."""
    from ray.tune import Tuner

    can_restore = os.path.isdir(s.exp_dir) and Tuner.can_restore(s.exp_dir)
    if resume is True and not can_restore:
        raise ConfigError(f"no search to resume at {s.exp_dir}")
    if resume is False and can_restore:
        raise ConfigError(f"a search named '{s.name}' already exists at {s.exp_dir}; pick another --name or resume it")
    saved = None
    if can_restore and os.path.exists(s.state_file):
        with open(s.state_file) as f:
            saved = json.load(f)
        if not _same_search(saved.get("fingerprint") or {}, json.loads(json.dumps(s.fingerprint))):
            raise ConfigError(
                f"a search named '{s.name}' with a different space or base config exists at {s.exp_dir}; pass "
                f"another --name to start a new one, or `tst tune --resume {s.name}` to finish that one as it was")
    return saved, can_restore


def _announce(s: _Search, restoring: bool) -> None:
    print(f"[tune] search '{s.name}' ({s.spec.mode}, {s.n_trials} trials{', restoring' if restoring else ''}): "
          + ", ".join(f"{d.key} in {d.describe()}" for d in s.dims)
          + f"; T={s.base.train.steps} steps x {s.base.train.global_batch_size}x{s.base.data.seq_len} latent "
            f"positions (equal FLOPs); backend {s.backend}", flush=True)


def _prepare(s: _Search, console: bool) -> ResourcePlan:
    """The data share of the driver: tokenizer (trained when bpe:N) and the token store, once, before any trial
    starts (by Ray Data with data_mode: ray, else in-process); every trial then reads the same store and
    tokenizes nothing. Bad input fails here. Then the resource plan (and the trials' torch threads)."""
    from pipeline.runner import prepare_data

    prepare_data(s.base, s.base.run.output_dir, "ray" if s.spec.data_mode == "ray" else "local", wait="complete",
                 console=console)
    plan = plan_resources(s.base, s.spec, s.backend, s.n_trials)
    if s.base.train.threads is None:
        s.base.train.threads = plan.threads
    if console:
        print(f"[tune] resources: {plan.note}", flush=True)
    return plan


def _open_parent(s: _Search, saved: Optional[dict], restoring: bool):
    """(tracker, parent run id): the search's MLflow parent run, created or (restoring) reopened as RUNNING,
    with the base config and the space as params; (None, the saved id) when tracking is off."""
    parent_id = saved.get("parent_run_id") if saved else None
    if not s.base.run.tracking:
        return None, parent_id
    from pipeline.report.tracking import MlflowTracker, check_reachable, environment_tags

    base, spec = s.base, s.spec
    check_reachable(base.run.tracking_uri)
    if not restoring:
        _refuse_reused_name(base, s.name)
    tracker = MlflowTracker(base.run.tracking_uri, base.run.experiment, s.name, run_id=parent_id)
    parent_id = tracker.run_id
    tracker.client.update_run(parent_id, status="RUNNING")
    tracker.set_tags({"tst.kind": "tune", "tst.tune.mode": spec.mode, "tst.tune.backend": s.backend,
                      **environment_tags(1)})
    params = {k: v for k, v in base.flatten().items() if k not in s.varying}
    params.update({f"tune.space.{d.key}": d.describe() for d in s.dims})
    params.update({"tune.mode": spec.mode, "tune.trials": s.n_trials, "tune.scheduler": spec.scheduler,
                   "tune.search_alg": spec.search_alg if spec.mode == "sample" else "grid",
                   "tune.backend": s.backend, "tune.base": spec.base or "defaults"})
    tracker.log_params(params)
    return tracker, parent_id


def _save_state(s: _Search, parent_id: Optional[str]) -> None:
    """search.json: what a restore compares (fingerprint) and reuses (parent run, spec for `--resume`)."""
    base = s.base
    os.makedirs(s.exp_dir, exist_ok=True)
    with open(s.state_file, "w") as f:
        json.dump({"fingerprint": s.fingerprint, "parent_run_id": parent_id, "spec": s.spec.to_dict(),
                   "tracking_uri": base.run.tracking_uri, "experiment": base.run.experiment,
                   "output_dir": base.run.output_dir, "created": time.time()}, f, indent=1, default=str)


def _fit(s: _Search, plan: ResourcePlan, parent_id: Optional[str], restoring: bool, callbacks: Optional[list],
         console: bool) -> float:
    """Build the Tuner (or restore it: the callbacks are those the search started with, Tune keeps its
    RunConfig) and run it to the end or to Ctrl+C. Returns the wall time in seconds."""
    from ray.tune import Tuner

    meta = {"search": s.name, "base": s.base.to_dict(), "parent_run_id": parent_id, "backend": s.backend,
            "data_mode": s.spec.data_mode, "varying": s.varying,
            "starts_file": os.path.join(s.exp_dir, "trial_starts.jsonl"), "console": False}
    trainable = ray_tune.with_resources(tst_trial, plan.trial_resources)
    if restoring:
        tuner = Tuner.restore(s.exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        progress = Progress(console, s.base.train.steps, s.varying, s.base.flatten())
        tuner = _new_tuner(s, meta, trainable, plan, [progress] + list(callbacks or []), console)
    t0 = time.perf_counter()
    with _tune_console(new_search=not restoring):
        tuner.fit()
    return time.perf_counter() - t0


def _finish(s: _Search, tracker, parent_id: Optional[str], wall: float, restoring: bool,
            console: bool) -> SearchOutcome:
    """Read the trials back, close children left RUNNING, render the table and artifacts, log them to the
    parent and close it (KILLED when the search was interrupted)."""
    from tune import report as rep

    base, name = s.base, s.name
    rows = rep.collect_rows(s.exp_dir, base, s.varying, s.points, s.n_trials)
    interrupted = any(r["status"] in ("pending", "running") for r in rows)
    if base.run.tracking:
        rep.close_stale_children(base.run.tracking_uri, parent_id,
                                 stopped=[r["run_name"] for r in rows if r["status"] == "stopped"])
    summary = rep.summarize(rows, base, s.varying, s.spec.mode)
    summary["wall_s"] = wall
    text = rep.render(summary, rows, base, name, s.spec.mode, interrupted, s.varying)
    artifacts = rep.write_artifacts(s.exp_dir, rows, summary, text, name)
    summary["text"] = text
    summary["artifacts"] = artifacts
    if tracker is not None:
        rep.log_parent(tracker, summary, artifacts)
        tracker.set_tags({"tst.tune.state": "interrupted" if interrupted else "finished"})
        tracker.end("KILLED" if interrupted else "FINISHED")
    if console:
        _print_end(s, text, interrupted, parent_id if tracker is not None else None)
    return SearchOutcome(name, s.exp_dir, base.run.tracking_uri if base.run.tracking else None, parent_id, rows,
                         summary, interrupted, restoring)


def _print_end(s: _Search, text: str, interrupted: bool, parent_id: Optional[str]) -> None:
    base = s.base
    print(text, flush=True)
    if interrupted:
        print(f"[tune] interrupted: resume with `tst tune --resume {s.name} --output-dir {base.run.output_dir}` "
              f"(finished trials are not rerun)", flush=True)
    if parent_id is not None:
        from pipeline.report.tracking import mlflow_command

        print(f"[tune] MLflow: parent run {parent_id} in {base.run.tracking_uri} "
              f"(`{mlflow_command()} ui --backend-store-uri {base.run.tracking_uri}`); artifacts in {s.exp_dir}",
              flush=True)


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



def _new_tuner(s: _Search, meta: dict, trainable, plan: ResourcePlan, callbacks: list, console: bool):
    """A new Tuner: grid mode, one `grid_search` entry per point; sample mode, the searched keys' domains and
    `make_searcher`'s baseline-first algorithm for `num_samples` + 1 trials; `make_scheduler`'s ASHA if asked."""
    tune = ray_tune
    base_flat = s.base.flatten()
    if s.spec.mode == "grid":
        trials = [{"label": point_label(p, s.varying, base_flat), "overrides": p,
                   "baseline": is_baseline(p, base_flat)} for p in s.points]
        param_space = {"tst": meta, "trial": tune.grid_search(trials)}
        search_alg, num_samples = None, 1
    else:
        param_space = {"tst": meta, "trial": {"overrides": {d.key: d.domain() for d in s.dims}}}
        search_alg, num_samples = make_searcher(s.spec, s.dims, base_flat), s.spec.num_samples + 1
    scheduler = make_scheduler(s.spec, s.base, s.points or s.dims, console)
    tune_config = tune.TuneConfig(
        metric=METRIC, mode="min", search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
        max_concurrent_trials=plan.max_concurrent, reuse_actors=False,
        trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    run_config = tune.RunConfig(  # the loggers ExperimentAnalysis reads (tune.report), and no TensorBoard logger
        name=s.name, storage_path=os.path.dirname(s.exp_dir), verbose=0,
        callbacks=list(callbacks) + [CSVLoggerCallback(), JsonLoggerCallback()],
        failure_config=tune.FailureConfig(max_failures=0),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


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


__all__ = ["SearchOutcome", "run_search", "build_base_config", "choose_backend", "search_dir", "Progress"]
