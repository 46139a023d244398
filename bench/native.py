"""``fleetlora bench client --runtime native``: the native client's training step and memory.

One bundle (the model with LoRA, exported with XNNPACK), one batch, one thread each: the native client
(``fleetlora-client bench``) trains the program; eager torch trains the same model in this process; a
Python process trains the same program with the Python client's trainer (torch and executorch loaded,
as on a device running ``fleetlora client``). The last line is the headline::

    client: native_over_eager=<native step / eager step> native_rss_mb=<peak> python_rss_mb=<peak>
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import sys, time, statistics, torch, safetensors.torch
from dataclasses import dataclass
torch.set_num_threads(1)
from executorch.extension.pybindings import portable_lib
portable_lib._unsafe_reset_threadpool(1)
from edge_client.executorch_trainer import ExecuTorchTrainer
from edge_client.trainer import OptimizerConfig
@dataclass(frozen=True)
class One:
    local_steps: int = 1
t0 = time.perf_counter()
trainer = ExecuTorchTrainer.from_bundle(sys.argv[1], OptimizerConfig(lr=1e-3, momentum=0.9))
load_s = time.perf_counter() - t0
data = safetensors.torch.load_file(sys.argv[2])
batch = {k: v[0] for k, v in data.items()}  # the steps' batches are all this one
times = []
for i in range(int(sys.argv[3]) + int(sys.argv[4])):
    s = time.perf_counter()
    trainer.train([batch], One())
    if i >= int(sys.argv[3]):
        times.append((time.perf_counter() - s) * 1000)
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"python: step_ms={statistics.median(times)} load_s={load_s} rss_mb={rss / 1024}")
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleetlora bench client --runtime native", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="minilm", help="registered model (default minilm)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example (default 64)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per trainer")
    p.add_argument("--steps", type=int, default=10, help="timed steps per trainer and pass")
    p.add_argument(
        "--passes", type=int, default=3,
        help="passes of eager / native / python in turn (medians over them: load drifts hit all alike)",
    )  # fmt: skip
    return p


def _fields(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.eE+-]+)", line)}


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> dict[str, float]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    line = next((x for x in done.stdout.splitlines() if x.startswith(f"{what}:")), None)
    if line is None:
        raise SystemExit(f"{what} printed no result:\n{done.stdout[-2000:]}")
    return _fields(line)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import safetensors.torch
    import torch

    from bench.client import _batch, _median_step_ms
    from devices import native
    from edge_client.trainer import EagerTrainer, OptimizerConfig
    from export.adapters import attach
    from export.build import cached_bundle
    from export.models import build_model
    from export.spec import AdapterSpec

    torch.set_num_threads(1)
    classes = 8
    spec = AdapterSpec(rank=args.rank)
    print(f"{args.model} + LoRA r{args.rank}, XNNPACK, batch {args.batch} x {args.seq_len}, one thread each")
    exe = native.build(native.host_arch(), log=print) / native.BINARY
    bundle = cached_bundle(
        args.model, spec, num_classes=classes, seq_len=args.seq_len, batch_range=(2, args.batch),
        xnnpack=True, log=print,
    )  # fmt: skip
    batch = _batch(args.batch, args.seq_len, classes)
    model, _ = build_model(args.model, classes)
    eager = EagerTrainer(attach(model, spec), OptimizerConfig(lr=1e-3, momentum=0.9))
    with tempfile.TemporaryDirectory(prefix="fleetlora-bench-") as tmp:
        batches = Path(tmp) / "batches.safetensors"
        # The same batch once per timed step (the native bench times one step per batch in the file).
        repeated = {k: v.unsqueeze(0).repeat(args.steps, *([1] * v.dim())) for k, v in batch.items()}
        safetensors.torch.save_file(repeated, batches)
        eager_ms, nats, pys = [], [], []
        for _ in range(args.passes):
            eager_ms += _median_step_ms([eager], batch, args.warmup, args.steps)
            nats.append(_run(
                [str(exe), "bench", "--bundle", str(bundle.path), "--batches", str(batches), "--warmup",
                 str(args.warmup), "--threads", "1"],
                "native",
            ))  # fmt: skip
            probe = [sys.executable, "-c", PROBE, str(bundle.path), str(batches)]
            pys.append(_run(
                [*probe, str(args.warmup), str(args.steps)],
                "python",
                cwd=native.ROOT,  # this checkout's edge_client
            ))  # fmt: skip
    eager_step = statistics.median(eager_ms)
    nat, py = ({k: statistics.median(r[k] for r in runs) for k in runs[0]} for runs in (nats, pys))
    for name, r in (("native client (C++)", nat), ("python client (ExecuTorchTrainer)", py)):
        print(
            f"  {name:<34s} {r['step_ms']:8.1f} ms/step ({r['step_ms'] / eager_step:.2f} x eager)  "
            f"peak RSS {r['rss_mb']:6.0f} MB  program loaded in {r['load_s']:.2f} s"
        )
    print(f"  {'eager torch':<34s} {eager_step:8.1f} ms/step")
    print(
        f"client: native_over_eager={nat['step_ms'] / eager_step:.2f} native_rss_mb={nat['rss_mb']:.0f} "
        f"python_rss_mb={py['rss_mb']:.0f}"
    )
    return 0
