"""The simulator's main loop: one federated run of one method, round by round.

Read top to bottom: build the world once (data, cached inputs, fleet, one base model per adapter
family), then for each method: sample clients, charge the virtual clock, train the clients that
make the deadline, aggregate with the real coordinator aggregator, evaluate on the held-out test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from coordinator import aggregators
from coordinator.aggregators import ClientInfo, ClientUpdate
from edge_client.backends import make_trainer
from edge_client.local_round import LocalPlan, start_state
from edge_client.trainer import OptimizerConfig, Trainer, evaluate
from export.adapters import attach
from export.base_delta import applied_base_delta, split_base_delta
from export.data import load_text_dataset, tokenize_cached
from export.models import build_model
from export.spec import AdapterSpec
from export.state import State, load_trainable_state, num_bytes, trainable_state
from sim.config import SimConfig
from sim.features import Inputs, prefix_inputs
from sim.fleet import VirtualClient, build_fleet, model_cost
from sim.transports import ClientJob, InProcTransport, Transport

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass
class World:
    """Everything a comparison shares across methods: identical clients, data and budgets."""

    config: SimConfig
    classes: tuple[str, ...]
    train: Inputs
    test: Inputs
    clients: list[VirtualClient]
    deadline_s: float
    models: dict[str, nn.Module] = field(default_factory=dict)  # adapter spec (JSON) -> adapted model
    # spec (JSON) -> the fresh adapter: every method starts from it, not from the last method's global
    initial: dict[str, State] = field(default_factory=dict)

    def model(self, family: str, spec: AdapterSpec | None = None) -> nn.Module:
        """The one shared adapted model of a spec (default: the family's), built on first use."""
        spec = spec or self.config.spec(family)
        key = spec.to_json()
        if key not in self.models:
            self.models[key] = adapted_model(self.config, len(self.classes), family, spec)
            self.initial[key] = trainable_state(self.models[key])
        return self.models[key]

    def initial_state(self, family: str, spec: AdapterSpec | None = None) -> State:
        """The adapter every method of a spec starts from (the model itself moves on as methods run)."""
        spec = spec or self.config.spec(family)
        self.model(family, spec)
        return self.initial[spec.to_json()]


def adapted_model(
    config: SimConfig, num_classes: int, family: str, spec: AdapterSpec | None = None
) -> nn.Module:
    """The frozen base with a fresh adapter: bit-identical wherever it is built with the same config."""
    base, _ = build_model(config.model, num_classes, seed=config.seed)
    return attach(base, spec or config.spec(family))


def client_trainer(
    config: SimConfig, model: nn.Module, family: str, num_classes: int, base_delta: bool = False
) -> Trainer:
    """The trainer every virtual client uses (in this process or in a Ray actor).

    ``eager`` trains ``model``; ``executorch`` trains the training program of a bundle of the same
    model and adapter (built once, then read from the cache), with base-delta inputs for a method
    that changes the base (``base_delta``).
    """
    optimizer = OptimizerConfig(name=config.optimizer, lr=config.lr, momentum=0.9)
    bundle = None
    if config.trainer == "executorch":
        from export.build import cached_bundle

        bundle = cached_bundle(
            config.model, config.spec(family), num_classes=num_classes, seq_len=config.max_len,
            batch_range=(2, max(2, config.batch_size)), model_seed=config.seed, base_delta=base_delta,
        )  # fmt: skip
    return make_trainer(config.trainer, bundle=bundle, model=model, optimizer=optimizer)


def build_world(config: SimConfig) -> World:
    dataset = load_text_dataset(config.dataset)
    base: Any
    base, tokenizer = build_model(config.model, len(dataset.classes), seed=config.seed)
    train_tok, test_tok = tokenize_cached(dataset, tokenizer, config.max_len)
    # The ExecuTorch program takes token ids: with it, no cached hidden states (the adapter still
    # sits on ``layers`` only; the frozen lower blocks are just run every step).
    start = min(config.layers) if config.layers and config.trainer == "eager" else 0
    key = f"{config.model}:{config.dataset}:{config.max_len}"
    train = prefix_inputs(
        base, train_tok.input_ids, train_tok.attention_mask, train_tok.labels, start, key + ":train"
    )
    test = prefix_inputs(
        base, test_tok.input_ids, test_tok.attention_mask, test_tok.labels, start, key + ":test"
    )
    if config.eval_examples:  # evaluate on a fixed random subset of the test split, not its first rows
        test = test.subset(np.random.default_rng(12345).permutation(len(test)))
    return assemble_world(config, dataset.classes, base, train, test)


def assemble_world(
    config: SimConfig, classes: tuple[str, ...], base: Any, train: Inputs, test: Inputs
) -> World:
    """A world from ready inputs: the fleet, its budgets (priced on ``base``) and the deadline."""
    enc = base.encoder.config
    n_params = sum(p.numel() for p in base.parameters())
    cost = model_cost(config, n_params, enc.hidden_size, enc.num_hidden_layers)
    clients, deadline = build_fleet(config, train.labels.numpy(), cost)
    return World(config, classes, train, test, clients, deadline)


def method_family(method: str) -> str:
    return aggregators.get(method).family


def make_transport(
    world: World, family: str, train: bool = True, spec: AdapterSpec | None = None, base_delta: bool = False
) -> Transport:
    """How this method's clients are reached; ``base_delta``: the method changes the frozen base."""
    config = world.config
    if config.transport == "ray":
        from sim.ray_transport import RayTransport

        return RayTransport(config, family, len(world.classes), world.train, train, base_delta)
    if config.transport not in ("inproc", "mqtt") or (config.transport == "mqtt" and not train):
        raise NotImplementedError(f"transport {config.transport!r} cannot run this job")
    model = world.model(family, spec)
    trainer = client_trainer(config, model, family, len(world.classes), base_delta)
    template = world.initial_state(family, spec)
    if config.transport == "mqtt":
        from sim.mqtt_transport import MqttTransport

        return MqttTransport(trainer, template, world.train, broker_url=config.broker)
    return InProcTransport(model, trainer, template, world.train, train_fn=train)


def plan_for(client: VirtualClient, spec: AdapterSpec, hetero_rank: bool, seed: tuple[int, ...]) -> LocalPlan:
    """A client's rank / heads / steps this round, from its budget (Ravan: random heads, METHODS 2.3).

    ``seed`` seeds the head draw; the generator is made only when heads are drawn (it costs more
    than the rest of a client's bookkeeping).
    """
    budget = client.budgets[spec.family]
    if spec.family == "ravan":
        heads = (
            None
            if budget.heads >= spec.heads
            else tuple(sorted(np.random.default_rng(seed).choice(spec.heads, budget.heads, replace=False)))
        )
        return LocalPlan(budget.local_steps, heads=heads)
    rank = budget.rank if hetero_rank and budget.rank < spec.rank else None
    return LocalPlan(budget.local_steps, rank=rank)


def run_method(
    world: World,
    method: str,
    on_round: RoundCallback | None = None,
    train: bool = True,
    aggregator: aggregators.Aggregator | None = None,
) -> list[dict[str, Any]]:
    """Run every round of one method; returns (and reports through ``on_round``) per-round metrics.

    ``aggregator`` replaces the method's registered one (``bench sim`` passes a no-op).
    """
    config = world.config
    family = method_family(method)
    spec = aggregators.get(method).client_spec(config.spec(family))  # e.g. FFA-LoRA freezes A
    params = dict(config.method_params.get(method, {}))
    agg = aggregator or aggregators.create(method, spec, device="auto", weighting=config.weighting, **params)
    hetero = bool(getattr(agg, "heterogeneous_ranks", False))
    transport = make_transport(world, family, train, spec, base_delta=agg.changes_base)
    model = world.model(family, spec)
    template = world.initial_state(family, spec)
    global_state = agg.init_global(template)
    # Tensors each client keeps between rounds (FedSA-LoRA's B): a newcomer starts from the template's.
    local_keys = [k for k in template if agg.local_suffixes and k.endswith(agg.local_suffixes)]
    local_states: dict[str, State] = {}
    history: list[dict[str, Any]] = []
    virtual_time, bytes_up_total, bytes_down_total, wall_start = 0.0, 0, 0, time.perf_counter()
    try:
        for rnd in range(config.rounds):
            rng = np.random.default_rng([config.seed, rnd])  # same draws for every method
            picked = sorted(rng.choice(len(world.clients), config.clients_per_round, replace=False))
            drop_draws = rng.random(len(picked))
            jobs, bytes_down, round_time, dropped, late = [], 0, 0.0, 0, 0
            for i, draw in zip(picked, drop_draws, strict=True):
                client = world.clients[i]
                budget = client.budgets[family]
                plan = plan_for(client, spec, hetero, (config.seed, rnd, int(i), 1))
                payload = agg.payload_for(ClientInfo(client.cid, plan.rank, plan.heads), global_state)
                bytes_down += num_bytes(payload)
                if draw < client.profile.dropout:  # vanishes mid-round: the server waits to the deadline
                    dropped += 1
                    round_time = world.deadline_s
                    continue
                if budget.round_s > world.deadline_s:  # misses the deadline: its update is not counted
                    late += 1
                    round_time = world.deadline_s
                    continue
                round_time = max(round_time, budget.round_s)
                keep = (
                    local_states.get(client.cid, {k: template[k] for k in local_keys}) if local_keys else None
                )
                jobs.append(
                    ClientJob(
                        client, payload, plan, budget.batch_size, (config.seed, rnd, int(i)), keep_local=keep
                    )
                )
            results = transport.run(spec, jobs)
            local_states.update({r.cid: r.local for r in results if r.local})
            updates = [
                ClientUpdate(
                    r.cid, r.upload, j.client.num_examples, rank=j.plan.rank, meta={"heads": j.plan.heads}
                )
                for r, j in zip(results, jobs, strict=True)
            ]
            bytes_up = sum(num_bytes(u.state) for u in updates)
            agg.metrics = {}
            if updates:  # never aggregate from nothing: a round without updates keeps the global
                global_state = agg.aggregate(global_state, updates)
            newcomer = {k: template[k] for k in local_keys}  # the global view: a client with no local state
            accuracy, loss = evaluate_global(
                model, spec, agg, global_state, template, world.test, config.eval_examples, newcomer
            )
            local_acc = [
                evaluate_global(
                    model,
                    spec,
                    agg,
                    global_state,
                    template,
                    world.test,
                    config.eval_examples,
                    local_states[r.cid],
                )[0]
                for r in results
                if r.cid in local_states
            ]
            virtual_time += round_time
            bytes_up_total += bytes_up
            bytes_down_total += bytes_down
            train_losses = [loss for r in results for loss in r.metrics.losses]
            record = {
                "method": method,
                "round": rnd + 1,
                "accuracy": accuracy,
                "accuracy_local": float(np.mean(local_acc)) if local_acc else None,
                "loss": loss,
                "train_loss": float(np.mean(train_losses)) if train_losses else None,
                "participants": len(updates),
                "dropped": dropped,
                "late": late,
                "bytes_up": bytes_up,
                "bytes_down": bytes_down,
                "bytes_up_total": bytes_up_total,
                "bytes_down_total": bytes_down_total,
                "virtual_time_s": virtual_time,
                "wall_time_s": time.perf_counter() - wall_start,
                "ranks": [j.plan.rank or spec.rank for j in jobs] if family == "lora" else None,
                "heads": [len(j.plan.heads) if j.plan.heads else spec.heads for j in jobs]
                if family == "ravan"
                else None,
                **{k: v for k, v in agg.metrics.items() if k == "divergence" or k.startswith("divergence/")},
            }
            history.append(record)
            if on_round:
                on_round(record)
    finally:
        transport.close()
    return history


@torch.no_grad()
def evaluate_global(
    model: nn.Module,
    spec: AdapterSpec,
    agg: aggregators.Aggregator,
    global_state: State,
    template: State,
    test: Inputs,
    limit: int,
    keep_local: State | None = None,
) -> tuple[float, float]:
    """Accuracy and loss of the global adapter (with a client's kept tensors) on the held-out test split.

    A base change the method made (FLoRA, FedEx-LoRA) is applied for the evaluation only.
    """
    view = {**agg.payload_for(ClientInfo("__eval__"), global_state), **(keep_local or {})}
    with applied_base_delta(model, split_base_delta(view)[1]):
        load_trainable_state(model, start_state(spec, view, template))
        return evaluate(model, test.eval_batches(limit=limit))
