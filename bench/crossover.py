#!/usr/bin/env python
"""Where TST starts to pay: the crossover map over model size and run length (issue 19), in one command.

    python bench/crossover.py --cpu-hours 5                      # run / resume the plan, two jobs at a time
    python bench/crossover.py --cpu-hours 1 --stop-at 10:45      # ... and stop (resumably) at 10:45 UTC
    timeout 3000 python bench/crossover.py --cpu-hours 1         # SIGTERM: stops the jobs the same way
    python bench/crossover.py --report-only                      # rewrite the tables, CSV and figure

The command line of `pipeline.study.crossover` (the plan of cells, priorities, budget and resuming are described
there; the report is `pipeline.study.crossover_report`). Data: the chunked corpus of the speedup study
(`tst data build-corpus --out outputs/speedup/corpus`, then `tst data chunk-corpus` / `python bench/speedup.py
--chunk-corpus outputs/speedup/corpus --chunk-mb 30`), read on lanes + shuffle. Runs under --out (default
outputs/crossover); tables, CSV and figure under --results (default docs/crossover).
"""

from __future__ import annotations

import argparse
import calendar
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.study.crossover import ALL_SIZES, DEFAULT_SIZES, run_study  # noqa: E402


def _stop_at(text: Optional[str]) -> Optional[float]:
    """HH:MM (UTC, today) -> epoch seconds."""
    if not text:
        return None
    hh, mm = (int(x) for x in text.split(":"))
    t = time.gmtime()
    return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, hh, mm, 0))


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.errors import TSTError

    ap = argparse.ArgumentParser(prog="bench/crossover.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-hours", type=float, default=5.0, help="CPU budget of this invocation (default 5)")
    ap.add_argument("--stop-at", default=None, help="HH:MM UTC: start no job expected to end later; stop running "
                                                    "jobs then (they resume next time)")
    ap.add_argument("--start-partial", action="store_true",
                    help="with --stop-at: also start jobs that will be cut then (they resume from their last "
                         "checkpoint next time)")
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                    help=f"presets in parameter order (default %(default)s; any of {', '.join(ALL_SIZES)})")
    ap.add_argument("--workers", type=int, default=2, help="jobs at a time, one torch thread each (default 2)")
    ap.add_argument("--corpus", default=str(REPO / "outputs/speedup/corpus_chunks"))
    ap.add_argument("--out", default=str(REPO / "outputs/crossover"))
    ap.add_argument("--results", default=str(REPO / "docs/crossover"))
    ap.add_argument("--report-only", action="store_true", help="train nothing: write the report from disk")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    cmd = "python bench/crossover.py " + " ".join(shlex.quote(a) for a in argv)
    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    if any(s not in ALL_SIZES for s in sizes):
        raise SystemExit(f"--sizes: choose from {', '.join(ALL_SIZES)}")
    try:
        if args.report_only:
            from pipeline.study.crossover_report import write_report

            write_report(str(Path(args.out).resolve()), args.corpus, sizes, args.results, command=cmd)
        else:
            run_study(args.out, args.corpus, sizes=sizes, cpu_hours=args.cpu_hours, workers=args.workers,
                      stop_at=_stop_at(args.stop_at), start_partial=args.start_partial, results=args.results,
                      command=cmd)
    except (ConfigError, TSTError) as e:
        raise SystemExit(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
