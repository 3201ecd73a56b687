"""`tst tune`: a Ray Tune search over TST settings (the spec: tune/space.py; the decisions: tune/search.py).

Imports nothing heavy at registration; Ray, MLflow and the trainer load when the command runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

EPILOG = """\
examples:
  tst tune --config recipes/tune_tiny.yaml                 # the spec's grid, printed like the paper's tables
  tst tune --config recipes/tiny.yaml --grid data.bag_size=1,2,4 train.switch_fraction=0,0.3 train.steps=200
  tst tune --config recipes/tiny.yaml --mode sample --num-samples 12 \\
      --sample train.switch_fraction=uniform:0.1:0.5 data.bag_size=randint:2:8 train.lr=loguniform:1e-3:1e-2
  tst tune --resume tune_tiny                              # finish an interrupted search (finished trials kept)

The search is <output_dir>/tune/NAME; running the same spec again under the same NAME restores it. Trials run
at equal FLOPs (train.steps, batch, seq_len and model.* cannot be searched); the baseline (s=1 / r=0) is always
one trial. MLflow: one parent run NAME, one nested child per trial (the trainer's own run).
"""

CONFIG_SECTIONS = {"model", "data", "train", "scaling", "run"}


def register(sub) -> None:
    from pipeline.cli.help import default_recipe, describe_keys

    p = sub.add_parser(
        "tune", help="Ray Tune search over switch fraction and bag size (and lr / weights) at equal FLOPs",
        description="Search TST settings with Ray Tune: grid mode reproduces the paper's (s, r) tables, sample "
                    "mode uses a search algorithm (Optuna) for larger spaces. Every trial is a full training "
                    "run at the same steps and latent positions per step, tracked as a child MLflow run.",
        epilog=EPILOG + "\n" + describe_keys(default_recipe()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="search spec YAML (base, overrides, space, mode, ...) or a plain recipe with --grid/--sample "
                        "(default: recipes/tiny.yaml)")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="grid values for a dotted key, e.g. data.bag_size=1,2,4 train.switch_fraction=0,0.3")
    p.add_argument("--sample", nargs="+", default=[], metavar="KEY=DIST:A:B",
                   help="a distribution for a dotted key: uniform:lo:hi, loguniform:lo:hi, randint:lo:hi "
                        "(hi included), quniform:lo:hi:q, choice:a,b,c")
    p.add_argument("--mode", choices=["grid", "sample"], default=None, help="override the spec's mode")
    p.add_argument("--num-samples", type=int, default=None, help="sample mode: trials besides the baseline")
    p.add_argument("--search-alg", choices=["optuna", "random"], default=None)
    p.add_argument("--scheduler", choices=["none", "asha"], default=None,
                   help="asha: early stopping on val_loss, never before the latest switch + --grace-steps")
    p.add_argument("--grace-steps", type=int, default=None)
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at a time (default: what CPUs allow)")
    p.add_argument("--backend", choices=["auto", "local", "ray_train"], default=None,
                   help="trial runner: one-process loop (local) or a TorchTrainer (ray_train); auto: local for one "
                        "worker")
    p.add_argument("--name", default=None, help="search name (default: the spec file's name)")
    p.add_argument("--resume", metavar="NAME", default=None,
                   help="finish the interrupted search NAME (its saved spec) without rerunning finished trials")
    p.add_argument("--output-dir", default=None, help="shortcut for run.output_dir")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                                        "sqlite:///<output_dir>/mlflow.db)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every trial")
    p.set_defaults(func=cmd_tune)


def _load_yaml(path: str) -> dict:
    import yaml

    from pipeline.config import ConfigError

    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' not found")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def build_spec(args):
    """The SearchSpec from --config (spec or recipe) and the flags; CLI overrides become part of the spec."""
    from pipeline.config import ConfigError
    from pipeline.cli.train import DEFAULT_RECIPE
    from tune.space import SearchSpec, load_spec, parse_cli_dims

    path = args.config
    if path and not (set(_load_yaml(path)) <= CONFIG_SECTIONS):
        spec = load_spec(path)
    else:
        recipe = path or (DEFAULT_RECIPE if os.path.exists(DEFAULT_RECIPE) else None)
        spec = SearchSpec(base=os.path.abspath(recipe) if recipe else None)
    space = parse_cli_dims(args.grid, args.sample)
    if space:
        spec.space = {**(spec.space or {}), **space}
        if args.sample and args.mode is None:
            spec.mode = "sample"
    for flag, attr in (("mode", "mode"), ("num_samples", "num_samples"), ("search_alg", "search_alg"),
                       ("scheduler", "scheduler"), ("grace_steps", "grace_steps"),
                       ("max_concurrent", "max_concurrent"), ("backend", "backend"), ("name", "name")):
        v = getattr(args, flag)
        if v is not None:
            setattr(spec, attr, v)
    extra = list(args.overrides or [])
    if args.output_dir:
        extra.append(f"run.output_dir={args.output_dir}")
    if args.tracking_uri:
        extra.append(f"run.tracking_uri={args.tracking_uri}")
    spec.overrides = list(spec.overrides or []) + extra
    if not spec.space:
        raise ConfigError("no search space: give a spec with `space:` (see recipes/tune_tiny.yaml) or "
                          "--grid / --sample flags")
    if not spec.name:  # recipe + flags: a name from the recipe and the space, so the same command resumes
        h = hashlib.sha1(json.dumps([spec.space, spec.overrides, spec.mode], sort_keys=True,
                                    default=str).encode()).hexdigest()[:6]
        stem = os.path.splitext(os.path.basename(spec.base or "defaults"))[0]
        spec.name = f"tune-{stem}-{h}"
    return spec


def resume_spec(args):
    from pipeline.config import ConfigError
    from tune.search import search_dir
    from tune.space import SearchSpec

    out = args.output_dir or "outputs"
    path = os.path.join(search_dir(out, args.resume), "search.json")
    if not os.path.exists(path):
        raise ConfigError(f"no search '{args.resume}' to resume at {os.path.dirname(path)} (missing search.json); "
                          f"pass --output-dir if the search wrote elsewhere")
    with open(path) as f:
        saved = json.load(f)
    spec = SearchSpec(**saved["spec"])
    if args.max_concurrent is not None:
        spec.max_concurrent = args.max_concurrent
    return spec


def cmd_tune(args) -> int:
    from tune.search import run_search

    if args.resume:
        outcome = run_search(resume_spec(args), resume=True)
    else:
        outcome = run_search(build_spec(args))
    return 130 if outcome.interrupted else 0
