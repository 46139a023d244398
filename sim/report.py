"""A run folder: the resolved config, ``metrics.jsonl``, PNG plots and a markdown summary table."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from sim.stats import mean_std, paired

CENTRALIZED = "centralized"  # the reference rows' method names start with this

Record = dict[str, Any]


class RunFolder:
    """Writes one experiment's outputs as they are produced (a crash keeps the rounds already done)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.write_text("")

    def append(self, record: Record) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(path: str | Path) -> list[Record]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def by_method(records: list[Record], kind: str = "round") -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        if r.get("kind", "round") == kind:
            out.setdefault(r["method"], []).append(r)
    return out


def summary_rows(records: list[Record]) -> list[dict[str, Any]]:
    """One row per method: test accuracy at the round validation chose (mean and std over seeds), its
    distance to the centralized reference, the round chosen, bytes and time to that round.

    When a method keeps part of its adapter on the clients (FedSA-LoRA), ``test_acc`` is the global
    view (a client with no local state) and ``test_acc_local`` the mean over the chosen round's
    clients with their own tensors; the column is shown only when some method has it.
    """
    tests = by_method(records, "test")
    rounds = by_method(records)
    personalised = any(r.get("test_accuracy_local") is not None for rs in tests.values() for r in rs)
    reference = {r["seed"]: r["test_accuracy"] for r in tests.get(CENTRALIZED, [])}
    rows = []
    for method, ts in tests.items():
        acc, std = mean_std([t["test_accuracy"] for t in ts])
        gaps = [t["test_accuracy"] - reference[t["seed"]] for t in ts if t["seed"] in reference]
        local = [t["test_accuracy_local"] for t in ts if t.get("test_accuracy_local") is not None]
        divs = [r["divergence"] for r in rounds.get(method, []) if r.get("divergence") is not None]
        mb = [t["bytes_up_total"] / 1e6 for t in ts if t.get("bytes_up_total") is not None]
        vt = [t["virtual_time_s"] / 60 for t in ts if t.get("virtual_time_s") is not None]
        rows.append(
            {
                "method": method,
                "seeds": len(ts),
                "test_acc": acc,
                "std": std,
                **({"test_acc_local": mean_std(local)[0] if local else math.nan} if personalised else {}),
                "vs_central": statistics.fmean(gaps)
                if gaps and not method.startswith(CENTRALIZED)
                else math.nan,
                "val_acc": statistics.fmean(t["val_accuracy"] for t in ts),
                "round": statistics.fmean(t["chosen_round"] for t in ts),
                "train_loss r1->rN": _loss_span(rounds.get(method, [])),
                "MB_up": statistics.fmean(mb) if mb else math.nan,
                "virtual_min": statistics.fmean(vt) if vt else math.nan,
                "wall_s": statistics.fmean(t["wall_time_s"] for t in ts),
                "divergence": statistics.fmean(divs) if divs else math.nan,
            }
        )
    return rows


def paired_rows(records: list[Record], reference: str) -> list[dict[str, Any]]:
    """Each method against ``reference`` on the same seeds: test accuracy difference and 95% interval."""
    tests = {m: {t["seed"]: t["test_accuracy"] for t in ts} for m, ts in by_method(records, "test").items()}
    if reference not in tests:
        return []
    rows = []
    for method, accs in tests.items():
        if method == reference or method.startswith(CENTRALIZED):
            continue
        d = paired(accs, tests[reference])
        rows.append(
            {
                "method": f"{method} - {reference}",
                "seeds": d.n,
                "diff": d.mean,
                "95% low": d.low,
                "95% high": d.high,
                "verdict": d.verdict(),
            }
        )
    return rows


def _loss_span(rs: list[Record]) -> str:
    losses = [
        r["train_loss"] for r in rs if r.get("train_loss") is not None and r.get("seed") == rs[0].get("seed")
    ]
    return f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "-"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        cells = []
        for c in cols:
            v = row[c]
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_curve(rs: list[Record], x_key: str, y_key: str) -> list[tuple[float, float]]:
    """(x, y) per round, averaged over the seeds that reached the round."""
    by_round: dict[int, list[Record]] = {}
    for r in rs:
        if r.get(y_key) is not None and r.get(x_key) is not None:
            by_round.setdefault(r["round"], []).append(r)
    return [
        (statistics.fmean(r[x_key] for r in group), statistics.fmean(r[y_key] for r in group))
        for _, group in sorted(by_round.items())
    ]


def plot(records: list[Record], out_dir: str | Path) -> list[Path]:
    """Validation accuracy against rounds, bytes sent and virtual time (one line per method, the mean
    over seeds; the centralized reference dashed), and the aggregation divergence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    groups = by_method(records)
    central = groups.pop(CENTRALIZED, [])
    val = "validation accuracy"
    panels = [
        ("round", "val_accuracy", "round", val, "accuracy_vs_rounds.png"),
        ("bytes_up_total", "val_accuracy", "MB uploaded (all clients)", val, "accuracy_vs_bytes.png"),
        ("virtual_time_s", "val_accuracy", "virtual time (min)", val, "accuracy_vs_time.png"),
        ("round", "divergence", "round", "divergence from exact average", "divergence.png"),
    ]
    scale = {"bytes_up_total": 1e6, "virtual_time_s": 60.0}
    written = []
    for x_key, y_key, x_label, y_label, name in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for method, rs in groups.items():
            pts = _mean_curve(rs, x_key, y_key)
            if not pts:
                continue
            ax.plot(
                [p[0] / scale.get(x_key, 1.0) for p in pts],
                [p[1] for p in pts],
                marker="o",
                ms=3,
                label=method,
            )
            drawn = True
        if drawn and central and y_key == "val_accuracy":
            pts = _mean_curve(central, "round", y_key)
            if x_key == "round":
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1.2, label="centralized")
            else:  # no bytes or virtual time: its best, as a level
                ax.axhline(max(p[1] for p in pts), color="k", ls="--", lw=1.2, label="centralized (best)")
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
