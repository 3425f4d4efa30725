"""The `persona4rec` console script: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``register(subparsers)``;
modules are imported only to build the parser, and they keep heavy imports inside
their run functions so `persona4rec --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module that defines register(subparsers). Append a line to add a command.
_COMMAND_MODULES = [
    "persona4rec.demo",
    "persona4rec.export",
    "persona4rec.llm.cli",
    "persona4rec.train.cli",
    "persona4rec.evaluation.command",
    "persona4rec.data.command",
    "persona4rec.scale.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona4rec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
