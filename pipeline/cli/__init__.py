"""The `tst` command line: one entry point, one subcommand per job.

One module per command group (pipeline/cli/train.py, data.py, export.py, ...; `tst tune` in tune/cli.py), each
exposing `register(subparsers)`, which adds its parser and sets `func=` to a callable taking the parsed args and
returning an exit code. The command modules import their heavy dependencies (Ray, MLflow, torch) inside the
command, so `tst --help` and the Ray-free commands start fast. A command module that fails to import is an
error, not a missing subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand names, module that registers them)
COMMAND_MODULES = [
    "pipeline.cli.train",  # tst train, tst demo
    "pipeline.cli.data",  # tst data inspect, tst tokenizer train, tst data build-corpus
    "pipeline.cli.export",  # tst export, tst generate
    "pipeline.cli.compare",  # tst compare
    "tune.cli",  # tst tune
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tst",
        description="Token Superposition Training on Ray Train + FSDP2, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        importlib.import_module(mod_name).register(sub)  # an import error here is a broken install: let it show
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.ray_env import console_defaults

    console_defaults()  # before anything imports Ray Data or MLflow (pipeline/ray_env.py says which line and why)

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
