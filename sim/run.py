"""``run_experiment``: the researcher's main job, from a config to a run folder and a summary table."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from export.adapters import ravan_upload
from export.state import num_bytes, num_scalars
from sim.config import SimConfig
from sim.engine import World, build_world, method_family, run_method
from sim.report import RunFolder, markdown_table, plot, summary_rows


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


def run_experiment(config: SimConfig, quiet: bool = False) -> list[dict[str, Any]]:
    """Run every method of ``config`` on identical clients; writes the run folder; returns all records."""
    t0 = time.perf_counter()
    out = Path(config.out)
    folder = RunFolder(out)
    config.save(out / "config.json")
    if not quiet:
        say(
            f"fleetlora sim: {config.model} on {config.dataset}, "
            f"{config.clients} clients, {config.rounds} rounds"
        )
    world = build_world(config)
    if not quiet:
        say(
            f"world ready in {time.perf_counter() - t0:.1f}s: "
            f"{len(world.train)} train / {len(world.test)} test examples, "
            f"round deadline {world.deadline_s:.1f} virtual s\n"
        )
        say(adapter_summary(world) + "\n")
    records: list[dict[str, Any]] = []
    for method in config.methods:
        bar = tqdm(total=config.rounds, desc=f"{method:>10}", unit="round", disable=quiet, file=sys.stderr)

        def on_round(rec: dict[str, Any], bar: tqdm = bar) -> None:
            folder.append(rec)
            records.append(rec)
            bar.set_postfix(acc=f"{rec['accuracy']:.3f}", loss=f"{rec['train_loss'] or float('nan'):.3f}")
            bar.update(1)

        run_method(world, method, on_round)
        bar.close()
    table = markdown_table(summary_rows(records))
    (out / "summary.md").write_text(f"# fleetlora sim\n\n{table}\n")
    plots = plot(records, out)
    if not quiet:
        print(table)
        say(
            f"\nrun folder: {out}/ (metrics.jsonl, summary.md, {', '.join(p.name for p in plots)}); "
            f"total {time.perf_counter() - t0:.0f}s"
        )
    return records
