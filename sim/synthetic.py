"""A light world for benchmarks and tests: random token inputs, the real fleet, a small real model.

Everything but the data is the simulator's own code path (fleet, budgets, deadline, model, adapters),
so what a benchmark measures on it is the engine's cost; no data set is loaded and nothing is
tokenized or written to the cache.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.models import build_model
from sim.config import SimConfig
from sim.engine import World, assemble_world
from sim.features import Inputs


@torch.no_grad()
def random_inputs(
    base: nn.Module, config: SimConfig, size: int, num_classes: int, rng: np.random.Generator
) -> Inputs:
    """``size`` random sequences with random labels, entering the config's first adapted block."""
    ids = torch.as_tensor(rng.integers(1000, 20000, (size, config.max_len)), dtype=torch.int64)
    mask = torch.ones_like(ids)
    labels = torch.as_tensor(rng.integers(0, num_classes, size), dtype=torch.int64)
    start = min(config.layers) if config.layers else 0
    if start == 0:
        return Inputs(ids, mask, labels, 0)
    prefix = base.prefix  # MeanPoolClassifier.prefix: embeddings and the frozen blocks below ``start``
    chunks = [prefix(ids[s : s + 512], mask[s : s + 512], start) for s in range(0, size, 512)]  # type: ignore[operator]
    hidden = torch.cat(chunks)
    return Inputs(hidden.contiguous(), mask, labels, start)


def synthetic_world(
    config: SimConfig, examples_per_client: int = 8, test_examples: int = 64, num_classes: int = 4
) -> World:
    """A :class:`World` of ``config.clients`` clients holding ``examples_per_client`` random examples each."""
    rng = np.random.default_rng(config.seed)
    base, _ = build_model(config.model, num_classes, seed=config.seed)
    train = random_inputs(base, config, config.clients * examples_per_client, num_classes, rng)
    test = random_inputs(base, config, test_examples, num_classes, rng)
    classes = tuple(f"class{i}" for i in range(num_classes))
    return assemble_world(config, classes, base, train, test)
