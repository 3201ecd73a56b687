#!/usr/bin/env python
"""The claim, measured: iso-loss speedup of TST over WSD baselines at equal FLOPs per step, in one command.

    tst data build-corpus --out outputs/speedup/corpus      # once: 100 MB of text (builtins + Debian doc packages)
    python bench/speedup.py --chunk-corpus outputs/speedup/corpus --chunk-mb 30   # once: shuffled <=2,000-char pieces
    python bench/speedup.py --setting cpu                   # ~30 min on 2 CPU cores (recipes/speedup_cpu.yaml)
    python bench/speedup.py --setting gpu                   # one H200, a few minutes (recipes/speedup_gpu.yaml)
    python bench/speedup.py --setting tiny                  # smoke test, ~1 minute on 2 cores

The command line of the speedup study, `pipeline.study.speedup` (what it runs, the settings, the data and the
outputs are described there): one TST run (s = 6, r = 0.3 by default) and baselines of lengths k*T, each fully
decayed, the shorter ones as WSD decay branches of the longest (`pipeline.study.branches`; --baseline-mode
separate trains each from scratch), compared at the TST run's final loss. Outputs under `<out>/` (default
outputs/speedup): `runs/<setting>-.../` (one folder per run) and `<setting>/speedup.json`, `speedup.md`,
`speedup.png`. `--chunk-corpus` is `tst data chunk-corpus` (`pipeline.data.corpus.chunk_corpus`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.study.speedup import DEFAULT_LENGTHS, SETTINGS, parse_lengths, run_speedup, setting_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/speedup.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cpu",
                    help="cpu (~30 min, 2 cores), gpu (one H200, a few minutes) or tiny (smoke test)")
    ap.add_argument("--bag-size", type=int, default=6, help="TST bag size s (default 6)")
    ap.add_argument("--switch-fraction", type=float, default=0.3, help="TST switch fraction r (default 0.3)")
    ap.add_argument("--steps", type=int, default=None, help="T, TST's steps (default: the setting's train.steps)")
    ap.add_argument("--baseline-lengths", default=",".join(f"{x:g}" for x in DEFAULT_LENGTHS),
                    help="baseline lengths as multiples of T (default %(default)s; 1 is always added)")
    ap.add_argument("--baseline-mode", choices=("branches", "separate"), default="branches",
                    help="branches: WSD decay branches of the longest baseline (default); separate: each from scratch")
    ap.add_argument("--out", default=None, help="output dir: runs/ and <setting>/ (default: outputs/speedup)")
    ap.add_argument("--allow-repeat", action="store_true", help="allow runs that read more than one epoch")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs of the same name and length")
    ap.add_argument("--compare-only", action="store_true",
                    help="train nothing: compare the finished runs of the plan (unfinished baselines left out)")
    ap.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    ap.add_argument("--chunk-corpus", metavar="SRC",
                    help="prepare the data instead of training: split the JSONL corpus folder SRC (from `tst data "
                         "build-corpus`) into shuffled pieces of at most --chunk-chars characters, written to the "
                         "setting's data.source (or --chunk-out)")
    ap.add_argument("--chunk-chars", type=int, default=2000)
    ap.add_argument("--chunk-mb", type=float, default=None, help="write at most this many MB of pieces")
    ap.add_argument("--chunk-out", default=None)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=2e-3")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.errors import TSTError

    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    cmd = "python bench/speedup.py " + " ".join(shlex.quote(a) for a in argv)
    try:
        if args.chunk_corpus:
            from pipeline.data.corpus import chunk_corpus

            dst = args.chunk_out or setting_config(args.setting, args.overrides).data.source
            print(json.dumps(chunk_corpus(args.chunk_corpus, dst, args.chunk_chars, args.chunk_mb), indent=1))
            return 0
        run_speedup(args.setting, bag_size=args.bag_size, switch_fraction=args.switch_fraction, steps=args.steps,
                    lengths=parse_lengths(args.baseline_lengths), mode=args.baseline_mode, out=args.out,
                    overrides=args.overrides, console=not args.quiet, allow_repeat=args.allow_repeat,
                    reuse=args.reuse, command=cmd, compare_only=args.compare_only)
    except (ConfigError, TSTError) as e:
        raise SystemExit(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
