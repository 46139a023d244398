"""``fleetlora tune``: choose each method's settings on validation, with the same budget for every method.

As the seed papers did, every method gets a grid search: its learning rate (the shared ``lr`` grid)
times its own options (:data:`OWN_OPTIONS`: FedRPCA's beta and its adaptive schedule, FLoRA-NA's
solver sweeps, a weighting rule for the others), each method's own list the same length, so every
method is tried exactly as many times. A trial is one simulator run scored by its best validation
accuracy (mean over the tuning seeds); the test split is never read.

Trials are appended to ``trials.jsonl`` as they finish, so an interrupted search resumes where it
stopped (``--resume`` is the default: a trial already in the file is not run again). The chosen
settings go to ``tuned.toml``, which ``fleetlora sim --config tuned.toml`` reads.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sim.config import SimConfig

# Each method's own options, one dict per point; every list has OWN_POINTS entries (same budget).
OWN_POINTS = 3
WEIGHTINGS: list[dict[str, Any]] = [{"weighting": w} for w in ("examples", "work", "uniform")]
OWN_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "fedrpca": [{"beta": 2.0}, {"beta": 4.0}, {"beta": "adaptive"}],  # 1 would be FedIT itself
    "flora_na": [{"sweeps": 5}, {"sweeps": 10}, {"sweeps": 20}],
    "fedex_lora": WEIGHTINGS,
    "flora": WEIGHTINGS,
}
DEFAULT_LRS = (0.01, 0.02, 0.05, 0.1)


def own_options(method: str) -> list[dict[str, Any]]:
    return OWN_OPTIONS.get(method, WEIGHTINGS)


@dataclass(frozen=True)
class Trial:
    method: str
    params: dict[str, Any]  # method_params of the trial: training overrides and the method's options

    @property
    def key(self) -> str:
        return json.dumps([self.method, self.params], sort_keys=True)


def trials_for(methods: tuple[str, ...], lrs: tuple[float, ...]) -> list[Trial]:
    """Every method's grid: ``lrs`` x its own options (the same count for every method)."""
    out = []
    for method in methods:
        options = own_options(method)
        if len(options) != OWN_POINTS:
            raise ValueError(f"{method}: {len(options)} own options, every method needs {OWN_POINTS}")
        out += [Trial(method, {"lr": lr, **opt}) for lr, opt in itertools.product(lrs, options)]
    return out


def read_trials(path: Path) -> dict[str, dict[str, Any]]:
    """Finished trials by key (``--resume``); a line that does not parse is named, not skipped."""
    if not path.is_file():
        return {}
    done = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done[Trial(row["method"], row["params"]).key] = row
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{number}: not a trial record ({e}); move the file away to start over"
            ) from None
    return done


def best_params(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the params of the trial with the highest mean validation accuracy (ties: first)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        current = best.get(row["method"])
        if current is None or row["val_accuracy"] > current["val_accuracy"]:
            best[row["method"]] = row
    return {m: r["params"] for m, r in best.items()}


def tuned_toml(base: SimConfig, chosen: dict[str, dict[str, Any]], scores: dict[str, float]) -> str:
    """A run config for ``fleetlora sim --config``: the methods and each one's chosen settings."""
    # Tuning never needs the centralized rows; the runs that use the settings do: not carried over.
    skip = ("out", "seeds", "seed", "method_params", "centralized")
    settings = {**base.flag_values(skip), "method": ",".join(chosen)}
    lines = [
        "# Written by `fleetlora tune`: each method's settings chosen on validation accuracy; the",
        "# experiment's other settings as tuned. Run with: fleetlora sim --config tuned.toml --seeds 0,1,2",
        *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),
    ]
    for method, params in chosen.items():
        lines += ["", f"[method_params.{method}]  # validation accuracy {scores[method]:.4f}"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in sorted(params.items())]
    return "\n".join(lines) + "\n"


def run_trial(world_for_seed: Callable[[int], Any], base: SimConfig, trial: Trial) -> dict[str, Any]:
    """One trial over the tuning seeds: validation only."""
    from sim.engine import run_method

    scores, rounds, seconds = [], [], 0.0
    for seed in base.run_seeds:
        world = world_for_seed(seed)
        config = replace(world.config, methods=(trial.method,), method_params={trial.method: trial.params})
        t0 = time.perf_counter()
        run = run_method(replace(world, config=config), trial.method, read_test=False)
        seconds += time.perf_counter() - t0
        scores.append(run.test["val_accuracy"])
        rounds.append(run.test["chosen_round"])
    return {
        "method": trial.method,
        "params": trial.params,
        "val_accuracy": statistics.fmean(scores),
        "val_accuracy_by_seed": scores,
        "chosen_round": statistics.fmean(rounds),
        "seconds": seconds,
    }


def tune(
    base: SimConfig, lrs: tuple[float, ...], out: Path, quiet: bool = False
) -> dict[str, dict[str, Any]]:
    """Run (or resume) the search; writes ``trials.jsonl`` and ``tuned.toml``; returns the chosen params."""
    from tqdm import tqdm

    from sim.engine import build_world

    out.mkdir(parents=True, exist_ok=True)
    trials_path = out / "trials.jsonl"
    trials = trials_for(base.methods, lrs)
    done = read_trials(trials_path)
    todo = [t for t in trials if t.key not in done]
    per_method = len(trials) // len(base.methods)
    if not quiet:
        print(
            f"fleetlora tune: {len(base.methods)} methods x {per_method} trials each x "
            f"{len(base.run_seeds)} seed(s); {len(trials) - len(todo)} done earlier, {len(todo)} to run "
            f"(each trial is one `fleetlora sim` run of one method; validation only)",
            file=sys.stderr,
            flush=True,
        )
    worlds: dict[int, Any] = {}

    def world_for_seed(seed: int) -> Any:
        if seed not in worlds:
            worlds[seed] = build_world(replace(base, seed=seed, seeds=()))
        return worlds[seed]

    bar = tqdm(todo, desc="tune", unit="trial", disable=quiet, file=sys.stderr)
    for trial in bar:
        row = run_trial(world_for_seed, base, trial)
        with trials_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        done[trial.key] = row
        bar.set_postfix_str(f"{trial.method} {trial.params} val={row['val_accuracy']:.3f}")
    rows = [done[t.key] for t in trials]
    chosen = best_params(rows)
    scores = {m: max(r["val_accuracy"] for r in rows if r["method"] == m) for m in chosen}
    (out / "tuned.toml").write_text(tuned_toml(base, chosen, scores))
    return chosen
