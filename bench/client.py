"""``fleetlora bench client``: one local training step, ExecuTorch runtime vs eager torch.

For each adapter family and each XNNPACK setting, the training program is exported once, then both
backends train the same batch from the same adapter, step by step in turn, and the median step time of
each is reported. The last line is the headline ratio: the worst ``executorch / eager`` over the
XNNPACK configurations (what devices run), or over all when XNNPACK is off.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class _OneStep:
    local_steps: int = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlora bench client", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="registered model (default minilm)")
    p.add_argument("--families", default="lora,ravan", help="adapter families, comma-separated")
    p.add_argument("--xnnpack", choices=("on", "off", "both"), default="both", help="XNNPACK settings to run")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example (default 64)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank / Ravan budget rank")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per backend")
    p.add_argument("--steps", type=int, default=10, help="timed steps per backend (median reported)")
    p.add_argument("--threads", type=int, default=1, help="threads for eager torch and XNNPACK (default 1)")
    p.add_argument("--cache", default="", help="folder to keep exported programs in and reuse on reruns")
    p.add_argument(
        "--runtime", choices=("python",), default="python",
        help="python: the Python ExecuTorch runtime (this benchmark); "
        "`fleetlora bench client --runtime native --help` benchmarks the native client",
    )  # fmt: skip
    return p


def _batch(batch: int, seq: int, classes: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq // 2 :] = 0
    return {
        "input_ids": torch.randint(1, 30000, (batch, seq), generator=gen),
        "attention_mask": mask,
        "labels": torch.randint(0, classes, (batch,), generator=gen),
    }


def _median_step_ms(
    trainers: list[object], batch: dict[str, torch.Tensor], warmup: int, steps: int
) -> list[float]:
    """Median step time of each trainer; steps alternate between them so load drifts hit all alike."""
    times: list[list[float]] = [[] for _ in trainers]
    for i in range(warmup + steps):
        for trainer, out in zip(trainers, times, strict=True):
            start = time.perf_counter()
            trainer.train([batch], _OneStep())  # type: ignore[attr-defined]
            if i >= warmup:
                out.append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def _export_code_digest() -> str:
    """A digest of the code that shapes an exported program: a cached program from older code is stale."""
    import export

    root = Path(export.__file__).parent
    h = hashlib.sha256()
    for name in ("executorch_program.py", "passes.py", "build.py", "ravan.py", "adapters.py", "models.py"):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:12]


def _program(
    model: nn.Module,
    args: argparse.Namespace,
    family: str,
    xnnpack: bool,
    batch_range: tuple[int, int],
    classes: int,
) -> tuple[bytes, bytes, float]:
    """``(train.pte, adapter.ptd, export seconds)``, from ``--cache`` when it holds them."""
    from export.build import BuildReport, build_training_program

    kind = "xnnpack" if xnnpack else "portable"
    name = (
        f"{args.model}-{family}-r{args.rank}-{kind}-{args.seq_len}x{batch_range[1]}-{_export_code_digest()}"
    )
    folder = Path(args.cache) / name if args.cache else None
    if folder is not None and (folder / "train.pte").is_file() and (folder / "adapter.ptd").is_file():
        return (folder / "train.pte").read_bytes(), (folder / "adapter.ptd").read_bytes(), 0.0
    report = BuildReport()
    pte, ptd = build_training_program(
        model, args.seq_len, batch_range, classes, xnnpack=xnnpack, report=report
    )
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.pte").write_bytes(pte)
        (folder / "adapter.ptd").write_bytes(ptd)
    return pte, ptd, sum(report.stages.values())


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(args.threads)  # XNNPACK's threads, to match eager's

    from edge_client.executorch_trainer import ExecuTorchTrainer
    from edge_client.trainer import EagerTrainer, OptimizerConfig
    from export.adapters import attach
    from export.models import build_model
    from export.spec import AdapterSpec

    classes = 8
    batch = _batch(args.batch, args.seq_len, classes)
    batch_range = (2, max(2, args.batch))
    opt = OptimizerConfig(lr=1e-3, momentum=0.9)
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.xnnpack]
    print(
        f"{args.model}, batch {args.batch} x {args.seq_len} tokens, {args.threads} thread(s) each, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    ratios: dict[tuple[str, bool], float] = {}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:  # flag: "lora,ravan"
        spec = AdapterSpec(family=family, rank=args.rank)
        model, _ = build_model(args.model, classes)
        model = attach(model, spec)
        eager = EagerTrainer(model, opt)
        start_state = eager.get_trainable()
        for xnnpack in settings:
            pte, ptd, export_s = _program(model, args, family, xnnpack, batch_range, classes)
            et = ExecuTorchTrainer(pte, ptd, seq_len=args.seq_len, batch_range=batch_range, optimizer=opt)
            et.set_trainable(start_state)
            eager.set_trainable(start_state)
            et_ms, eager_ms = _median_step_ms([et, eager], batch, args.warmup, args.steps)
            ratios[(family, xnnpack)] = et_ms / eager_ms
            label = f"{family} {'xnnpack' if xnnpack else 'portable'}"
            print(
                f"  {label:<16s} executorch {et_ms:8.1f} ms  eager {eager_ms:8.1f} ms  "
                f"ratio {et_ms / eager_ms:5.2f}  (export {export_s:.0f} s, "
                f".pte {len(pte) / 1e6:.1f} MB, .ptd {len(ptd) / 1e3:.0f} KB)"
            )
    headline = [r for (_, x), r in ratios.items() if x] or list(ratios.values())
    print(f"client: executorch_over_eager={max(headline):.2f}")
    return 0
