"""`tst compare TST_RUN BASE_RUN [BASE_RUN ...]`: the paper's Table 1 and Figure 1 for two (or more) runs.

The arguments and the console only; the work is `pipeline.report.compare.compare_runs` (definitions of every
figure in `pipeline.report.curves`, readers in `pipeline.report.runs`), imported when the command runs. The
tracking URI is `pipeline.report.tracking.resolve_tracking_uri`'s, as for every command.
"""

from __future__ import annotations

import sys
import warnings


def _with_branches(baselines: list[str], output_dir: str) -> list[str]:
    """Each baseline that is a run folder (or a name under <output_dir>/runs), followed by its decay branches
    (`tst train-branches`: the folders beside it whose BRANCH.json names it)."""
    import os

    from pipeline.study.branches import branches_of

    out = []
    for ref in baselines:
        out.append(ref)
        folder = ref if os.path.isdir(ref) else os.path.join(output_dir, "runs", ref)
        if os.path.isfile(os.path.join(folder, "metrics.jsonl")):
            out += [b for b in branches_of(folder) if b not in out]
    return out


def _cmd(args) -> int:
    from pipeline.report.compare import compare_runs
    from pipeline.report.curves import format_table

    baselines = _with_branches(args.baselines, args.output_dir) if args.branches else args.baselines
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = compare_runs(
            args.tst,
            baselines,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            output_dir=args.output_dir,
            out=args.out,
            json_path=args.json,
            log_to_mlflow=not args.no_log,
            detect_tst=not args.no_detect,
        )
    for w in caught:
        if "could not log" not in str(w.message):  # already among the notes
            print(f"tst compare: warning: {w.message}", file=sys.stderr)
    print(format_table(res))
    if res.get("figure"):
        print(f"figure: {res['figure']}")
    if res.get("json"):
        print(f"json: {res['json']}")
    if res.get("logged_to"):
        print(f"logged to MLflow run {res['logged_to']} (artifacts under compare/)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare a TST run with baseline run(s): final loss, equal-step difference, iso-loss speedup",
        description=(
            "Compare a TST run with one baseline (its whole validation curve) or several baselines of different "
            "lengths T, 1.5T, 2T, ... each with its own complete LR schedule (their FINAL points are interpolated). "
            "Reports final losses, the equal-step loss difference (nats, positive = TST better), raw tokens, and "
            "the iso-loss speedup in steps / wall-clock / FLOPs ('≥' = lower bound: the baseline never got there). "
            "Runs are MLflow run ids or names, or run/checkpoint folders."
        ),
    )
    p.add_argument("tst", help="the TST run (MLflow run id or name, or a run/checkpoint folder)")
    p.add_argument("baselines", nargs="+", help="baseline run(s), same forms")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<output-dir>/mlflow.db)")
    p.add_argument("--experiment", default="tst", help="MLflow experiment to search run names in (default: tst)")
    p.add_argument("--output-dir", default="outputs", help="where runs/NAME/ folders and mlflow.db live")
    p.add_argument("--out", default="compare.png", help="PNG figure path (default: compare.png)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--no-log", action="store_true", help="do not log the PNG/JSON to the TST run in MLflow")
    p.add_argument("--branches", action="store_true",
                   help="add every WSD decay branch of each baseline run folder (`tst train-branches`): the "
                        "baselines' fully-decayed final points at several lengths")
    p.add_argument("--no-detect", action="store_true",
                   help="take the first argument as the TST run even if its params say otherwise")
    p.set_defaults(func=_cmd)
