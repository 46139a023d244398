"""``fleetlora bench sim --train``: the README's fedit experiment, fleetlora against a plain Flower app.

Both run the same experiment side by side in one run: fleetlora as ``fleetlora sim --method fedit``
runs it by default (its client workers, the frozen-prefix cache, ``--batched auto``), then a Flower
1.42 app (bench/flower_fedit_app.py, in the ``.venv-flower`` that ``bench sim --flower`` builds)
replays it: the same clients each round (the ones fleetlora trained: the same sampling, dropouts and
deadline), the same mini-batches, the same starting adapter and optimizer, the same FedAvgM server,
the model run whole by each client (transformers + peft) on Ray actors of one CPU each. The rounds'
wall time is compared (start-up excluded on both sides; printed apart), and so is the test accuracy
of the round validation chose. ``gflops`` is the useful work (bench/flops.py) of the fleetlora run
per second of its rounds; ``gemm_peak_gflops`` this machine's float32 matrix-product rate with the
same threads. ``--all-blocks`` puts the adapters on every block (no prefix cache). ``--load N`` runs
both sides under N busy-loop processes (a machine shared with other jobs, reproducibly), stopped by
PID when the bench ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from bench.flops import BertShape, example_flops, gemm_peak_gflops
from sim.config import SimConfig
from sim.engine import World, build_world, run_method, world_workers
from sim.features import client_batch_indices
from sim.transports import ClientJob

APP = Path(__file__).resolve().parent / "flower_fedit_app.py"
ROOT = Path(__file__).resolve().parent.parent


def experiment_config(all_blocks: bool, rounds: int = 0, **overrides: Any) -> SimConfig:
    """The README's default experiment with fedit only (``rounds`` > 0 caps its rounds)."""
    config = replace(SimConfig(), methods=("fedit",), centralized=False, **overrides)
    if all_blocks:
        config = replace(config, layers=())
    return replace(config, rounds=rounds) if rounds else config


def job_record(job: ClientJob, cids: dict[str, int]) -> dict[str, Any]:
    """One training client of a round: its index and its mini-batches (rows of the pool)."""
    rng = np.random.default_rng(job.data_seed)
    batches = client_batch_indices(job.client.indices, job.batch_size, job.plan.local_steps, rng)
    return {"cid": cids[job.client.cid], "batches": [b.tolist() for b in batches]}


def run_fleetlora(config: SimConfig) -> tuple[World, dict[str, Any], list[list[dict[str, Any]]]]:
    """fleetlora's run: (world, summary, the schedule its rounds trained)."""
    from sim.threads import apply_threads

    print(apply_threads(config.threads), flush=True)
    t0 = time.perf_counter()
    world = build_world(config)
    world.pool("lora")  # built before the rounds start, like the Flower actors' first message
    workers, why = world_workers(config, world.device)
    print(f"client workers: {workers} ({why}{', one torch thread each' if workers > 1 else ''})", flush=True)
    setup_s = time.perf_counter() - t0
    cids = {c.cid: i for i, c in enumerate(world.clients)}
    schedule: list[list[dict[str, Any]]] = []
    run = run_method(
        world, "fedit", on_jobs=lambda rnd, jobs: schedule.append([job_record(j, cids) for j in jobs])
    )
    summary = {
        "rounds_s": run.rounds[-1]["wall_time_s"],
        "setup_s": setup_s,
        "val_accuracy": [r["val_accuracy"] for r in run.rounds],
        "test_accuracy": run.test["test_accuracy"],
        "threads": world.workers if world.workers > 1 else torch.get_num_threads(),  # cores it computes on
    }
    return world, summary, schedule


def write_experiment(world: World, schedule: list[list[dict[str, Any]]], folder: Path) -> None:
    """The folder the Flower app reads: token ids of the same splits, the start, the schedule."""
    from export.data import load_text_dataset, stratified_split, tokenize_cached
    from export.models import build_model

    c = world.config
    dataset = load_text_dataset(c.dataset)
    _, tokenizer = build_model(c.model, len(dataset.classes), seed=c.seed)
    train, test = tokenize_cached(dataset, tokenizer, c.max_len)
    if c.eval_examples:  # as build_world: a fixed random subset of the test split
        order = np.random.default_rng(12345).permutation(len(test))
        test = test.subset(np.sort(order[: c.eval_examples]))
    pool_idx, val_idx = stratified_split(train.labels.numpy(), c.val_fraction, c.seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, ids, mask, labels in (
        ("pool", train.input_ids[pool_idx], train.attention_mask[pool_idx], train.labels[pool_idx]),
        ("val", train.input_ids[val_idx], train.attention_mask[val_idx], train.labels[val_idx]),
        ("test", test.input_ids, test.attention_mask, test.labels),
    ):
        tensors.update({f"{name}_ids": ids, f"{name}_mask": mask, f"{name}_labels": labels})
    if not torch.equal(tensors["pool_labels"], world.train.labels.cpu()):
        raise RuntimeError("the Flower app's pool is not fleetlora's (the split differs)")
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "data.safetensors")
    spec = c.spec("lora")
    save_file(
        {k: v.cpu().contiguous() for k, v in world.initial_state("lora", spec).items()},
        folder / "start.safetensors",
    )
    experiment = {
        "model": c.model, "num_classes": len(world.classes), "seed": c.seed, "spec": spec.to_json(),
        "lr": c.lr, "momentum": c.momentum, "server_lr": c.server_lr, "server_momentum": c.server_momentum,
    }  # fmt: skip
    (folder / "experiment.json").write_text(json.dumps(experiment))
    (folder / "schedule.json").write_text(json.dumps(schedule))


def flower_python() -> Path:
    """``.venv-flower``'s interpreter, with fleetlora's torch, transformers and peft importable.

    Flower's own pins (its Ray, numpy, protobuf) come first on its path; fleetlora's venv is appended
    after them by a ``.pth`` file, so both sides compute with the very same torch build (the same
    numbers) and nothing of a second torch is downloaded.
    """
    from bench.sim import flower_python as flower_venv_python

    python = flower_venv_python()
    site = next((python.parent.parent / "lib").glob("python3*/site-packages"))
    ours = Path(torch.__file__).resolve().parent.parent
    (site / "zz-fleetlora-site.pth").write_text(f"{ours}\n")
    return python


def run_flower(folder: Path, clients: int, actors: int) -> dict[str, Any]:
    from bench.sim import FLOWER_ENV

    python = flower_python()
    # Each Ray actor is one CPU: one torch thread each, whatever fleetlora's side was given (an
    # OMP_NUM_THREADS=2 meant for fleetlora made two actors thrash two cores: 407 s instead of 259).
    env = {**os.environ, **FLOWER_ENV, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(python), str(APP), str(folder), "--clients", str(clients), "--actors", str(actors)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"flower run failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def useful_gflop(world: World, schedule: list[list[dict[str, Any]]]) -> float:
    """The run's useful work in GFLOP: every scheduled training example, validation every round and
    the test split once (bench/flops.py)."""
    c = world.config
    model = world.model("lora")
    shape = BertShape.of(model, len(world.classes))
    first = min(c.layers) if c.layers else 0
    adapted = len(c.layers) if c.layers else shape.layers
    linears = len(c.target_modules)
    train_flops, eval_flops = example_flops(shape, c.max_len, first, adapted, c.rank, linears)
    trained = sum(len(rows) for rnd in schedule for job in rnd for rows in job["batches"])
    scored = len(schedule) * len(world.val) + len(world.test)
    return (trained * train_flops + scored * eval_flops) / 1e9


@contextlib.contextmanager
def busy_load(processes: int) -> Iterator[None]:
    """``processes`` busy loops (one core's worth of load each) while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    if spinners:
        pids = " ".join(str(s.pid) for s in spinners)
        print(f"background load: {processes} busy-loop processes (pids {pids})", flush=True)
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fleetlora bench sim --train", description=__doc__)
    p.add_argument("--all-blocks", action="store_true", help="adapters on every block (no prefix cache)")
    p.add_argument("--rounds", type=int, default=0, help="at most this many rounds (0 = the README's 12)")
    p.add_argument("--actors", type=int, default=2, help="the Flower app's Ray actors, one CPU each")
    p.add_argument("--no-flower", action="store_true", help="fleetlora's side only (no .venv-flower)")
    p.add_argument("--load", type=int, default=0, help="busy-loop processes running beside both sides")
    p.add_argument("--model", default=SimConfig.model, help="registered model (default: %(default)s)")
    p.add_argument("--dataset", default=SimConfig.dataset, help="data set (default: %(default)s)")
    p.add_argument("--clients", type=int, default=SimConfig.clients, help="virtual clients")
    p.add_argument("--layers", default=",".join(map(str, SimConfig.layers)), help="adapted blocks")
    p.add_argument("--max-len", type=int, default=SimConfig.max_len, help="tokens per example (0 = auto)")
    args = p.parse_args(argv)
    if args.rounds < 0 or args.actors < 1 or args.clients < 1 or args.load < 0:
        p.error("--rounds and --load must be >= 0, --actors and --clients >= 1")
    config = experiment_config(
        args.all_blocks, args.rounds, model=args.model, dataset=args.dataset, max_len=args.max_len,
        clients=args.clients, clients_per_round=min(args.clients, SimConfig.clients_per_round),
        layers=tuple(int(x) for x in args.layers.split(",") if x.strip()),
    )  # fmt: skip
    blocks = "every block" if args.all_blocks else f"block(s) {','.join(map(str, config.layers))}"
    print(
        f"sim train bench: fedit, {config.model} on {config.dataset}, adapters on {blocks}, "
        f"up to {config.rounds} rounds"
    )
    with busy_load(args.load):
        return compare(config, args.actors, args.no_flower)


def compare(config: SimConfig, actors: int, no_flower: bool) -> int:
    """Run fleetlora, then the Flower app on the schedule fleetlora trained; print the summary line."""
    world, ours, schedule = run_fleetlora(config)
    print(
        f"fleetlora: {ours['rounds_s']:.1f} s of rounds ({ours['setup_s']:.1f} s to build the world), "
        f"{len(schedule)} rounds, test accuracy {ours['test_accuracy']:.4f}", flush=True
    )  # fmt: skip
    gflop = useful_gflop(world, schedule)
    gflops = gflop / ours["rounds_s"]
    peak = gemm_peak_gflops(ours["threads"])
    print(
        f"useful work: {gflop:.1f} GFLOP = {gflops:.2f} GFLOP/s; float32 GEMM peak with {ours['threads']} "
        f"thread(s): {peak:.1f} GFLOP/s"
    )
    summary = f"acc_fleetlora={ours['test_accuracy']:.4f}"
    rates = f"gflops={gflops:.2f} gemm_peak_gflops={peak:.1f}"
    if no_flower:
        print(f"sim_train: fleetlora_over_flower=not_measured {summary} {rates}")
        return 0
    with tempfile.TemporaryDirectory(prefix="fleetlora-bench-") as tmp:
        write_experiment(world, schedule, Path(tmp))
        print(f"flower: starting its rounds (1-minute load {os.getloadavg()[0]:.1f})", flush=True)
        try:
            theirs = run_flower(Path(tmp), len(world.clients), actors)
        except RuntimeError as e:
            print(f"flower: not measured: {e}")
            print(f"sim_train: fleetlora_over_flower=not_measured {summary} {rates}")
            return 1
    print(
        f"flower: {theirs['rounds_s']:.1f} s of rounds ({theirs['total_s']:.1f} s with start-up), "
        f"test accuracy {theirs['test_accuracy']:.4f}"
    )
    same = sum(a == b for a, b in zip(ours["val_accuracy"], theirs["val_accuracy"], strict=True))
    print(f"validation accuracy equal in {same} of {len(schedule)} rounds")
    ratio = theirs["rounds_s"] / ours["rounds_s"]
    print(
        f"sim_train: fleetlora_over_flower={ratio:.2f} {summary} acc_flower={theirs['test_accuracy']:.4f} "
        f"{rates}"
    )  # the last line: what `fleetlora bench all` reports
    return 0
