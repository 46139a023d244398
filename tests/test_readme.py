"""Every ``fleetlora`` command the README shows is one the CLI accepts, flags and all, as written.

The deployment walkthrough (between its markers) is run as written by tests/test_walkthrough.py; the
commands that run long jobs are run elsewhere in reduced form (tests/test_sim.py, test_tune.py,
test_bench_claims.py); here every other line is parsed by the real parser, so a renamed flag or
subcommand in the code or a typo in the README fails the suite.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fleetlora.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """``fleetlora ...`` lines of the README's bash blocks, comments and continuations resolved."""
    text = re.sub(r"<!-- walkthrough.*?<!-- /walkthrough -->", "", README.read_text(), flags=re.S)
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in re.split(r"&&|;", line.split("  #")[0]):
            words = shlex.split(part, comments=True)
            if words and words[0].endswith("fleetlora"):
                commands.append(shlex.join(words[1:]))
    return commands


def test_the_readme_shows_the_main_commands() -> None:
    names = {c.split()[0] for c in readme_commands()}
    assert {"sim", "tune", "bench", "devices", "broker"} <= names


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command: str) -> None:
    parser, subparsers = build_parser()
    args = parser.parse_args(shlex.split(command))
    assert args.command in subparsers
    if args.command == "bench":  # the benchmark's own flags: its parser must accept them too
        from fleetlora.cli.bench import BENCHMARKS

        assert args.name in BENCHMARKS


def test_the_readme_uses_no_deprecated_spelling_and_old_ones_still_parse_with_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fleetlora.cli import DeprecatedAlias, parse

    _, subparsers = build_parser()
    old = {
        name: {o for a in p._actions if isinstance(a, DeprecatedAlias) for o in a.option_strings}
        for name, p in subparsers.items()
    }
    for command in readme_commands():
        words = shlex.split(command)
        assert not old.get(words[0], set()) & {w.split("=")[0] for w in words}, command
    args = parse(["export", "--alpha", "8", "--targets", "query", "--out", "x"])
    assert (args.lora_alpha, args.target_modules) == (8.0, "query")
    err = capsys.readouterr().err
    assert "--alpha is deprecated, use --lora-alpha" in err and "--targets is deprecated" in err
    args = parse(["flash", "--device", "pixel_8", "--run", "r", "--target", "local:x"])
    assert args.profile == "pixel_8" and "--device is deprecated, use --profile" in capsys.readouterr().err
