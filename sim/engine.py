"""The simulator's main loop: one federated run of one method, round by round.

Read top to bottom: build the world once (data with a validation split carved from the training
split, cached inputs, fleet, one base model per adapter family), then for each method: sample
clients, charge the virtual clock, train the clients that make the deadline, aggregate with the real
coordinator aggregator (and the server optimizer), score the round on validation; at the end read the
test split once, for the round validation chose.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from coordinator import aggregators
from coordinator.aggregators import ClientUpdate
from coordinator.server_optimizer import ServerOptimizer
from edge_client.local_round import LocalPlan
from edge_client.planner import plan_from_budget
from export.adapters import start_state
from export.base_delta import applied_base_delta, split_base_delta
from export.data import load_text_dataset, stratified_split, token_lengths, tokenize_cached
from export.evaluation import Batch, EvalTally, batch_tallies
from export.models import build_model
from export.spec import AdapterSpec
from export.state import State, clone_state, load_trainable_state, num_bytes, trainable_state
from protocol.wire import client_hash, sample_clients
from sim.config import SimConfig
from sim.features import Inputs, prefix_inputs
from sim.fleet import NoTrainingError, VirtualClient, build_fleet, model_cost
from sim.pool import ReplicaPool
from sim.threads import choose_workers
from sim.trainers import adapted_model, client_trainer, world_device
from sim.transports import ClientJob, InProcTransport, Transport

RoundCallback = Callable[[dict[str, Any]], None]
JobsCallback = Callable[[int, list[ClientJob]], None]  # (round index, the jobs it trains)


@dataclass
class World:
    """Everything a comparison shares across methods: identical clients, data and budgets."""

    config: SimConfig  # resolved: ``max_len`` is the length actually used
    classes: tuple[str, ...]
    train: Inputs  # the clients' pool: the training split less the validation split
    val: Inputs
    test: Inputs
    clients: list[VirtualClient]
    deadline_s: float
    models: dict[str, nn.Module] = field(default_factory=dict)  # adapter spec (JSON) -> adapted model
    # spec (JSON) -> the fresh adapter: every method starts from it, not from the last method's global
    initial: dict[str, State] = field(default_factory=dict)
    device: str = "cpu"  # where the models train and score (the inputs live there too)
    workers: int = 1  # clients trained at once, each by its own thread on its own model (sim/pool.py)
    replicas: dict[str, list[nn.Module]] = field(default_factory=dict)  # spec (JSON) -> extra models

    def model(self, family: str, spec: AdapterSpec | None = None) -> nn.Module:
        """The one shared adapted model of a spec (default: the family's), built on first use."""
        spec = spec or self.config.spec(family)
        key = spec.to_json()
        if key not in self.models:
            self.models[key] = adapted_model(self.config, len(self.classes), family, spec).to(self.device)
            self.initial[key] = trainable_state(self.models[key])
        return self.models[key]

    def pool(self, family: str, spec: AdapterSpec | None = None) -> ReplicaPool:
        """The spec's model and ``workers - 1`` bit-identical copies, one per client worker."""
        first = self.model(family, spec)
        key = (spec or self.config.spec(family)).to_json()
        extra = self.replicas.setdefault(key, [])
        while len(extra) < self.workers - 1:
            extra.append(adapted_model(self.config, len(self.classes), family, spec).to(self.device))
        return ReplicaPool([first, *extra])

    def initial_state(self, family: str, spec: AdapterSpec | None = None) -> State:
        """The adapter every method of a spec starts from (the model itself moves on as methods run)."""
        spec = spec or self.config.spec(family)
        self.model(family, spec)
        return self.initial[spec.to_json()]


def build_world(config: SimConfig) -> World:
    """Data, validation split, cached inputs and fleet of an experiment (one seed)."""
    dataset = load_text_dataset(config.dataset)
    base: Any
    base, tokenizer = build_model(config.model, len(dataset.classes), seed=config.seed)
    if not config.max_len:
        config = replace(config, max_len=auto_max_len(dataset, tokenizer, config.max_len_cap))
    train_tok, test_tok = tokenize_cached(dataset, tokenizer, config.max_len)
    if config.eval_examples:  # a fixed random subset of the test split, not its first rows
        order = np.random.default_rng(12345).permutation(len(test_tok))
        test_tok = test_tok.subset(np.sort(order[: config.eval_examples]))
    # The ExecuTorch program takes token ids: with it, no cached hidden states (the adapter still
    # sits on ``layers`` only; the frozen lower blocks are just run every step).
    start = min(config.layers) if config.layers and config.trainer == "eager" else 0
    key = f"{config.model}:{config.dataset}:{config.max_len}"
    workers, _ = world_workers(config, world_device(config))  # the clients' workers compute it
    train = prefix_inputs(
        base, train_tok.input_ids, train_tok.attention_mask, train_tok.labels, start, key + ":train", workers
    )
    test = prefix_inputs(
        base, test_tok.input_ids, test_tok.attention_mask, test_tok.labels, start, key + ":test", workers
    )
    return assemble_world(config, dataset.classes, base, train, test)


def auto_max_len(dataset: Any, tokenizer: Any, cap: int = 64) -> int:
    """Tokens per example from the training split: its median length rounded up to a multiple of 32,
    within [32, cap] (32 tokens cut most Reuters and 20 Newsgroups documents to their first line;
    the cap bounds the cost of a step, which grows with its tokens)."""
    lengths = token_lengths(dataset.train_texts, tokenizer, cap=max(cap, 32))
    return int(min(cap, max(32, -(-int(np.median(lengths)) // 32) * 32)))


def assemble_world(
    config: SimConfig, classes: tuple[str, ...], base: Any, train: Inputs, test: Inputs
) -> World:
    """A world from ready inputs: the validation split carved from ``train``, the fleet over the rest
    (budgets priced on ``base``) and the deadline."""
    labels = train.labels.numpy()
    pool_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed)
    pool, val = train.subset(pool_idx), train.subset(val_idx)
    enc = base.encoder.config
    n_params = sum(p.numel() for p in base.parameters())
    cost = model_cost(config, n_params, enc.hidden_size, enc.num_hidden_layers)
    clients, deadline = build_fleet(config, pool.labels.numpy(), cost)
    device = world_device(config)
    pool, val, test = pool.to(device), val.to(device), test.to(device)
    workers, _ = world_workers(config, device)
    return World(config, classes, pool, val, test, clients, deadline, device=device, workers=workers)


def world_workers(config: SimConfig, device: str) -> tuple[int, str]:
    """(client workers, why): pooled only where clients train in this process one by one, eagerly."""
    poolable = config.transport == "inproc" and config.trainer == "eager"
    poolable = poolable and not wants_batched(config, device)
    return choose_workers(config.workers, config.threads, device, poolable, config.clients_per_round)


def wants_batched(config: SimConfig, device: str) -> bool:
    """``--batched``: on, off, or auto (see sim/batched.py for where it is faster)."""
    from sim.batched import batched_by_default

    return config.batched == "on" or (config.batched == "auto" and batched_by_default(config, device))


def method_family(method: str) -> str:
    return aggregators.get(method).family


def make_transport(
    world: World,
    family: str,
    train: bool = True,
    spec: AdapterSpec | None = None,
    base_delta: bool = False,
    config: SimConfig | None = None,
    aggregator: aggregators.Aggregator | None = None,
    method: str = "",
) -> Transport:
    """How this method's clients are reached; ``base_delta``: the method changes the frozen base;
    ``config``: the method's own settings (default the world's); ``aggregator`` and ``method``: the
    run's (the ``mqtt`` transport's coordinator service announces and validates with them; ``method``
    also names the run in the batched transport's logs)."""
    config = config or world.config
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

        if aggregator is None:
            raise ValueError("the mqtt transport needs the run's aggregator (its coordinator service)")
        roster = [c.cid for c in world.clients]
        return MqttTransport(
            trainer, template, world.train, aggregator, spec or config.spec(family), roster,
            method=method or aggregator.name, seed=config.seed, per_round=config.clients_per_round,
            broker_url=config.broker,
        )  # fmt: skip
    if wants_batched(config, world.device):
        from sim.batched import BatchedTransport

        return BatchedTransport(model, trainer, template, world.train, train_fn=train, label=method)
    # One trainer per client worker: each holds its own optimizer state.
    models = world.pool(family, spec).models
    more = [client_trainer(config, m, family, len(world.classes), base_delta) for m in models[1:]]
    workers = ReplicaPool(models, [trainer, *more])
    return InProcTransport(model, trainer, template, world.train, train_fn=train, pool=workers)


def plan_for(client: VirtualClient, spec: AdapterSpec, heterogeneous_ranks: bool, round: int) -> LocalPlan:
    """A client's rank / heads / steps in ``round`` (1-based, as the coordinator counts), from its
    budget: what the device itself plans (:func:`edge_client.planner.plan_from_budget`)."""
    return plan_from_budget(
        client.budgets[spec.family], spec, client.cid, round, heterogeneous_ranks=heterogeneous_ranks
    )


@dataclass
class MethodRun:
    """One method's run on one seed: per-round records (scored on validation) and the test result.

    ``chosen_round`` is the round with the best validation accuracy; the test split is read once, for
    that round's global adapter (``test`` holds its accuracy and loss).
    """

    method: str
    rounds: list[dict[str, Any]]
    test: dict[str, Any]

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record of the run, as written to ``metrics.jsonl``: the rounds, then the test line."""
        return [*self.rounds, self.test]


@dataclass
class _Best:
    """The best round so far on validation, with what is needed to test it later."""

    round: int = 0
    val_accuracy: float = -1.0
    state: State = field(default_factory=dict)
    local: dict[str, State] = field(default_factory=dict)


def sample_round(config: SimConfig, clients: list[VirtualClient], rnd: int) -> tuple[list[int], list[float]]:
    """Who is sampled in round ``rnd`` (indices, ascending), by the coordinator's sampler, and each
    one's dropout draw in [0, 1): the same for every method and every transport."""
    index = {c.cid: i for i, c in enumerate(clients)}
    cids = sample_clients(config.seed, rnd + 1, index, config.clients_per_round)
    picked = sorted(index[c] for c in cids)
    return picked, [client_hash(f"{config.seed}:dropout", rnd + 1, clients[i].cid) / 2**64 for i in picked]


def run_method(
    world: World,
    method: str,
    on_round: RoundCallback | None = None,
    train: bool = True,
    aggregator: aggregators.Aggregator | None = None,
    read_test: bool = True,
    on_jobs: JobsCallback | None = None,
) -> MethodRun:
    """Run one method round by round, scoring each round on validation; test the chosen round once.

    ``aggregator`` replaces the method's registered one (``bench sim`` passes a no-op); ``read_test``
    False (tuning) leaves the test split unread: the test record then holds validation only;
    ``on_jobs`` sees each round's jobs before they train (``bench sim --train`` replays them). Raises
    :class:`NoTrainingError` when a round's sampled clients all miss the deadline or the whole run
    aggregates nothing.
    """
    config = world.config.for_method(method)
    family = method_family(method)
    spec = aggregators.get(method).client_spec(config.spec(family))  # e.g. FFA-LoRA freezes A
    agg = aggregator or aggregators.create(
        method, spec, device="auto", weighting=config.weighting, **config.aggregator_params(method)
    )
    server = ServerOptimizer(config.server_lr, config.server_momentum).for_method(agg.changes_base)
    hetero = bool(getattr(agg, "heterogeneous_ranks", False))
    transport = make_transport(
        world, family, train, spec, base_delta=agg.changes_base, config=config, aggregator=agg, method=method
    )
    pool = world.pool(family, spec)  # the client workers' models: they also score the rounds
    template = world.initial_state(family, spec)
    global_state = agg.init_global(template)
    # Tensors each client keeps between rounds (FedSA-LoRA's B): a newcomer starts from the template's.
    local_keys = [k for k in template if agg.local_suffixes and k.endswith(agg.local_suffixes)]
    newcomer = {k: template[k] for k in local_keys}  # the global view: a client with no local state
    local_states: dict[str, State] = {}
    history: list[dict[str, Any]] = []
    best = _Best()
    virtual_time, bytes_up_total, bytes_down_total, wall_start = 0.0, 0, 0, time.perf_counter()
    try:
        for rnd in range(config.rounds):
            picked, drop_draws = sample_round(config, world.clients, rnd)
            jobs, round_time, dropped, late = [], 0.0, 0, 0
            # One global per round, as the coordinator announces it: each device takes its slice.
            payload = agg.announced(global_state)
            bytes_down = num_bytes(payload) * len(picked)
            for i, draw in zip(picked, drop_draws, strict=True):
                client = world.clients[i]
                budget = client.budgets[family]
                plan = plan_for(client, spec, hetero, rnd + 1)
                if draw < client.profile.dropout:  # vanishes mid-round: the server waits to the deadline
                    dropped += 1
                    round_time = world.deadline_s
                    continue
                if budget.round_s > world.deadline_s:  # misses the deadline: its update is not counted
                    late += 1
                    round_time = world.deadline_s
                    continue
                round_time = max(round_time, budget.round_s)
                keep = local_states.get(client.cid, newcomer) if local_keys else None
                jobs.append(
                    ClientJob(
                        client, payload, plan, budget.batch_size, (config.seed, rnd, i), keep_local=keep,
                        round=rnd + 1,
                    )
                )  # fmt: skip
            if late and not jobs and not dropped:
                raise NoTrainingError(
                    f"{method}, round {rnd + 1}: none of the {late} sampled clients can train within the "
                    f"{world.deadline_s:.1f} s round deadline; raise --deadline or lower --local-steps"
                )
            if on_jobs:
                on_jobs(rnd, jobs)
            results = transport.run(spec, jobs)
            local_states.update({r.cid: r.local for r in results if r.local})
            updates = [
                ClientUpdate(
                    r.cid, r.upload, j.client.num_examples, rank=j.plan.rank, meta={"heads": j.plan.heads},
                    examples_seen=r.metrics.examples,
                )
                for r, j in zip(results, jobs, strict=True)
            ]  # fmt: skip
            bytes_up = sum(num_bytes(u.state) for u in updates)
            agg.metrics = {}
            if updates:  # never aggregate from nothing: a round without updates keeps the global
                global_state = server.step(global_state, agg.aggregate(global_state, updates))
            val_accuracy, val_loss = evaluate_global(
                pool, spec, agg, global_state, template, world.val, 0, newcomer
            )
            local_acc = [
                evaluate_global(pool, spec, agg, global_state, template, world.val, 0, local_states[r.cid])[0]
                for r in results
                if r.cid in local_states
            ]
            virtual_time += round_time
            bytes_up_total += bytes_up
            bytes_down_total += bytes_down
            train_losses = [loss for r in results for loss in r.metrics.losses]
            record = {
                "kind": "round",
                "method": method,
                "seed": config.seed,
                "round": rnd + 1,
                "val_accuracy": val_accuracy,
                "val_accuracy_local": float(np.mean(local_acc)) if local_acc else None,
                "val_loss": val_loss,
                "train_loss": float(np.mean(train_losses)) if train_losses else None,
                "participants": len(updates),
                "dropped": dropped,
                "late": late,
                "examples": sum(r.metrics.examples for r in results),
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
            if val_accuracy > best.val_accuracy:
                best = _Best(
                    rnd + 1,
                    val_accuracy,
                    clone_state(global_state),
                    {r.cid: clone_state(local_states[r.cid]) for r in results if r.cid in local_states},
                )
            elif config.patience and rnd + 1 - best.round >= config.patience:
                break
    finally:
        transport.close()
    if not any(r["participants"] for r in history):
        late, dropped = sum(r["late"] for r in history), sum(r["dropped"] for r in history)
        raise NoTrainingError(
            f"{method}: no client update was aggregated in {len(history)} rounds ({late + dropped} "
            f"sampled: {late} missed the {world.deadline_s:.1f} s deadline, {dropped} dropped out); "
            f"raise --deadline or lower --local-steps"
        )
    test = test_record(world, method, pool, spec, agg, template, newcomer, best, history, read_test)
    return MethodRun(method, history, test)


def test_record(
    world: World,
    method: str,
    pool: ReplicaPool,
    spec: AdapterSpec,
    agg: aggregators.Aggregator,
    template: State,
    newcomer: State,
    best: _Best,
    history: list[dict[str, Any]],
    read_test: bool = True,
) -> dict[str, Any]:
    """The one read of the test split: the chosen round's global adapter (and its clients' own)."""
    limit = world.config.eval_examples
    accuracy, loss, local = math.nan, math.nan, []
    if read_test:
        accuracy, loss = evaluate_global(pool, spec, agg, best.state, template, world.test, limit, newcomer)
        local = [
            evaluate_global(pool, spec, agg, best.state, template, world.test, limit, kept)[0]
            for kept in best.local.values()
        ]
    chosen = history[best.round - 1]
    return {
        "kind": "test",
        "method": method,
        "seed": world.config.seed,
        "chosen_round": best.round,
        "rounds_run": len(history),
        "val_accuracy": best.val_accuracy,
        "test_accuracy": accuracy,
        "test_loss": loss,
        "test_accuracy_local": float(np.mean(local)) if local else None,
        "bytes_up_total": chosen.get("bytes_up_total"),
        "bytes_down_total": chosen.get("bytes_down_total"),
        "virtual_time_s": chosen.get("virtual_time_s"),
        "wall_time_s": history[-1]["wall_time_s"],
    }


def evaluate_global(
    pool: ReplicaPool,
    spec: AdapterSpec,
    agg: aggregators.Aggregator,
    global_state: State,
    template: State,
    test: Inputs,
    limit: int,
    keep_local: State | None = None,
) -> tuple[float, float]:
    """Accuracy and loss of the global adapter (with a client's kept tensors) on ``test`` (validation
    every round, the test split once), its batches shared out over the pool's workers.

    A base change the method made (FLoRA, FedEx-LoRA) is applied for the evaluation only. The
    per-batch tallies are summed in batch order: the same numbers with any number of workers.
    """
    view = {**agg.announced(global_state), **(keep_local or {})}
    delta = split_base_delta(view)[1]
    start = start_state(spec, view, template)
    batches = list(test.eval_batches(limit=limit))
    shares = [batches[w :: len(pool)] for w in range(min(len(pool), len(batches)))]

    def score(worker: int, share: list[Batch]) -> list[EvalTally]:
        model = pool.models[worker]
        with applied_base_delta(model, delta):
            load_trainable_state(model, start)
            return batch_tallies(model, share)

    scored = pool.map(score, shares)
    tally = EvalTally()
    for i in range(len(batches)):
        tally.merge(scored[i % len(shares)][i // len(shares)])
    metrics = tally.result()
    return metrics.accuracy, metrics.loss
