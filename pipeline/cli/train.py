"""`tst train`, `tst demo` and `tst train-branches`."""

from __future__ import annotations

import argparse
import os

from pipeline.config import Config, ConfigError, load_config
from pipeline.cli.help import DEFAULT_RECIPE, default_recipe, describe_keys

TRAIN_EPILOG = """\
Overrides are dotted config keys, e.g.:
  tst train train.switch_fraction=0.3 data.bag_size=6 scaling.num_workers=2
  tst train --config recipes/270m.yaml run.tracking_uri=http://127.0.0.1:5000

""" + describe_keys(default_recipe())


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train one run (TST or baseline) on a local Ray, a cluster ($RAY_ADDRESS), or in-process",
        description="Train one run. Runs on a local Ray by default, on the cluster in $RAY_ADDRESS when set "
                    "(so it works under `ray job submit -- tst train ...`), or in this process with --no-ray.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"recipe YAML (default: {os.path.relpath(DEFAULT_RECIPE)})")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="resume a finished or killed run by name (or run folder) from its latest checkpoint")
    p.add_argument("--name", default=None, help="run name (default: preset-kind-timestamp)")
    p.add_argument("--workers", type=int, default=None, help="shortcut for scaling.num_workers")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                                        "sqlite:///<output_dir>/mlflow.db)")
    p.add_argument("--output-dir", default=None, help="shortcut for run.output_dir")
    p.add_argument("--no-ray", action="store_true", help="run the Ray-free loop in this process (debugging)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_train)

    d = sub.add_parser(
        "demo", help="the default run: a baseline and a TST run of the tiny model at equal FLOPs, side by side",
        description="Train the tiny model twice on the bundled corpus at equal FLOPs per step: a baseline and a "
                    "TST run (s and r from the recipe's demo values), then print both final validation losses.")
    d.add_argument("--config", default=None, help="recipe YAML (default: recipes/tiny.yaml)")
    d.add_argument("--bag-size", type=int, default=4, help="s of the TST run (default 4)")
    d.add_argument("--switch-fraction", type=float, default=0.3, help="r of the TST run (default 0.3)")
    d.add_argument("--no-ray", action="store_true", help="run both in this process")
    d.add_argument("--tracking-uri", default=None)
    d.add_argument("--output-dir", default=None)
    d.add_argument("overrides", nargs="*", metavar="key=value")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser(
        "train-branches", help="WSD decay branches of a finished baseline run: fully-decayed baselines of shorter "
                               "lengths for the price of their decay",
        description="Train decay branches of a baseline run (s=1 or r=0) in this process: each branch of T_k steps "
                    "resumes from the run's newest checkpoint at or before its own decay start "
                    "(T_k - round(decay_fraction T_k)) and trains its decay, which is the run a separate T_k-step "
                    "baseline would have made (pipeline.study.branches). They are written beside the run as "
                    "RUN-branch-T<k>; compare TST with all of them: `tst compare TST_RUN RUN --branches`. Train the "
                    "long run with train.checkpoint_every at or below the shortest branch's decay start and enough "
                    "train.keep_checkpoints; a branch with no checkpoint before it is trained from scratch.")
    b.add_argument("run", help="the long baseline: a run name under --output-dir/runs, or a run folder")
    b.add_argument("--steps", required=True,
                   help="branch lengths, comma-separated: steps (300,450) or fractions of the run's T (0.5,0.75)")
    b.add_argument("--output-dir", default=None, help="where runs/RUN lives (default: outputs)")
    b.add_argument("--no-reuse", action="store_true", help="retrain branches that already finished")
    b.set_defaults(func=cmd_train_branches)


def _load(args) -> Config:
    overrides = list(args.overrides or [])
    if getattr(args, "workers", None) is not None:
        overrides.append(f"scaling.num_workers={args.workers}")
    if args.tracking_uri:
        overrides.append(f"run.tracking_uri={args.tracking_uri}")
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    return load_config(args.config or default_recipe(), overrides)


def cmd_train(args) -> int:
    from pipeline.runner import run_training

    name = args.name
    if args.resume:
        cfg, name = _resume_config(args)
    else:
        cfg = _load(args)
    use_ray = not args.no_ray and cfg.scaling.num_workers > 0
    run_training(cfg, use_ray=use_ray, name=name)
    return 0


def _resume_config(args) -> tuple[Config, str]:
    """The saved config of run RUN (name or folder), with any overrides on top."""
    out = args.output_dir or "outputs"
    folder = args.resume if os.path.isdir(args.resume) else os.path.join(out, "runs", args.resume)
    path = os.path.join(folder, "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"no run to resume at '{folder}' (missing config.yaml); pass a run name under "
                          f"{out}/runs or a run folder")
    overrides = list(args.overrides or [])
    if args.workers is not None:
        overrides.append(f"scaling.num_workers={args.workers}")
    if args.tracking_uri:
        overrides.append(f"run.tracking_uri={args.tracking_uri}")
    cfg = load_config(path, overrides + ["run.resume=true"])
    return cfg, os.path.basename(os.path.normpath(folder))


def _corpus_tokens(summary: dict) -> int:
    """Training tokens of one pass over the corpus, from the run's token store (to say how many passes it made)."""
    return int((summary.get("data") or {}).get("train_tokens") or 0)


def cmd_demo(args) -> int:
    from pipeline.runner import run_training

    base = _load(args)
    runs = {}
    for label, s, r in (("baseline", 1, 0.0), ("tst", args.bag_size, args.switch_fraction)):
        cfg = base.copy()
        cfg.data.bag_size = s
        cfg.train.switch_fraction = r
        print(f"\n=== demo: {label} (s={s}, r={r}) ===", flush=True)
        runs[label] = run_training(cfg, use_ray=not args.no_ray and cfg.scaling.num_workers > 0)
    corpus_tokens = _corpus_tokens(runs["baseline"]) or 1
    print("\n=== demo result (equal FLOPs per step: same model, steps and latent positions per step) ===")
    print(f"corpus: {base.data.source}, {corpus_tokens:,} training tokens")
    print(f"{'run':<10} {'s':>3} {'r':>5} {'final val loss':>15} {'raw tokens':>12} {'passes':>7} {'train':>7} "
          f"{'wall':>7}")
    for label, s, r in (("baseline", 1, 0.0), ("tst", args.bag_size, args.switch_fraction)):
        m = runs[label]
        print(f"{label:<10} {s:>3} {r:>5} {m['final_val_loss']:>15.4f} {m['raw_tokens']:>12,} "
              f"{m['raw_tokens'] / corpus_tokens:>7.2f} {m.get('elapsed_s') or 0:>6.0f}s {m['wall_s']:>6.0f}s")
    print("train: the training loop's clock, first step to last with evaluations and checkpoints (what `tst compare` "
          "calls wall-clock); wall: launching the workers to the summary (adds Ray Train's start-up, building the "
          "model and closing the MLflow run).")
    diff = runs["baseline"]["final_val_loss"] - runs["tst"]["final_val_loss"]
    verdict = "TST lower" if diff > 0 else "baseline lower"
    print(f"equal-step difference (baseline - TST): {diff:+.4f} nats ({verdict}). At this tiny scale the paper "
          f"promises nothing; see README 'Results' for what we measured.")
    from pipeline.report.tracking import mlflow_command

    print(f"Browse both runs: {mlflow_command()} ui --backend-store-uri {runs['tst'].get('tracking_uri', '')}")
    return 0


def cmd_train_branches(args) -> int:
    from pipeline.study.branches import read_run_config, train_branches

    out = args.output_dir or "outputs"
    folder = args.run if os.path.isdir(args.run) else os.path.join(out, "runs", args.run)
    if not os.path.isdir(folder):
        raise ConfigError(f"no run folder '{folder}'; pass a run name under {out}/runs or a run folder")
    vals = [float(x) for x in args.steps.split(",") if x.strip()]
    if all(v < 1 for v in vals):  # fractions of the run's length
        total = read_run_config(folder).train.steps
        vals = [round(v * total) for v in vals]
    done = train_branches(folder, [int(v) for v in vals], reuse=not args.no_reuse)
    print(f"{'branch steps':>12} {'final val loss':>15}  run folder")
    for steps, summary in sorted(done.items()):
        print(f"{steps:>12} {summary.get('final_val_loss'):>15.4f}  {summary.get('run_dir')}")
    return 0
