"""The `specllava` command. Each subcommand lives in its own module under jobs/ and registers
itself through `add_parser(subparsers)`; this file only wires them together.

Every subcommand also takes `--config FILE.yaml`: a mapping whose keys are the subcommand's
option names (`max-new-tokens` or `max_new_tokens`), used as defaults, so flags on the command
line win. Positional arguments stay on the command line.

Exit codes: 0 success, 2 user error (one clear line on stderr), 1 anything unexpected.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from jobs.common import UserError

# Modules providing subcommands: each defines add_parser(subparsers) and sets `func` on its parser.
COMMAND_MODULES: list[str] = ["jobs.make_dataset", "jobs.distill", "jobs.caption", "jobs.submit",
                              "jobs.query", "jobs.bench", "jobs.demo"]


EPILOG = """\
typical session:
  specllava demo                                    # everything on this machine, a few minutes
  specllava caption --input DIR|s3://... --output DIR|s3://...   # caption shards (local Ray)
  specllava submit  --input ... --output ... --address http://HEAD:8265   # the same as a Ray job
  specllava logs ID --follow ; specllava stop ID ; specllava resume OUTPUT [--submit]
  specllava query OUTPUT "SELECT status, count(*) FROM captions GROUP BY status"
  specllava stats OUTPUT --plot accepted.png

every command takes --config FILE.yaml (keys = its option names; flags win) and --help.
exit codes: 0 ok, 2 user error (one line on stderr; --debug for a traceback), 1 run failed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specllava", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Spec-LLaVA: lossless dynamic-tree speculative decoding for LLaVA, and a resumable "
                    "Ray Data pipeline that captions Parquet shards of images.",
        epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    for subparser in sub.choices.values():
        subparser.add_argument("--config", metavar="FILE.yaml",
                               help="YAML mapping of this command's option names to values (flags win)")
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _find_config(argv: list[str]) -> tuple[str | None, str | None]:
    """(subcommand, --config value) from raw argv, without parsing (required flags may be in the file)."""
    command = None
    for i, token in enumerate(argv):
        if command is None:
            if not token.startswith("-"):
                command = token
            continue
        if token == "--config":
            return command, argv[i + 1] if i + 1 < len(argv) else None
        if token.startswith("--config="):
            return command, token.split("=", 1)[1]
        if token == "--":
            break
    return command, None


def _config_value(path: str, key: str, action: argparse.Action, value):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{path}: {key} takes true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise UserError(f"{path}: {key} takes a single value, got {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        converted = action.type(text) if action.type else text
    except (TypeError, ValueError):
        raise UserError(f"{path}: {key}: invalid value {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Load the --config file named in argv (if any) into its subparser's defaults."""
    command, path = _find_config(argv)
    if path is None:
        return
    sub = subcommands(parser).get(command)
    if sub is None:
        return  # argparse reports the unknown command
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise UserError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must be a mapping of option names to values")
    options = {opt[2:]: action for action in sub._actions for opt in action.option_strings
               if opt.startswith("--") and opt not in ("--help", "--config") and action.help != argparse.SUPPRESS}
    defaults = {}
    for key, value in data.items():
        name = str(key).replace("_", "-")
        action = options.get(name)
        if action is None:
            raise UserError(f"--config {path}: unknown key {key!r} for `specllava {command}` "
                            f"(known: {', '.join(sorted(options))})")
        defaults[action.dest] = _config_value(path, name, action, value)
        action.required = False  # given by the file; a flag still overrides it
    sub.set_defaults(**defaults)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv[: next((i for i, t in enumerate(argv) if not t.startswith("-")), len(argv))]
    try:
        apply_config(parser, argv)
    except UserError as exc:
        if debug:
            raise
        print(f"specllava: error: {exc}", file=sys.stderr)
        return 2
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
