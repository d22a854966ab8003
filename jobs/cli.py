"""The `specllava` command. Each subcommand lives in its own module under jobs/ and registers
itself through `add_parser(subparsers)`; this file only wires them together.

Exit codes: 0 success, 2 user error (one clear line on stderr), 1 anything unexpected.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules providing subcommands: each defines add_parser(subparsers) and sets `func` on its parser.
COMMAND_MODULES: list[str] = ["jobs.make_dataset", "jobs.distill", "jobs.caption", "jobs.bench", "jobs.demo"]


class UserError(Exception):
    """An error the user can fix (bad argument, missing path): printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specllava", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"specllava: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
