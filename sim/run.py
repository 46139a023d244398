"""``run_experiment``: the researcher's main job, from a config to a run folder and a summary table."""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from export.adapters import ravan_upload
from export.state import num_bytes, num_scalars
from sim.centralized import run_centralized
from sim.config import SimConfig
from sim.engine import MethodRun, World, build_world, method_family, run_method
from sim.report import RunFolder, markdown_table, paired_rows, plot, summary_rows


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def adapter_summary(world: World) -> str:
    """Per adapter family: trainable tensors, scalars and bytes one client uploads per round."""
    rows = []
    for family in sorted({method_family(m) for m in world.config.methods}):
        model = world.model(family)
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        upload = ravan_upload(state) if family == "ravan" else state
        adapter = {k: v for k, v in upload.items() if "classifier" not in k}
        spec = world.config.spec(family)
        shape = f"r={spec.rank}" if family == "lora" else f"h={spec.heads}"
        rows.append(
            {
                "adapter": f"{family} ({shape})",
                "tensors": len(adapter),
                "scalars": num_scalars(adapter),
                "bytes/upload": num_bytes(adapter),
                "classifier bytes": num_bytes(upload) - num_bytes(adapter),
            }
        )
    return markdown_table(rows)


def examples_per_round(runs: list[MethodRun]) -> list[int]:
    """Examples the federated methods processed in each round (mean over the methods that ran it)."""
    longest = max(len(run.rounds) for run in runs)
    return [
        round(statistics.fmean(run.rounds[i]["examples"] for run in runs if i < len(run.rounds)))
        for i in range(longest)
    ]


def run_experiment(config: SimConfig, quiet: bool = False) -> list[dict[str, Any]]:
    """Run every method of ``config`` on identical clients, for every seed, and the centralized
    reference; writes the run folder; returns all records (rounds and test lines)."""
    t0 = time.perf_counter()
    out = Path(config.out)
    folder = RunFolder(out)
    records: list[dict[str, Any]] = []
    for seed in config.run_seeds:
        world = build_world(replace(config, seed=seed, seeds=()))
        if seed == config.run_seeds[0]:
            config.save(out / "config.json")  # as given: `--resume` of the benchmarks compares it
            world_facts = {
                "max_len": world.config.max_len,  # resolved when the config says 0 (auto)
                "deadline_s": world.deadline_s,
                "examples": {"train": len(world.train), "val": len(world.val), "test": len(world.test)},
            }
            (out / "world.json").write_text(json.dumps(world_facts, indent=2) + "\n")
            if not quiet:
                say(
                    f"fleetlora sim: {config.model} on {config.dataset}, {config.clients} clients, "
                    f"at most {config.rounds} rounds, seeds {list(config.run_seeds)}, "
                    f"{world.config.max_len} tokens per example"
                )
                say(
                    f"world ready in {time.perf_counter() - t0:.1f}s: {len(world.train)} train / "
                    f"{len(world.val)} validation / {len(world.test)} test examples, "
                    f"round deadline {world.deadline_s:.1f} virtual s\n"
                )
                say(adapter_summary(world) + "\n")
        runs = [run_one(world, method, folder, records, quiet) for method in config.methods]
        if config.centralized:
            central = run_centralized_reference(world, examples_per_round(runs), folder, records, quiet)
            runs.extend(central)
        for run in runs:
            folder.append(run.test)
            records.append(run.test)
    summary = markdown_table(summary_rows(records))
    reference = next((m for m in config.methods), "")
    paired_table = markdown_table(paired_rows(records, reference)) if len(config.run_seeds) > 1 else ""
    text = f"# fleetlora sim\n\n{summary}\n"
    if paired_table:
        text += f"\nPaired test-accuracy differences against {reference} (same seeds):\n\n{paired_table}\n"
    (out / "summary.md").write_text(text)
    plots = plot(records, out)
    if not quiet:
        say(PROTOCOL_NOTE)
        print(summary)
        if paired_table:
            print(f"\npaired differences against {reference} (same seeds, 95% interval):\n{paired_table}")
        say(
            f"\nrun folder: {out}/ (metrics.jsonl, summary.md, {', '.join(p.name for p in plots)}); "
            f"total {time.perf_counter() - t0:.0f}s"
        )
    return records


PROTOCOL_NOTE = (
    "\ntest_acc: the test split read once, at the round with the best validation accuracy ('round'); "
    "vs_central: its difference to the centralized reference (same adapter on the pooled data, same "
    "examples seen); centralized_ceiling: that reference trained until validation stops improving.\n"
)


def run_one(
    world: World, method: str, folder: RunFolder, records: list[dict[str, Any]], quiet: bool
) -> MethodRun:
    """One method on one seed, with a progress bar and every round written as it ends."""
    config = world.config
    bar = tqdm(
        total=config.rounds, desc=f"{method:>10} s{config.seed}", unit="round", disable=quiet, file=sys.stderr
    )

    def on_round(rec: dict[str, Any]) -> None:
        folder.append(rec)
        records.append(rec)
        late = f" late={rec['late']}" if rec.get("late") else ""
        bar.set_postfix_str(
            f"val={rec['val_accuracy']:.3f} loss={rec['train_loss'] or float('nan'):.3f}{late}"
        )
        bar.update(1)

    try:
        return run_method(world, method, on_round)
    finally:
        bar.close()


def run_centralized_reference(
    world: World, per_round: list[int], folder: RunFolder, records: list[dict[str, Any]], quiet: bool
) -> tuple[MethodRun, MethodRun]:
    bar = tqdm(desc=f"{'centralized':>10} s{world.config.seed}", unit="chunk", disable=quiet, file=sys.stderr)

    def on_round(rec: dict[str, Any]) -> None:
        folder.append(rec)
        records.append(rec)
        bar.set_postfix_str(f"val={rec['val_accuracy']:.3f} epochs={rec['epochs']:.2f}")
        bar.update(1)

    try:
        return run_centralized(world, per_round, on_round)
    finally:
        bar.close()
