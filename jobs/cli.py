"""The `specllava` command. Each subcommand lives in its own module under jobs/ and registers
itself through `add_parser(subparsers)`; this file only wires them together.

Every subcommand also takes `--config FILE.yaml`: a mapping whose keys are the subcommand's
option names (`max-new-tokens` or `max_new_tokens`), used as defaults, so flags on the command
line win. Positional arguments stay on the command line.

Option errors are one line naming the flag (`--batch-size must be >= 1, got 0`); options are never
abbreviated (`--max-new-token 32` is refused, with "did you mean --max-new-tokens?").

Exit codes: 0 success, 2 user error (one clear line on stderr), 1 anything unexpected.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys

from jobs.common import UserError

# Modules providing subcommands: each defines add_parser(subparsers) and sets `func` on its parser.
COMMAND_MODULES: list[str] = ["jobs.make_dataset", "jobs.distill", "jobs.caption", "jobs.submit",
                              "jobs.query", "jobs.bench", "jobs.demo", "jobs.make_pair"]

PROG = "specllava"


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (`allow_abbrev=False`, subcommands included: they are made
    with this class) and with one-line errors that name the option: no usage block, a type
    error reads `--batch-size must be >= 1, got 0`, an unknown option gets a "did you mean".
    Every error starts `specllava: error:`, like the commands' own (UserError) lines."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {flag_message(message)}\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = subcommands(self).get(getattr(namespace, "command", None) or "")
            options = [*option_strings(command), *option_strings(self)]
            self.exit(2, f"{PROG}: error: {unknown_message(extras, options)}\n")
        return namespace

    def _check_value(self, action, value):  # argparse's hook for `choices`: add a "did you mean"
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            if isinstance(action, argparse._SubParsersAction):
                raise argparse.ArgumentError(None, f"unknown command {value!r}{hint} "
                                                   f"(commands: {', '.join(choices)}; specllava --help)")
            raise argparse.ArgumentError(action, f"invalid choice {value!r} (choose from {', '.join(choices)}){hint}")


def option_strings(parser: argparse.ArgumentParser | None) -> list[str]:
    return [] if parser is None else [o for a in parser._actions for o in a.option_strings
                                      if a.help != argparse.SUPPRESS or o in ("-h", "--help")]


def unknown_message(extras: list[str], options: list[str]) -> str:
    """`unknown option --max-new-token; did you mean --max-new-tokens?` for argparse's leftovers."""
    flags = [t.split("=", 1)[0] for t in extras if t.startswith("-") and t != "-"]
    if not flags:  # a stray positional value
        return f"unexpected argument{'s' if len(extras) > 1 else ''} {' '.join(map(repr, extras))}"
    near = []
    for flag in flags:
        pool = [o for o in options if o.startswith("--")] if flag.startswith("--") else options
        close = difflib.get_close_matches(flag, pool, n=1, cutoff=0.6)
        near.append(close[0] if close else None)
    if len(flags) == 1:
        return f"unknown option {flags[0]}" + (f"; did you mean {near[0]}?" if near[0] else "")
    return "unknown options " + ", ".join(f"{f} (did you mean {n}?)" if n else f for f, n in zip(flags, near))


_ARGUMENT = re.compile(r"argument (\S+): (.*)", re.S)
_BAD_TYPE = re.compile(r"invalid (int|float) value: (.*)", re.S)


def flag_message(message: str) -> str:
    """argparse's `argument --batch-size: must be >= 1, got 0` as `--batch-size must be >= 1, got 0`
    (one line; the long spelling of the option)."""
    message = " ".join(message.split())
    match = _ARGUMENT.fullmatch(message)
    if not match:
        return message
    names, rest = match.groups()
    flag = next((n for n in names.split("/") if n.startswith("--")), names.split("/")[0])
    bad = _BAD_TYPE.fullmatch(rest)
    if bad:
        rest = f"must be {'an integer' if bad.group(1) == 'int' else 'a number'}, got {bad.group(2)}"
    return f"{flag} {rest}" if rest.startswith("must ") else f"{flag}: {rest}"



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
    parser = Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    except argparse.ArgumentTypeError as exc:  # jobs.common.number: the rule, e.g. "must be >= 1, got 0"
        raise UserError(f"{path}: {key} {exc}") from None
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # an option error (one line already on stderr): exit 2; --help still exits 0
        if exc.code in (0, None):
            raise
        return 2
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


def program() -> int:
    """The `specllava` program (console script and `python -m jobs.cli`): main() owning its console."""
    from jobs import common

    common.OWN_CONSOLE = True
    return main()


if __name__ == "__main__":
    sys.exit(program())
