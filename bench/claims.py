"""``fleetlora bench claims``: the seed papers' claims put to the test, as a section of BENCHMARKS.md.

Each claim compares a method with its baseline on the same seeds (same split, fleet, sampled clients
and batches), every method with the settings ``fleetlora tune`` chose on validation for its data set
(``--tuned DATASET=tuned.toml``) or the defaults. Per claim and cell (data set x split) the section
gives both sides' test accuracy at the round validation chose (mean +- std over seeds), the paired
difference with its 95% interval, the rounds and MB uploaded until validation accuracy first reached
95% of the centralized reference's, and a verdict in words: ``holds`` (interval above 0), ``does not
hold`` (below 0) or ``within noise here``. The right-skewed compute run puts Ravan against HetLoRA and
FlexLoRA where most devices are weak.

Every simulator run is a folder under ``--runs``; a finished one is reused (the grid resumes where it
stopped), and the section is rewritten after every run. The cost is estimated and printed first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.all import finished_records
from sim.config import SimConfig
from sim.report import CENTRALIZED, markdown_table
from sim.stats import mean_std, paired


@dataclass(frozen=True)
class Claim:
    method: str
    baseline: str
    text: str


CLAIMS = (
    Claim("ravan", "fedit", "Ravan: +2-8 points over a parameter-efficient baseline at the same budget"),
    Claim("fedrpca", "fedit", "FedRPCA: higher accuracy than FedIT under heterogeneity"),
    Claim("flora_na", "fedit", "FLoRA-NA: higher accuracy than FedIT (and lower divergence, see below)"),
)
HETERO_METHODS = ("ravan", "hetlora", "flexlora")
METHODS = ("fedit", "fedrpca", "flora_na", "ravan")
START, END = "<!-- claims:start -->", "<!-- claims:end -->"


@dataclass(frozen=True)
class Grid:
    datasets: tuple[str, ...]
    splits: tuple[str, ...]  # "iid" or a Dirichlet alpha
    seeds: tuple[int, ...]
    skewed: bool = True  # plus the right-skewed compute run (Ravan vs HetLoRA, FlexLoRA) per seed
    clients: int = 20
    clients_per_round: int = 10
    max_len: int = 0  # 0 = the run config's (tokens from the data, within its cap)
    # The protocol every cell shares, whatever the tuned TOML says: session 7 measured (R8 Dirichlet
    # 0.3, 64 tokens) that server momentum 0.9 overshoots under label skew (validation dips of 30-60
    # points in single rounds) while 0.7 rises almost monotonically and is still climbing at round 22,
    # within 1.5 points of the centralized reference by round 24.
    rounds: int = 24
    patience: int = 8
    server_momentum: float = 0.7


# The quick grid fits an afternoon on 2 CPU cores: one data set, two splits, 32 tokens per example.
QUICK = Grid(("reuters8",), ("iid", "0.3"), (0, 1, 2), max_len=32)
FULL = Grid(("reuters8", "20news"), ("iid", "0.3", "0.1"), (0, 1, 2, 3, 4), max_len=0)


def base_config(dataset: str, tuned: dict[str, Path]) -> SimConfig:
    """The run config of a data set: its tuned TOML (flags -> fields) or the defaults."""
    path = tuned.get(dataset)
    if path is None:
        return SimConfig(dataset=dataset)
    return SimConfig.from_flag_values(tomllib.loads(path.read_text()))


def with_grid(config: SimConfig, grid: Grid, seed: int, out: Path, **fields: Any) -> SimConfig:
    """A cell's run: the grid's fleet size, tokens and seed on top of the data set's config."""
    return replace(
        config,
        clients=grid.clients,
        clients_per_round=grid.clients_per_round,
        max_len=grid.max_len or config.max_len,
        rounds=grid.rounds,
        patience=grid.patience,
        server_momentum=grid.server_momentum,
        seed=seed,
        seeds=(),
        out=str(out),
        **fields,
    )


def cell_configs(grid: Grid, tuned: dict[str, Path], runs: Path) -> list[SimConfig]:
    """One simulator run per data set x split x seed (seed-major: an interrupted grid has all cells)."""
    out = []
    for seed in grid.seeds:
        for dataset in grid.datasets:
            base = base_config(dataset, tuned)
            methods = tuple(m for m in METHODS if m in base.methods) if tuned.get(dataset) else METHODS
            for split in grid.splits:
                out.append(
                    with_grid(
                        base,
                        grid,
                        seed,
                        runs / f"{dataset}-{split}-s{seed}",
                        methods=methods,
                        dataset=dataset,
                        partition="iid" if split == "iid" else "dirichlet",
                        alpha=base.alpha if split == "iid" else float(split),
                        centralized=True,
                    )
                )
        for dataset in grid.datasets[:1] if grid.skewed else ():  # compute heterogeneity: mostly weak devices
            base = base_config(dataset, tuned)
            out.append(
                with_grid(
                    base,
                    grid,
                    seed,
                    runs / f"{dataset}-right_skewed-s{seed}",
                    methods=HETERO_METHODS,
                    dataset=dataset,
                    device_mix="right_skewed",
                    method_params={m: p for m, p in base.method_params.items() if m in HETERO_METHODS},
                    centralized=False,
                )
            )
    return out


def split_name(config: SimConfig) -> str:
    if config.device_mix == "right_skewed":
        return "right-skewed compute"
    return "iid" if config.partition == "iid" else f"Dirichlet {config.alpha:g}"


def rounds_to_reach(records: list[dict[str, Any]], method: str, target: float) -> tuple[float, float] | None:
    """(round, MB uploaded) when ``method``'s validation accuracy first reached ``target``."""
    for r in records:
        if r.get("kind") == "round" and r["method"] == method and r["val_accuracy"] >= target:
            return r["round"], r["bytes_up_total"] / 1e6
    return None


def claim_rows(results: list[tuple[SimConfig, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per claim (and the heterogeneity pairs) per data set and split."""
    cells: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
    for config, records in results:
        cells.setdefault((config.dataset, split_name(config)), []).append(records)
    pairs = [(c.method, c.baseline, c.text) for c in CLAIMS]
    pairs += [
        ("ravan", b, f"Ravan loses less than {b} under right-skewed budgets") for b in HETERO_METHODS[1:]
    ]
    rows = []
    for (dataset, split), runs in cells.items():
        for method, baseline, text in pairs:
            acc = {m: {} for m in (method, baseline)}  # type: dict[str, dict[int, float]]
            reach: dict[str, list[tuple[float, float] | None]] = {method: [], baseline: []}
            for records in runs:
                tests = {r["method"]: r for r in records if r.get("kind") == "test"}
                if method not in tests or baseline not in tests:
                    continue
                central = tests.get(CENTRALIZED)
                for m in (method, baseline):
                    acc[m][tests[m]["seed"]] = tests[m]["test_accuracy"]
                    if central is not None:
                        reach[m].append(rounds_to_reach(records, m, 0.95 * central["val_accuracy"]))
            if not acc[method]:
                continue
            d = paired(acc[method], acc[baseline])
            verdict = {"higher": "holds", "lower": "does not hold", "within noise": "within noise here"}
            rows.append(
                {
                    "claim": text,
                    "data": f"{dataset}, {split}",
                    "seeds": d.n,
                    "method acc": _pm(list(acc[method].values())),
                    "baseline acc": _pm(list(acc[baseline].values())),
                    "diff [95% CI]": f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
                    if d.n > 1
                    else f"{d.mean:+.4f}",
                    "rounds / MB to 95% central (method; baseline)": (
                        f"{_reach(reach[method])}; {_reach(reach[baseline])}"
                    ),
                    "verdict": verdict.get(d.verdict(), d.verdict()),
                }
            )
    return rows


def divergence_rows(results: list[tuple[SimConfig, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """FLoRA-NA's divergence claim: the share of (layer, round) pairs where its divergence from the
    exact average is below FedIT's (each in its own run, same seed)."""
    rows = []
    for config, records in results:
        by = {
            m: [r for r in records if r.get("kind") == "round" and r["method"] == m]
            for m in ("fedit", "flora_na")
        }
        if not by["fedit"] or not by["flora_na"]:
            continue
        pairs = [
            (a[k], b[k])
            for a, b in zip(by["flora_na"], by["fedit"], strict=False)
            for k in a
            if k.startswith("divergence/") and k in b
        ]
        if pairs:
            lower = sum(x < y for x, y in pairs)
            rows.append(
                {
                    "data": f"{config.dataset}, {split_name(config)}, seed {config.seed}",
                    "pairs": len(pairs),
                    "flora_na lower": f"{lower}/{len(pairs)}",
                }
            )
    return rows


def _pm(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f} +- {s:.4f}"


def _reach(values: list[tuple[float, float] | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    note = "" if len(got) == len(values) else f" ({len(got)}/{len(values)} seeds)"
    return f"{statistics.fmean(v[0] for v in got):.1f} r / {statistics.fmean(v[1] for v in got):.1f} MB{note}"


def section(
    cmd: str, grid: Grid, results: list[tuple[SimConfig, list[dict[str, Any]]]], planned: int, hours: float
) -> str:
    rows = claim_rows(results)
    central = [
        (c.dataset, split_name(c), r["test_accuracy"], r["method"])
        for c, records in results
        for r in records
        if r.get("kind") == "test" and r["method"].startswith(CENTRALIZED)
    ]
    ref_rows = []
    for key in sorted({(d, s, m) for d, s, _, m in central}):
        accs = [a for d, s, a, m in central if (d, s, m) == key]
        ref_rows.append(
            {"data": f"{key[0]}, {key[1]}", "reference": key[2], "test acc": _pm(accs), "seeds": len(accs)}
        )
    status = f"{len(results)} of {planned} simulator runs" + (" (partial)" if len(results) < planned else "")
    lines = [
        START,
        "## The seed papers' claims, tested",
        "",
        f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')}: {status}, {hours:.1f} h on this machine.",
        "Test accuracy at the round validation chose (the test split read once per reported model), mean",
        f"+- std over seeds {list(grid.seeds)}, {grid.clients} clients, {grid.clients_per_round} per round,",
        f"{grid.max_len or 'the data-derived number of'} tokens per example, at most {grid.rounds} rounds",
        f"(stopping after {grid.patience} without a better validation accuracy), server momentum",
        f"{grid.server_momentum:g}. The difference is paired by seed with its 95% t interval; 'holds' means",
        "the interval lies above 0 (a verdict needs 3 seeds at least).",
        "",
        markdown_table(rows) if rows else "(no run finished yet)",
        "",
        "Centralized reference (same adapter on the pooled training data; `centralized` sees the",
        "federated run's examples, `centralized_ceiling` trains until validation stops improving):",
        "",
        markdown_table(ref_rows) if ref_rows else "(none yet)",
        "",
    ]
    div = divergence_rows(results)
    if div:
        lines += [
            "FLoRA-NA's divergence from the exact average against FedIT's, per layer and round:",
            "",
            markdown_table(div),
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace the claims section of ``path`` (or add it before the hand-written tail, or at the end)."""
    from bench.all import KEPT_MARKER

    old = path.read_text() if path.is_file() else ""
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) :]
    elif KEPT_MARKER in old:
        at = old.index(KEPT_MARKER)
        new = old[:at] + text + "\n\n" + old[at:]
    else:
        new = old + ("\n\n" if old else "") + text + "\n"
    path.write_text(new)


def spent_hours(results: list[tuple[SimConfig, list[dict[str, Any]]]]) -> float:
    """Wall time the finished runs took (each method's run, the centralized reference once)."""
    seconds = sum(
        r["wall_time_s"]
        for _, records in results
        for r in records
        if r.get("kind") == "test" and r["method"] != f"{CENTRALIZED}_ceiling"
    )
    return seconds / 3600


def estimate_hours(configs: list[SimConfig], done: int) -> float:
    """Rough cost of the runs left: client steps x the measured seconds per step of the first config."""
    from edge_client.local_round import LocalPlan
    from sim.engine import build_world
    from sim.trainers import client_trainer

    if done >= len(configs):
        return 0.0
    world = build_world(replace(configs[0], clients=2, clients_per_round=1))
    model = world.model("lora")
    trainer = client_trainer(world.config, model, "lora", len(world.classes))
    idx = world.clients[0].indices
    import numpy as np

    batches = list(world.train.client_batches(idx, world.config.batch_size, 4, np.random.default_rng(0)))
    trainer.train(batches[:1], LocalPlan(1))
    t0 = time.perf_counter()
    trainer.train(batches[1:], LocalPlan(3))
    per_step = (time.perf_counter() - t0) / 3
    steps = sum(
        (len(c.methods) + (2.5 if c.centralized else 0)) * c.rounds * c.clients_per_round * c.max_steps
        for c in configs[done:]
    )
    return steps * per_step * 1.3 / 3600  # +30%: evaluation and aggregation


def override(grid: Grid, seeds: str, datasets: str, splits: str) -> Grid:
    """A slice of ``grid`` from the command line's comma-separated lists (empty = the grid's own)."""
    from export.data import DATASETS
    from fleetlora.cli import as_list

    if seeds:
        try:
            grid = replace(grid, seeds=tuple(int(s) for s in as_list(seeds)))
        except ValueError:
            raise ValueError(f"--seeds {seeds!r}: expected integers, e.g. 0,1,2") from None
    if datasets:
        names = tuple(as_list(datasets))
        unknown = [n for n in names if n not in DATASETS]
        if unknown:
            raise ValueError(f"--datasets: unknown data set(s) {unknown}; known: {sorted(DATASETS)}")
        grid = replace(grid, datasets=names)
    if splits:
        items = as_list(splits)
        for item in items:
            if item not in ("iid", "skewed") and not _is_alpha(item):
                raise ValueError(f"--splits: {item!r} is neither iid, skewed nor a Dirichlet alpha > 0")
        grid = replace(grid, splits=tuple(i for i in items if i != "skewed"), skewed="skewed" in items)
    return grid


def _is_alpha(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    from sim.run import run_experiment

    p = argparse.ArgumentParser(
        prog="fleetlora bench claims",
        description="Test the seed papers' claims on real data over seeds; write the BENCHMARKS.md section.",
        epilog="examples:\n"
        "  fleetlora bench claims --quick --tuned reuters8=runs/tune-r8/tuned.toml\n"
        "  fleetlora bench claims --datasets 20news --splits iid --seeds 0 --out runs/20news.md"
        "   # one slice of the full grid",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="Reuters-R8, IID and Dirichlet 0.3, 3 seeds, 32 tokens"
    )
    p.add_argument(
        "--tuned", default="", help="DATASET=tuned.toml,... from `fleetlora tune` (default: defaults)"
    )
    p.add_argument("--runs", default="runs/claims", help="run folders (a finished one is reused)")
    p.add_argument("--out", default="BENCHMARKS.md", help="report whose claims section is (re)written")
    p.add_argument("--seeds", default="", help="override the grid's seeds, e.g. 0,1,2")
    p.add_argument("--datasets", default="", help="override the grid's data sets, e.g. 20news")
    p.add_argument(
        "--splits",
        default="",
        help="override the grid's splits: iid, Dirichlet alphas and 'skewed' (the right-skewed compute "
        "run), e.g. iid,0.3",
    )
    p.add_argument(
        "--report-only", action="store_true", help="write the section from the finished runs; run nothing"
    )
    args = p.parse_args(argv)
    grid = QUICK if args.quick else FULL
    try:
        grid = override(grid, args.seeds, args.datasets, args.splits)
    except ValueError as e:
        print(f"bench claims: {e}", file=sys.stderr)
        return 2
    tuned = {}
    for item in filter(None, args.tuned.split(",")):
        dataset, _, path = item.partition("=")
        if not Path(path).is_file():
            print(f"bench claims: --tuned {item!r}: no file {path!r}", file=sys.stderr)
            return 2
        try:
            tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as e:
            print(f"bench claims: {path} is not valid TOML: {e}", file=sys.stderr)
            return 2
        tuned[dataset] = Path(path)
    configs = cell_configs(grid, tuned, Path(args.runs))
    finished = [finished_records(c) for c in configs]
    done = sum(r is not None for r in finished)
    if args.report_only:
        configs, finished = (
            [c for c, r in zip(configs, finished, strict=True) if r is not None],
            [r for r in finished if r is not None],
        )
    hours = estimate_hours([c for c, r in zip(configs, finished, strict=True) if r is None], 0)
    print(
        f"bench claims: {len(configs)} simulator runs, {done} finished earlier; "
        f"estimated {hours:.1f} h for the rest on this machine",
        file=sys.stderr,
        flush=True,
    )
    cmd = " ".join(["fleetlora bench claims", *(a for a in argv if a != "--report-only")])
    planned = len(configs) if not args.report_only else len(cell_configs(grid, tuned, Path(args.runs)))
    results: list[tuple[SimConfig, list[dict[str, Any]]]] = []
    for config, records in zip(configs, finished, strict=True):
        if records is None:
            records = run_experiment(config, quiet=True)
        results.append((config, records))
        print(f"  {config.out} done ({len(results)} of {len(configs)})", file=sys.stderr, flush=True)
        write_section(Path(args.out), section(cmd, grid, results, planned, spent_hours(results)))
    rows = claim_rows(results)
    print(markdown_table(rows))
    counts = {
        v: sum(r["verdict"] == v for r in rows) for v in ("holds", "does not hold", "within noise here")
    }
    print(
        f"claims: held={counts['holds']} not_held={counts['does not hold']} "
        f"within_noise={counts['within noise here']} runs={len(results)}"
    )
    return 0
