"""``fleetlora bench all``: every benchmark side by side, written to ``BENCHMARKS.md``.

Each sub-benchmark runs in its own process (``fleetlora bench NAME``) so one's memory or threads never
colour another's timings; its last line (``name: key=value ...``) is the figure reported. The
learning-quality grid runs the simulator over methods x datasets x splits x seeds and reports mean and
spread of final accuracy and the bytes each method uploaded to first reach a target accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sim.config import SimConfig

# Exported MiniLM training programs are kept here between runs: an XNNPACK export of MiniLM takes
# 10-30 minutes on 2 cores, longer than the whole quick run may take.
CLIENT_CACHE = str(Path.home() / ".cache" / "fleetlora" / "bench-client")
# name -> (quick args, full args)
SUB_BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "aggregate": (["--quick"], []),
    "sim": (["--no-train", "--flower"], ["--no-train", "--flower"]),
    "ingest": (["--updates", "200"], []),
    "client": (
        ["--families", "lora", "--xnnpack", "on", "--cache", CLIENT_CACHE],
        ["--xnnpack", "on", "--cache", CLIENT_CACHE],
    ),
    "scale": (["--clients", "1000"], ["--clients", "10000"]),
}
# Everything below this line of an existing report is kept when the report is written again.
KEPT_MARKER = "<!-- kept: everything below is written by hand and survives `fleetlora bench all` -->"
PACKAGES = ("torch", "transformers", "peft", "executorch", "paho-mqtt", "ray", "numpy")


@dataclass(frozen=True)
class Grid:
    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    splits: tuple[str, ...]  # "iid" or a Dirichlet alpha
    seeds: tuple[int, ...]
    rounds: int
    clients: int
    clients_per_round: int
    minutes_per_run: float  # the estimate printed before starting (measured on 2 cores)


# The accuracy whose first crossing the "bytes to reach" column reports, per dataset (a level the
# better methods reach within the grid's rounds, so the column separates them).
TARGETS = {"reuters8": 0.7, "20news": 0.3, "trec6": 0.5}
QUICK = Grid(("fedit", "fedrpca", "flora_na", "ravan"), ("trec6",), ("iid", "0.3"), (0,), 3, 10, 5, 1.0)
FULL = Grid(
    ("all",),
    ("reuters8", "20news"),
    ("iid", "0.3", "0.1"),
    (0, 1, 2),
    rounds=8,
    clients=20,
    clients_per_round=4,
    minutes_per_run=3.5,
)


def run_sub(name: str, args: list[str], timeout: float) -> tuple[str, float]:
    """Run one sub-benchmark in its own process; its last line and how long it took."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "fleetlora", "bench", name, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"{name}: timed out after {timeout:.0f}s", time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{name}: failed (exit {proc.returncode}): {tail}", time.perf_counter() - t0
    return lines[-1], time.perf_counter() - t0


def grid_configs(grid: Grid, out: Path) -> list[SimConfig]:
    from coordinator import aggregators

    methods = tuple(aggregators.available()) if grid.methods == ("all",) else grid.methods
    configs = []
    # Seed-major: an interrupted run has every cell at the first seeds rather than some cells at all.
    for seed in grid.seeds:
        for dataset in grid.datasets:
            for split in grid.splits:
                partition = "iid" if split == "iid" else "dirichlet"
                alpha = 0.3 if split == "iid" else float(split)
                configs.append(
                    SimConfig(
                        methods=methods,
                        dataset=dataset,
                        partition=partition,
                        alpha=alpha,
                        seed=seed,
                        rounds=grid.rounds,
                        clients=grid.clients,
                        clients_per_round=grid.clients_per_round,
                        out=str(out / f"{dataset}-{split}-s{seed}"),
                    )
                )
    return configs


def read_speed(path: Path) -> dict[str, tuple[str, float]]:
    """Sub-benchmark lines an earlier attempt measured (``--resume``): name -> (line, seconds)."""
    if not path.is_file():
        return {}
    out = {}
    for text in path.read_text().splitlines():
        d = json.loads(text)
        if not d["line"].startswith(f"{d['name']}: ") or "failed" in d["line"] or "timed out" in d["line"]:
            continue  # only a sub-benchmark's own result line is reused, never a failure
        out[d["name"]] = (d["line"], float(d["seconds"]))
    return out


def finished_records(config: SimConfig) -> list[dict[str, Any]] | None:
    """The records of an earlier, complete run of ``config`` in its folder (for ``--resume``), or None.

    Complete: the folder's ``config.json`` is this config and every method has all its rounds.
    """
    folder = Path(config.out)
    try:
        same = json.loads((folder / "config.json").read_text()) == json.loads(json.dumps(config.to_dict()))
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError):
        return None
    tested = {r.get("method") for r in records if r.get("kind") == "test"}
    return records if same and tested >= set(config.methods) else None


def quality_rows(results: list[tuple[SimConfig, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Mean and spread of test accuracy (at the round validation chose), and MB uploaded until the
    validation accuracy first reached the dataset's target."""
    cells: dict[tuple[str, str, str], list[list[dict[str, Any]]]] = {}
    for config, records in results:
        split = "iid" if config.partition == "iid" else f"alpha={config.alpha}"
        for method in config.methods:
            rs = [r for r in records if r["method"] == method]
            cells.setdefault((config.dataset, split, method), []).append(rs)
    rows = []
    for (dataset, split, method), runs in sorted(cells.items()):
        target = TARGETS[dataset]
        finals = [next(r["test_accuracy"] for r in rs if r.get("kind") == "test") for rs in runs]
        to_target = [
            next((r["bytes_up_total"] / 1e6 for r in rs if r.get("val_accuracy", 0) >= target), None)
            for rs in runs
        ]
        reached = [x for x in to_target if x is not None]
        rows.append(
            {
                "dataset": dataset,
                "split": split,
                "method": method,
                "test_acc_mean": statistics.fmean(finals),
                "test_acc_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "target_acc": target,
                "MB_up_to_target": statistics.fmean(reached) if reached else "not reached",
                "seeds": len(runs),
            }
        )
    return rows


def hetero_config(grid: Grid, out: Path) -> SimConfig:
    """Compute heterogeneity: right-skewed budgets (mostly weak phones); Ravan vs HetLoRA and FlexLoRA."""
    return SimConfig(
        methods=("ravan", "hetlora", "flexlora"),
        dataset=grid.datasets[0],
        device_mix="right_skewed",
        rounds=grid.rounds,
        clients=grid.clients,
        clients_per_round=grid.clients_per_round,
        out=str(out / "hetero-right-skewed"),
    )


def plot_layer_divergence(records: list[dict[str, Any]], path: Path) -> Path | None:
    """FLoRA-NA's divergence against FedIT's, per adapted layer, over rounds (one panel per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("fedit", "flora_na") if any(r["method"] == m for r in records)]
    if len(methods) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, style in zip(methods, ("--", "-"), strict=True):
        rs = [r for r in records if r["method"] == method]
        layers = sorted(k for k in rs[0] if k.startswith("divergence/"))
        for i, key in enumerate(layers):
            label = f"{method}" if i == 0 else None
            ax.plot([r["round"] for r in rs], [r[key] for r in rs], style, color=f"C{i % 10}", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("divergence from exact average (per layer)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(title="dashed: FedIT, solid: FLoRA-NA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def versions() -> str:
    out = []
    for pkg in PACKAGES:
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def main(argv: list[str]) -> int:
    from sim.report import summary_rows
    from sim.run import run_experiment

    p = argparse.ArgumentParser(
        prog="fleetlora bench all",
        description="Run every benchmark side by side and write BENCHMARKS.md.",
        epilog="example: fleetlora bench all --quick --out BENCHMARKS.md",
    )
    p.add_argument("--quick", action="store_true", help="the reduced run (under 10 minutes on 2 cores)")
    p.add_argument("--out", default="BENCHMARKS.md", help="report path (default: %(default)s)")
    p.add_argument("--runs", default="runs/bench", help="run folders of the learning-quality grid")
    p.add_argument("--skip", default="", help="comma-separated sub-benchmarks to skip")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse sub-benchmark lines and simulator runs an interrupted attempt completed in --runs",
    )
    args = p.parse_args(argv)
    grid = QUICK if args.quick else FULL
    configs = grid_configs(grid, Path(args.runs))
    print(
        f"bench all: {len(SUB_BENCHMARKS)} sub-benchmarks and {len(configs)} simulator runs "
        f"(estimated {len(configs) * grid.minutes_per_run:.0f}+ min for the simulator runs)",
        file=sys.stderr,
        flush=True,
    )
    skip = set(filter(None, args.skip.split(",")))
    lines: list[str] = []
    measured = Path(args.runs) / "speed.jsonl"  # each sub-benchmark's line, for --resume
    earlier = {} if not args.resume else read_speed(measured)
    if not args.resume:
        measured.unlink(missing_ok=True)
    for name, (quick_args, full_args) in SUB_BENCHMARKS.items():
        if name in skip:
            continue
        if name in earlier:
            line, seconds = earlier[name]
        else:
            line, seconds = run_sub(
                name, quick_args if args.quick else full_args, timeout=1800 if args.quick else 7200
            )
            measured.parent.mkdir(parents=True, exist_ok=True)
            with measured.open("a") as f:
                f.write(json.dumps({"name": name, "line": line, "seconds": seconds}) + "\n")
        print(f"  {line}   ({seconds:.0f}s)", file=sys.stderr, flush=True)
        lines.append(f"| `fleetlora bench {name}` | `{line}` | {seconds:.0f} s |")
    results: list[tuple[SimConfig, list[dict[str, Any]]]] = []
    cmd = " ".join(["fleetlora bench all", *argv])
    out = Path(args.out)
    kept = kept_section(out)
    for config in configs:
        done = finished_records(config) if args.resume else None
        results.append((config, done if done is not None else run_experiment(config, quiet=True)))
        print(f"  sim {config.out} done ({len(results)} of {len(configs)})", file=sys.stderr, flush=True)
        # Written after every run: an interrupted full run still leaves what it measured.
        out.write_text(report(cmd, grid, lines, results, len(configs), None, None) + kept)
    hetero = hetero_config(grid, Path(args.runs))
    hetero_rows = summary_rows(run_experiment(hetero, quiet=True))
    div_plot = plot_layer_divergence(results[0][1], out.with_name("benchmarks_divergence.png"))
    text = report(cmd, grid, lines, results, len(configs), (hetero, hetero_rows), div_plot) + kept
    out.write_text(text)
    print(text)
    return 0


def kept_section(path: Path) -> str:
    """The hand-written tail of an existing report (from :data:`KEPT_MARKER` on), or nothing."""
    if not path.is_file():
        return ""
    text = path.read_text()
    at = text.find(KEPT_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def report(
    cmd: str,
    grid: Grid,
    speed_lines: list[str],
    results: list[tuple[SimConfig, list[dict[str, Any]]]],
    planned_runs: int,
    hetero: tuple[SimConfig, list[dict[str, Any]]] | None,
    div_plot: Path | None,
) -> str:
    """BENCHMARKS.md from what has been measured so far (a partial run says how far it got)."""
    from sim.report import markdown_table

    status = (
        f"**Partial**: {len(results)} of {planned_runs} simulator runs done when this was written."
        if len(results) < planned_runs or hetero is None
        else f"Complete: all {planned_runs} simulator runs and the heterogeneity run."
    )
    lines = [
        "# fleetlora benchmarks",
        "",
        f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')}. {status}",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        f"Versions: {versions()}.",
        "",
        "## Speed (each a ratio measured side by side in one run)",
        "",
        "| benchmark | result | took |",
        "|---|---|---|",
        *speed_lines,
        "",
        f"## Learning quality (test accuracy at the round validation chose, over {len(grid.seeds)} "
        f"seed(s), at most {grid.rounds} rounds, "
        f"{grid.clients} clients, {grid.clients_per_round} per round)",
        "",
        markdown_table(quality_rows(results)) if results else "(no run finished yet)",
        "",
    ]
    if hetero is not None:
        config, rows = hetero
        lines += [
            f"## Compute heterogeneity (right-skewed device mix, {config.dataset}, alpha {config.alpha})",
            "",
            markdown_table(rows),
            "",
            "## Divergence per layer, FLoRA-NA against FedIT",
            "",
            f"![divergence]({div_plot.name})" if div_plot else "(fedit and flora_na not both in the grid)",
            "",
        ]
    return "\n".join(lines)
