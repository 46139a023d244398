"""A run folder: the resolved config, ``metrics.jsonl``, PNG plots and a markdown summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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


def by_method(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r["method"], []).append(r)
    return out


def summary_rows(records: list[Record]) -> list[dict[str, Any]]:
    """One row per method: final and best accuracy, total bytes, virtual time, mean divergence.

    When a method keeps part of its adapter on the clients (FedSA-LoRA), ``final_acc`` is the global
    view (a client with no local state) and ``final_acc_local`` the mean over the last round's
    clients with their own tensors; the column is shown only when some method has it.
    """
    rows = []
    personalised = any(r.get("accuracy_local") is not None for r in records)
    for method, rs in by_method(records).items():
        last = rs[-1]
        divs = [r["divergence"] for r in rs if r.get("divergence") is not None]
        local = [r["accuracy_local"] for r in rs if r.get("accuracy_local") is not None]
        rows.append(
            {
                "method": method,
                "train_loss r1->rN": _loss_span(rs),
                "final_acc": last["accuracy"],
                **({"final_acc_local": local[-1] if local else math.nan} if personalised else {}),
                "best_acc": max(r["accuracy"] for r in rs),
                "MB_up": last["bytes_up_total"] / 1e6,
                "MB_down": last["bytes_down_total"] / 1e6,
                "virtual_min": last["virtual_time_s"] / 60,
                "wall_s": last["wall_time_s"],
                "divergence": sum(divs) / len(divs) if divs else math.nan,
            }
        )
    return rows


def _loss_span(rs: list[Record]) -> str:
    losses = [r["train_loss"] for r in rs if r.get("train_loss") is not None]
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


def plot(records: list[Record], out_dir: str | Path) -> list[Path]:
    """Accuracy against rounds, bytes sent and virtual time (one line per method), and divergence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    groups = by_method(records)
    panels = [
        ("round", "accuracy", "round", "test accuracy", "accuracy_vs_rounds.png"),
        ("bytes_up_total", "accuracy", "MB uploaded (all clients)", "test accuracy", "accuracy_vs_bytes.png"),
        ("virtual_time_s", "accuracy", "virtual time (min)", "test accuracy", "accuracy_vs_time.png"),
        ("round", "divergence", "round", "divergence from exact average", "divergence.png"),
    ]
    written = []
    for x_key, y_key, x_label, y_label, name in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for method, rs in groups.items():
            pts = [(r[x_key], r[y_key]) for r in rs if r.get(y_key) is not None]
            if not pts:
                continue
            xs = [
                p[0] / 1e6 if x_key == "bytes_up_total" else p[0] / 60 if x_key == "virtual_time_s" else p[0]
                for p in pts
            ]
            ax.plot(xs, [p[1] for p in pts], marker="o", ms=3, label=method)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
