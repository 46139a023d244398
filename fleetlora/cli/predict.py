"""``fleetlora predict``: label texts with an exported adapter folder (fleetlora export-adapter)."""

from __future__ import annotations

import argparse
import sys

from fleetlora.cli import CliError

NAME = "predict"
HELP = "label texts with an exported adapter: prints the label and its probability for each"
ORDER = 42
EXAMPLES = """\
fleetlora predict --adapter my-adapter "Oil prices rose sharply after OPEC cut output"
fleetlora predict --adapter my-adapter "first text" "second text"
fleetlora predict --adapter my-adapter --file texts.txt      # one text a line ('-' reads stdin)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    p.add_argument("--adapter", required=True, help="folder written by fleetlora export-adapter")
    p.add_argument("--file", default="", help="a file of texts, one a line ('-': standard input)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from export.adapter_folder import AdapterFolderError, load_adapter_folder, predict

    texts = list(args.texts)
    if args.file:
        source = sys.stdin if args.file == "-" else None
        if source is None and not Path(args.file).is_file():
            raise CliError(f"--file: not found: {args.file}")
        lines = source.read() if source is not None else Path(args.file).read_text(encoding="utf-8")
        texts += [line for line in lines.splitlines() if line.strip()]
    if not texts:
        raise CliError("give texts to label (arguments, or --file)")
    try:
        model, tokenizer, info = load_adapter_folder(args.adapter)
    except AdapterFolderError as e:
        raise CliError(str(e)) from e
    for text, (label, prob) in zip(texts, predict(model, tokenizer, info, texts), strict=True):
        print(f"{label}\t{prob:.3f}\t{text}")
    return 0
