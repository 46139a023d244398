"""``fleetlora export``: build a bundle (training program, adapter, inference program, manifest)."""

from __future__ import annotations

import argparse
from typing import Any

from fleetlora.cli import CliError, DeprecatedAlias, as_list, positive_int
from fleetlora.cli._deploy import label_names

NAME = "export"
HELP = "export a model + adapter as an ExecuTorch bundle (train.pte, adapter.ptd, infer.pte, manifest)"
EXAMPLES = """\
fleetlora export --model minilm --family lora --rank 8 --num-classes 8 --seq-len 64 --out bundles/minilm-lora
fleetlora export --model minilm --family ravan --heads 4 --num-classes 8 --xnnpack --out bundles/minilm-ravan
fleetlora export --model tiny-bert --rank 4 --num-classes 4 --seq-len 16 --batch-max 32 --out /tmp/tiny
fleetlora export --model minilm --labels ABBR,DESC,ENTY,HUM,LOC,NUM --out bundles/trec
fleetlora export --model minilm --labels data/labels.txt --seq-len 64 --out bundles/r8   # one name a line
fleetlora export --model minilm --num-classes 8 --base-delta --out bundles/minilm-flora  # FLoRA, FedEx
fleetlora export --model minilm --labels data/labels.txt --layers top --out bundles/top  # the top block"""
ORDER = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="registered model name (minilm, tiny-bert)")
    p.add_argument("--family", default="lora", choices=("lora", "ravan"), help="adapter family")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (Ravan: the budget's rank)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    p.add_argument(
        "--alpha", dest="lora_alpha", type=float, action=DeprecatedAlias,
        use="--lora-alpha", why="as in fleetlora sim, where --alpha is the Dirichlet alpha",
    )  # fmt: skip
    p.add_argument("--heads", type=positive_int, default=4, help="Ravan heads")
    p.add_argument("--target-modules", default="query,value", help="target modules, comma-separated")
    p.add_argument(
        "--targets",
        dest="target_modules",
        action=DeprecatedAlias,
        use="--target-modules",
        why="as in fleetlora sim",
    )
    p.add_argument(
        "--layers", default="",
        help="only adapt these transformer blocks: indices (5 or 4,5), or 'top' for the last one "
        "(as the simulator does); default: all",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="adapter seed (Ravan bases, LoRA A)")
    p.add_argument(
        "--num-classes", type=positive_int, help="classes of the head (default: how many --labels)"
    )
    p.add_argument(
        "--labels", default="",
        help="class names: comma-separated, or a file with one a line; devices training on their own "
        "files (fleetlora client --data) need them",
    )  # fmt: skip
    p.add_argument("--seq-len", type=positive_int, default=64, help="static sequence length")
    p.add_argument(
        "--batch-min", type=positive_int, default=2, help="smallest batch the program accepts (>= 2)"
    )
    p.add_argument("--batch-max", type=positive_int, default=64, help="largest batch the program accepts")
    p.add_argument("--xnnpack", action="store_true", help="delegate to XNNPACK (fast on CPUs)")
    p.add_argument(
        "--base-delta",
        action="store_true",
        help="LoRA: the program takes the coordinator's change of the base as inputs (FLoRA, FedEx-LoRA)",
    )
    p.add_argument("--out", required=True, help="bundle folder to write")


def adapted_layers(model: str, text: str) -> tuple[int, ...]:
    """``--layers``: block indices, or ``top`` (the model's last block, looked up in the model)."""
    if text.strip() != "top":
        return tuple(int(x) for x in as_list(text))
    from export.models import build_model

    base: Any
    base, _ = build_model(model, 2)
    return (int(base.num_layers) - 1,)


def run(args: argparse.Namespace) -> int:
    labels = label_names(args.labels) if args.labels else ()
    if not labels and not args.num_classes:
        raise CliError("give --labels (the class names) or --num-classes")
    args.num_classes = args.num_classes or len(labels)
    if labels and len(labels) != args.num_classes:
        raise CliError(f"--labels names {len(labels)} classes but --num-classes is {args.num_classes}")
    if not 2 <= args.batch_min <= args.batch_max:
        raise CliError(f"need 2 <= --batch-min <= --batch-max, got {args.batch_min}, {args.batch_max}")
    if args.base_delta and args.family != "lora":
        raise CliError("--base-delta needs --family lora (FLoRA and FedEx-LoRA change a LoRA model's base)")

    from export.build import build_bundle
    from export.models import MODELS
    from export.spec import AdapterSpec

    if args.model not in MODELS:
        raise CliError(f"unknown --model {args.model!r}; choose from {', '.join(MODELS)}")
    try:
        spec = AdapterSpec(
            family=args.family,
            target_modules=tuple(as_list(args.target_modules)),
            layers=adapted_layers(args.model, args.layers),
            rank=args.rank,
            alpha=args.lora_alpha,
            heads=args.heads,
            seed=args.seed,
        )
    except ValueError as e:  # a SpecError, or --layers that are not integers
        raise CliError(str(e)) from e
    print(f"exporting {args.model} + {args.family} -> {args.out}")
    bundle, report = build_bundle(
        args.model,
        spec,
        num_classes=args.num_classes,
        seq_len=args.seq_len,
        out=args.out,
        batch_range=(args.batch_min, args.batch_max),
        labels=labels,
        xnnpack=args.xnnpack,
        base_delta=args.base_delta,
        log=print,
    )
    print(
        f"{'total':<22s} {sum(report.stages.values()):8.2f} s   ({report.addmm_rewritten} addmm "
        f"rewritten, {report.erf_decomposed} erf decomposed)"
    )
    for name, size in report.sizes.items():
        print(f"  {name:<18s} {size:>12,d} bytes")
    print(f"trainable tensors: {len(bundle.info.trainable)}")
    return 0
