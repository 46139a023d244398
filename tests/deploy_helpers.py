"""Helpers for the deployment tests: a tiny task, in-process edge clients and coordinators."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coordinator import aggregators
from coordinator.metrics import MetricsLog
from coordinator.service import RoundService, ServiceConfig
from coordinator.service_mqtt import serve
from coordinator.store import RoundStore
from edge_client.client import EdgeClient, EdgeConfig, Progress, run_device
from edge_client.local_round import LocalPlan
from edge_client.trainer import Batch, EagerTrainer, OptimizerConfig
from export.adapters import attach
from export.data import load_text_dataset, tokenize_cached
from export.models import build_model
from export.spec import AdapterSpec
from export.state import State, trainable_state
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.topics import status_topic
from protocol.wire import GlobalHeader

MODEL, DATASET, MAX_LEN, EXAMPLES, STEPS, BATCH = "tiny-bert", "trec6", 16, 32, 3, 8
NUM_CLASSES = 6
TIMEOUT_S = 120.0


def spec_for(method: str) -> AdapterSpec:
    family = aggregators.get(method).family
    return AdapterSpec(family=family, target_modules=("query", "value"), rank=4, heads=2, seed=0)  # type: ignore[arg-type]


def adapted(spec: AdapterSpec) -> torch.nn.Module:
    base, _ = build_model(MODEL, NUM_CLASSES, seed=0)
    return attach(base, spec)


_TOKENS: dict[str, Any] = {}


def train_split() -> Any:
    if "train" not in _TOKENS:
        _, tokenizer = build_model(MODEL, NUM_CLASSES, seed=0)
        _TOKENS["train"], _ = tokenize_cached(load_text_dataset(DATASET), tokenizer, MAX_LEN)
    return _TOKENS["train"]


def client_ids(n: int) -> tuple[str, ...]:
    return tuple(f"dev{i}" for i in range(n))


def make_service(
    method: str, state_dir: Path, clients: tuple[str, ...], rounds: int = 2, **overrides: Any
) -> RoundService:
    spec = spec_for(method)
    device_keys = overrides.pop("device_keys", None)
    evaluate = overrides.pop("evaluate", None)
    coordinator_key = overrides.pop("coordinator_key", None)
    config = ServiceConfig(
        run="t", method=method, rounds=rounds, min_clients=overrides.pop("min_clients", len(clients)),
        deadline_s=overrides.pop("deadline_s", 60.0), clients=clients, **overrides,
    )  # fmt: skip
    agg = aggregators.create(method, spec, device="cpu")
    return RoundService(
        config, spec, agg, trainable_state(adapted(spec)), RoundStore(state_dir, sync=False),
        MetricsLog(state_dir / "metrics.jsonl"), device_keys=device_keys, evaluate=evaluate,
        coordinator_key=coordinator_key,
    )  # fmt: skip


@dataclass
class DeviceThread:
    """One in-process edge client with its own model, link and worker thread."""

    client: EdgeClient
    link: MqttLink
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    progress: Progress | None = None

    def start(self) -> DeviceThread:
        def main() -> None:
            self.progress = run_device(self.client, self.stop, poll_s=0.1)

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout_s: float = TIMEOUT_S) -> None:
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"{self.client.config.client_id} did not finish"

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
        self.link.close()


def device(
    cid: str,
    index: int,
    method: str,
    port: int,
    *,
    state_file: Path | None = None,
    link_overrides: dict[str, Any] | None = None,
    edge_overrides: dict[str, Any] | None = None,
    eval_examples: int = 0,
    key: bytes | None = None,
    coordinator_key: bytes | None = None,
) -> DeviceThread:
    """A device training on its own slice of the task's examples; with ``eval_examples`` it evaluates
    each global on the next slice (its validation examples)."""
    spec = spec_for(method)
    model = adapted(spec)
    train = train_split()
    indices = list(range(index * EXAMPLES, (index + 1) * EXAMPLES))

    def plan(header: GlobalHeader) -> LocalPlan:
        heads = (index % spec.heads,) if spec.family == "ravan" and index % 2 else None
        return LocalPlan(STEPS, heads=heads)

    def batches(header: GlobalHeader, plan: LocalPlan) -> Iterator[Batch]:
        draw = random.Random(f"{cid}:{header.round}")
        for _ in range(plan.local_steps):
            idx = torch.tensor(draw.sample(indices, BATCH))
            yield {k: getattr(train, k)[idx] for k in ("input_ids", "attention_mask", "labels")}

    link = MqttLink(
        LinkConfig(
            cid, port=port, status_topic=status_topic("t", cid), backoff_max_s=1.0, **(link_overrides or {})
        )
    ).start()
    config = EdgeConfig(
        run="t", client_id=cid, spec=spec, num_examples=EXAMPLES, key=key, coordinator_key=coordinator_key,
        state_file=state_file, **(edge_overrides or {}),
    )  # fmt: skip
    trainer = EagerTrainer(model, OptimizerConfig(name="adamw", lr=2e-3))
    validation = train.subset(
        range(len(train) - (index + 1) * eval_examples, len(train) - index * eval_examples)
    )
    client = EdgeClient(
        config, link, trainer, trainable_state(model), plan, batches,
        eval_batches=(lambda: validation.batches(8)) if eval_examples else None,
    )  # fmt: skip
    return DeviceThread(client, link)


def serve_in_thread(
    service: RoundService, port: int, **link: Any
) -> tuple[threading.Thread, threading.Event]:
    """The coordinator service on its own thread; ``link``: more LinkConfig fields (TLS, password)."""
    stop = threading.Event()
    thread = threading.Thread(
        target=serve,
        args=(service, LinkConfig("coordinator", port=port, backoff_max_s=1.0, **link), stop),
        daemon=True,
    )
    thread.start()
    return thread, stop


def global_of(state_dir: Path) -> State:
    loaded = RoundStore(state_dir).load()
    assert loaded is not None
    return loaded[1]
