"""The ``fleetlora`` console script: one module per subcommand in this package, found at start-up.

A subcommand module defines ``NAME``, ``HELP`` (one line), ``EXAMPLES`` (shown in ``--help``),
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports (torch, executorch, ray) belong
inside ``run`` so that ``fleetlora --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

PROG = "fleetlora"


class CliError(Exception):
    """A user error: printed as one clear line, exit status 2."""


def _subcommands() -> list[ModuleType]:
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 50), m.NAME))


def _apply_config(parser: argparse.ArgumentParser, path: str) -> set[str]:
    """Use a TOML run config's keys as defaults; keys match the long flags (dashes or underscores).

    Returns the destinations the config set.
    """
    file = Path(path)
    if not file.is_file():
        raise CliError(f"config file not found: {path}")
    try:
        cfg = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CliError(f"config file {path} is not valid TOML: {e}") from e
    keys = {k.replace("-", "_"): v for k, v in cfg.items()}
    # A subcommand with nested actions (``devices budget``) takes the keys of all its actions' flags.
    parsers = _parser_tree(parser)
    dests = {a.dest for p in parsers for a in p._actions}
    unknown = sorted(k for k in cfg if k.replace("-", "_") not in dests)
    if unknown:
        raise CliError(f"config file {path}: unknown keys {unknown}; valid keys: {sorted(dests - {'help'})}")
    for p in parsers:
        own = {a.dest for a in p._actions}
        p.set_defaults(**{k: v for k, v in keys.items() if k in own})
    return set(keys)


def _parser_tree(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and, recursively, the parsers of its sub-actions."""
    found = [parser]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for child in a.choices.values():
                found += _parser_tree(child)
    return found


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    mods = _subcommands()
    epilog = "examples:\n" + "\n".join(f"  {m.EXAMPLES.splitlines()[0]}" for m in mods)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Federated fine-tuning of a frozen foundation model across a fleet of edge devices.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for m in mods:
        p = sub.add_parser(
            m.NAME,
            help=m.HELP,
            description=m.HELP,
            epilog="examples:\n" + "\n".join(f"  {line}" for line in m.EXAMPLES.splitlines()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", metavar="TOML", help="run config whose keys match the flags")
        m.add_arguments(p)
        p.set_defaults(_module=m)
        subparsers[m.NAME] = p
    return parser, subparsers


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser, subparsers = build_parser()
    # A required flag may come from the TOML config: find the command and --config without them.
    required = [a for p in _parser_tree(parser) for a in p._actions if a.required and a.option_strings]
    for a in required:
        a.required = False
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(0)
    configured = _apply_config(subparsers[args.command], args.config) if args.config else set()
    for a in required:
        a.required = a.dest not in configured
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return int(args._module.run(args) or 0)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def as_list(value: Any) -> list[str]:
    """Flags that take several values may come from TOML as a list or from the shell as 'a,b'."""
    out = [str(v) for v in value] if isinstance(value, list | tuple) else str(value).split(",")
    return [v.strip() for v in out if v.strip()]


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag, kept for one release: stores into the new flag's dest and says so once.

    ``add_argument("--old", dest="new", action=DeprecatedAlias, use="--new", why="...")``; hidden from
    ``--help``, and it never sets a default of its own.
    """

    def __init__(self, option_strings: list[str], dest: str, *, use: str, why: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.use, self.why, self.warned = use, why, False

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if not self.warned:  # the command line is parsed twice (see parse): one warning
            print(
                f"{PROG}: warning: {option_string} is deprecated, use {self.use} ({self.why})",
                file=sys.stderr,
            )
            self.warned = True
        setattr(namespace, self.dest, values)
