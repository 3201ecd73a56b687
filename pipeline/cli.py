"""The `tst` command line: one entry point, one subcommand per job.

Each subcommand lives in the module that owns the work and exposes `register(subparsers)`, which adds its
parser and sets `func=` to a callable taking the parsed args and returning an exit code. Modules are imported
lazily, so `tst --help` and the Ray-free commands start without importing Ray or MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand names, module that registers them)
COMMAND_MODULES = [
    "pipeline.train_cli",  # tst train, tst demo
    "pipeline.data_cli",  # tst data inspect, tst tokenizer train, tst data build-corpus
    "pipeline.export_cli",  # tst export, tst generate
    "pipeline.compare",  # tst compare
    "tune.cli",  # tst tune
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tst",
        description="Token Superposition Training on Ray Train + FSDP2, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # not built yet in this checkout
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.quiet import console_defaults

    console_defaults()  # before anything imports Ray Data or MLflow (pipeline/quiet.py says which line and why)

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"tst: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tst: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors raised as TSTError carry their own one-line fix
        from pipeline.errors import TSTError

        if isinstance(e, TSTError):
            print(f"tst: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
