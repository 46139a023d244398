"""The centralized reference: the same model, adapter, optimizer and data, trained on the pooled data.

Every federated run is shown against it, so a user sees its distance to the ceiling. The reference
trains one adapter (the LoRA spec of the run, from the same initial state) on the union of the clients'
data with one optimizer that is never reset (the run's learning rate; the momentum it uses locally or
at the server, whichever is larger), in chunks: chunk ``r`` processes as many examples as the
federated round ``r`` did (all its clients together), and each chunk is scored on validation like a
round. Two rows come out of one run:

- ``centralized``: the best validation round within the federated run's budget (same examples seen);
- ``centralized_ceiling``: training goes on past that budget until validation stops improving
  (``patience`` chunks, or 3 when the run sets none) or ``centralized_max_epochs`` epochs are done.

The test split is read once for each of the two.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_client.local_round import LocalPlan
from edge_client.trainer import EagerTrainer, OptimizerConfig
from export.state import clone_state
from sim.engine import MethodRun, World, _Best, evaluate_global, test_record
from sim.report import CENTRALIZED

CEILING = f"{CENTRALIZED}_ceiling"
DEFAULT_PATIENCE = 3


def run_centralized(
    world: World, examples_per_round: list[int], on_round: Callable[[dict[str, Any]], None] | None = None
) -> tuple[MethodRun, MethodRun]:
    """Train on the pooled data, chunk by chunk; returns the budget-matched run and the ceiling run."""
    from coordinator import aggregators

    config = world.config
    if not examples_per_round or not any(examples_per_round):
        raise ValueError("the centralized reference needs the examples a federated run processed per round")
    spec = config.spec("lora")
    model = world.model("lora", spec)
    workers = world.pool("lora", spec)  # score each chunk on the client workers (models[0] is model)
    template = world.initial_state("lora", spec)
    agg = aggregators.create("fedit", spec, device="cpu")  # evaluation only: its payload is the state
    # The momentum the federated run applies, on the clients or at the server (FedAvgM): with local
    # SGD, server momentum is what plays the role of the centralized optimizer's.
    momentum = max(config.momentum, config.server_momentum)
    optimizer = OptimizerConfig(name=config.optimizer, lr=config.lr, momentum=momentum)
    trainer = EagerTrainer(model, optimizer, keep_optimizer=True)
    trainer.set_trainable(template)
    pool = np.arange(len(world.train))
    chunk = max(1, round(float(np.mean(examples_per_round))))
    max_examples = max(sum(examples_per_round), int(config.centralized_max_epochs * len(pool)))
    batches = world.train.client_batches(
        pool,
        config.batch_size,
        math.ceil(max_examples / config.batch_size),
        np.random.default_rng([config.seed, 7]),
    )
    patience = config.patience or DEFAULT_PATIENCE
    matched, ceiling = _Best(), _Best()
    history: list[dict[str, Any]] = []
    seen, start = 0, time.perf_counter()
    for rnd in itertools.count(1):
        in_budget = rnd <= len(examples_per_round)
        want = examples_per_round[rnd - 1] if in_budget else chunk
        if not in_budget and (seen >= max_examples or rnd - 1 - ceiling.round >= patience):
            break
        steps = math.ceil(want / config.batch_size)
        metrics = trainer.train(itertools.islice(batches, steps), LocalPlan(steps))
        seen += metrics.examples
        state = trainer.get_trainable()
        val_accuracy, val_loss = evaluate_global(workers, spec, agg, state, template, world.val, 0)
        record = {
            "kind": "round",
            "method": CENTRALIZED,
            "seed": config.seed,
            "round": rnd,
            "within_budget": in_budget,
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
            "train_loss": metrics.mean_loss,
            "examples": metrics.examples,
            "epochs": seen / len(pool),
            "wall_time_s": time.perf_counter() - start,
        }
        history.append(record)
        if on_round:
            on_round(record)
        if val_accuracy > ceiling.val_accuracy:
            ceiling = _Best(rnd, val_accuracy, clone_state(state))
            if in_budget:
                matched = ceiling
    runs = []
    for name, best in ((CENTRALIZED, matched), (CEILING, ceiling)):
        test = test_record(world, name, workers, spec, agg, template, {}, best, history)
        test.update(bytes_up_total=0, bytes_down_total=0, epochs=history[best.round - 1]["epochs"])
        runs.append(MethodRun(name, history if name == CENTRALIZED else [], test))
    return runs[0], runs[1]
