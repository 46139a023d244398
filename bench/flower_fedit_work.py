"""What a plain Flower app computes for the README's fedit experiment, in torch, transformers and peft.

``bench sim --train`` writes the experiment to a folder (``experiment.json``: model, spec, optimizer
settings; ``data.safetensors``: token ids of the clients' pool, validation and test splits;
``start.safetensors``: the starting adapter; ``schedule.json``: for every round, each training
client's mini-batches as rows of the pool) and ``flower_fedit_app.py`` runs it with Flower. This
module is the app's work without Flower: a client trains the full model (every block run every step,
as a plain app does: no cache of the frozen lower blocks) with SGD from the global adapter on its
scheduled batches; the server averages the adapters weighted by the examples each client processed,
applies FedAvgM's server momentum, and scores the global on validation every round and on the test
split once, for the round validation chose. It imports no Flower, so the tests run it here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

State = dict[str, torch.Tensor]


class FeditWork:
    """One process's copy of the model and data (a Ray actor builds it once, at its first message)."""

    def __init__(self, folder: str | Path):
        from export.adapters import attach
        from export.models import build_model
        from export.spec import AdapterSpec

        folder = Path(folder)
        self.experiment: dict[str, Any] = json.loads((folder / "experiment.json").read_text())
        self.schedule: list[list[dict[str, Any]]] = json.loads((folder / "schedule.json").read_text())
        self.data = load_file(folder / "data.safetensors")
        self.start: State = load_file(folder / "start.safetensors")
        e = self.experiment
        base, _ = build_model(e["model"], e["num_classes"], seed=e["seed"])
        self.model = attach(base, AdapterSpec.from_json(e["spec"]))
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, state: State) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name])

    def train(self, state: State, rnd: int, cid: int) -> tuple[State, int, float]:
        """Client ``cid``'s local round ``rnd``: (trained adapter, examples processed, mean loss)."""
        self.load(state)
        job = next(j for j in self.schedule[rnd] if j["cid"] == cid)
        e = self.experiment
        opt = torch.optim.SGD(self.params.values(), lr=e["lr"], momentum=e["momentum"])
        examples, losses = 0, []
        for rows in job["batches"]:
            idx = torch.as_tensor(rows, dtype=torch.int64)
            opt.zero_grad(set_to_none=True)
            logits = self.model(
                input_ids=self.data["pool_ids"][idx], attention_mask=self.data["pool_mask"][idx]
            )
            loss = nn.functional.cross_entropy(logits, self.data["pool_labels"][idx])
            loss.backward()
            opt.step()
            examples += len(rows)
            losses.append(float(loss.detach()))
        return {n: p.detach().clone() for n, p in self.params.items()}, examples, sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate(self, state: State, split: str) -> tuple[float, float]:
        """(accuracy, mean loss) of ``state`` on ``val`` or ``test``."""
        self.load(state)
        ids, mask, labels = (self.data[f"{split}_{k}"] for k in ("ids", "mask", "labels"))
        correct, loss = 0, 0.0
        for s in range(0, len(labels), 256):
            logits = self.model(input_ids=ids[s : s + 256], attention_mask=mask[s : s + 256])
            loss += float(nn.functional.cross_entropy(logits, labels[s : s + 256], reduction="sum"))
            correct += int((logits.argmax(-1) == labels[s : s + 256]).sum())
        return correct / len(labels), loss / len(labels)


@functools.cache
def work_for(folder: str) -> FeditWork:
    return FeditWork(folder)


class FedAvgM:
    """The server: the examples-weighted mean of the clients' adapters, then server momentum."""

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum, self.velocity = lr, momentum, dict[str, torch.Tensor]()

    def step(self, glob: State, results: list[tuple[State, int]]) -> State:
        total = sum(n for _, n in results)
        out = {}
        for key, old in glob.items():
            mean = sum(s[key].double() * (n / total) for s, n in results).to(old.dtype)  # type: ignore[union-attr]
            delta = mean - old
            v = self.velocity.get(key)
            v = delta if v is None else self.momentum * v + delta
            self.velocity[key] = v
            out[key] = old + self.lr * v
        return out


def run_rounds(
    work: FeditWork, train_round: Callable[[int, State], list[tuple[State, int]]]
) -> dict[str, Any]:
    """Every scheduled round: ``train_round(rnd, glob)`` returns the clients' (adapter, examples);
    returns the per-round validation accuracy and the test accuracy of the round validation chose."""
    e = work.experiment
    server = FedAvgM(e["server_lr"], e["server_momentum"])
    glob, best, best_state, val = dict(work.start), -1.0, dict(work.start), []
    for rnd in range(len(work.schedule)):
        results = train_round(rnd, glob)
        if results:
            glob = server.step(glob, results)
        accuracy, _ = work.evaluate(glob, "val")
        val.append(accuracy)
        if accuracy > best:
            best, best_state = accuracy, glob
    test_accuracy, _ = work.evaluate(best_state, "test")
    return {"val_accuracy": val, "test_accuracy": test_accuracy}
