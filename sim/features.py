"""Model inputs for the simulator, with the frozen lower layers computed once.

When adapters sit only on blocks ``>= L``, the hidden states entering block ``L`` depend on the
frozen base alone, so they are computed once per dataset (and cached on disk as safetensors) and
every client of every method trains from them: the same numbers as running the full model, at a
fraction of the cost.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from edge_client.trainer import Batch
from export.data import save_atomically
from sim.pool import ReplicaPool


@dataclass
class Inputs:
    """One split as model inputs: token ids, or cached hidden states entering ``start_layer``."""

    x: torch.Tensor  # (N, L) int64 token ids, or (N, L, H) float hidden states
    attention_mask: torch.Tensor
    labels: torch.Tensor
    start_layer: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: str | torch.device) -> Inputs:
        """The same inputs on ``device`` (the simulator's training device)."""
        return Inputs(
            self.x.to(device), self.attention_mask.to(device), self.labels.to(device), self.start_layer
        )

    def subset(self, idx: np.ndarray) -> Inputs:
        i = torch.as_tensor(idx, dtype=torch.int64, device=self.x.device)
        return Inputs(self.x[i], self.attention_mask[i], self.labels[i], self.start_layer)

    def batch(self, idx: np.ndarray | torch.Tensor) -> Batch:
        idx_t = torch.as_tensor(idx, dtype=torch.int64, device=self.x.device)
        out: Batch = {"attention_mask": self.attention_mask[idx_t], "labels": self.labels[idx_t]}
        if self.start_layer:
            out["hidden"] = self.x[idx_t]
            out["start_layer"] = torch.tensor(self.start_layer)
        else:
            out["input_ids"] = self.x[idx_t]
        return out

    def client_batches(
        self, indices: np.ndarray, batch_size: int, steps: int, rng: np.random.Generator
    ) -> Iterator[Batch]:
        """``steps`` shuffled mini-batches from a client's indices, reshuffling at each epoch."""
        for rows in client_batch_indices(indices, batch_size, steps, rng):
            yield self.batch(rows)

    def eval_batches(self, batch_size: int = 256, limit: int = 0) -> Iterator[Batch]:
        n = min(len(self), limit) if limit else len(self)
        for start in range(0, n, batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, n)))


def client_batch_indices(
    indices: np.ndarray, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """The rows of a client's ``steps`` mini-batches (see :meth:`Inputs.client_batches`)."""
    if len(indices) == 0:
        return
    order = rng.permutation(indices)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(indices), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def cache_dir() -> Path:
    return Path(os.environ.get("FLEETLORA_CACHE", Path.home() / ".cache" / "fleetlora"))


def prefix_inputs(
    base: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    start_layer: int,
    key: str,
    workers: int = 1,
) -> Inputs:
    """Inputs entering ``start_layer``: computed with the frozen ``base`` once, then read from disk.

    ``workers`` threads of one torch thread each share the chunks (sim/pool.py); the frozen base is
    only read, so one copy serves them all."""
    if start_layer == 0:
        return Inputs(input_ids, attention_mask, labels, 0)
    digest = hashlib.sha256(f"{key}:{start_layer}:{tuple(input_ids.shape)}".encode()).hexdigest()[:20]
    digest += hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:12]
    path = cache_dir() / f"prefix-{digest}.safetensors"
    if path.is_file():
        t = load_file(path)
        return Inputs(t["hidden"], attention_mask, labels, start_layer)
    starts = range(0, input_ids.shape[0], 128)
    # Minutes for a large split on a CPU, once per data set and length: say what is happening.
    desc = f"frozen blocks 0-{start_layer - 1} ({key}, once, {workers} worker(s))"
    bar = tqdm(total=len(starts), desc=desc, unit="batch", file=sys.stderr)

    def chunk(_worker: int, s: int) -> torch.Tensor:
        with torch.no_grad():  # grad mode is per thread
            hidden = base.prefix(input_ids[s : s + 128], attention_mask[s : s + 128], start_layer)
        bar.update(1)
        return hidden

    hidden = torch.cat(ReplicaPool([base] * workers).map(chunk, list(starts))).contiguous()
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically({"hidden": hidden}, path, {})
    return Inputs(hidden, attention_mask, labels, start_layer)
