#!/usr/bin/env python
"""Autoscaling, exercised (issue 21): cluster.yaml's node types on Ray's autoscaler (v2) over its fake multi-node
provider, a `ray job submit` of an elastic `tst train`, a spot preemption of a train node, scale-down after the job.

    python bench/autoscale.py --out /tmp/tst-autoscale               # ~6-10 min on 2 busy cores
    python bench/autoscale.py --out /tmp/a --steps 20 --no-preempt --no-reference   # the short plan

Prints a timeline in seconds from the submit (nodes requested / launched / terminated by type, workers in the run,
training steps), where the tokenizer actors, read tasks and train workers ran, and against an uninterrupted
one-process run of the same config: windows and tokens lost or repeated, and the final loss. Everything (the
exercise and the comparison) lives in pipeline/study/autoscale.py and pipeline/local_cluster.py; the result is
also written to <out>/result.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from pipeline.local_cluster import SCALE_RULE
    from pipeline.study.autoscale import Plan, run_exercise

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for outputs, digests, logs and result.json")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--preempt-after", type=int, default=25, help="steps at 2 workers before the preemption")
    ap.add_argument("--no-preempt", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--idle-timeout-min", type=float, default=0.25)
    ap.add_argument("--resize-interval-s", type=float, default=5.0)
    ap.add_argument("--boot-s", type=float, default=45.0,
                    help="seconds a launched node takes to appear, as a cloud VM boots (0: at once)")
    ap.add_argument("--start-timeout-s", type=float, default=20.0,
                    help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S of the job (Ray's default: 60)")
    ap.add_argument("--min-workers", type=int, default=1, help="0: exactly 2 workers (no elastic range)")
    ap.add_argument("--name", default="autoscale")
    ap.add_argument("--mlflow-db", default=None, help="log the run to an MLflow server over this SQLite file")
    ap.add_argument("--working-dir", default=None, help="what `ray job submit --working-dir` uploads (the repo)")
    ap.add_argument("--probes", action="store_true",
                    help="after the job: a client without the token, and a job printing where its code came from")
    args = ap.parse_args(argv)
    plan = Plan(out=os.path.abspath(args.out), steps=args.steps,
                preempt_after=None if args.no_preempt else args.preempt_after, reference=not args.no_reference,
                idle_timeout_minutes=args.idle_timeout_min, resize_interval_s=args.resize_interval_s,
                min_workers=args.min_workers or None, name=args.name,
                mlflow_db=args.mlflow_db and os.path.abspath(args.mlflow_db), probes=args.probes, boot_s=args.boot_s,
                extra_env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(args.start_timeout_s)},
                **({"working_dir": os.path.abspath(args.working_dir)} if args.working_dir else {}))
    print("[autoscale] node types from cluster.yaml:", SCALE_RULE.format(cpus=1, max_nodes=2), flush=True)
    r = run_exercise(plan)
    print(report(r))
    return 0 if r.get("job_rc") == 0 else 1


def report(r: dict) -> str:
    lines = ["", "timeline (s from submit):"]
    for ev in r["events"]:
        lines.append(f"  {ev['t']:7.1f}  {ev['what']:<13} " + "  ".join(f"{k}={v}" for k, v in ev.items()
                                                                      if k not in ("t", "what")))
    by_type: dict = {}
    for n in r["nodes"].values():
        b = by_type.setdefault(n["type"], [0, 0])
        b[0] += 1
        b[1] += n["terminated"] is not None
    lines.append("nodes (launched / terminated): " + ", ".join(f"{t} {a}/{b}" for t, (a, b) in sorted(by_type.items())))
    sizes = []
    for rec in r["records"]:
        if not sizes or sizes[-1] != rec["world_size"]:
            sizes.append(rec["world_size"])
    lines.append(f"workers over the run: {' -> '.join(map(str, sizes))}; steps logged {len(r['records'])} "
                 f"(distinct {len({x['step'] for x in r['records']})})")
    p = r.get("placement", {})
    lines.append("placement: " + "; ".join(f"{k}: {sorted(set(v))} x{len(v)}" for k, v in p.items() if v))
    lines.append(f"actors alive at the first training step: {r.get('alive_at_first_step')}")
    lines.append(f"actors alive mid-run: {r.get('alive_mid_run')}")
    lines.append(f"job rc {r.get('job_rc')}; cluster up {r.get('cluster_up_s')} s; worker nodes gone "
                 f"{r.get('scale_down_s')} s after the job (idle timeout "
                 f"{r['plan']['idle_timeout_minutes'] * 60:.0f} s)")
    ref = r.get("reference")
    if ref:
        lines.append(f"vs the uninterrupted run: windows lost {ref['windows_lost']}, repeated "
                     f"{ref['windows_repeated']} (tokens lost {ref['tokens_lost']}, repeated {ref['tokens_repeated']}; "
                     f"tokens trained {ref['tokens_trained']} vs {ref['tokens_trained_reference']}); final loss (step "
                     f"{ref['final_step']}) {ref['final_loss']} vs {ref['final_loss_reference']}; largest relative "
                     f"loss difference over {ref['steps_compared']} logged steps {ref['max_rel_loss_diff']:.2e} "
                     f"(first step over 1e-4: {ref['first_step_over_1e-4']})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
