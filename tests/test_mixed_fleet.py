"""A mixed fleet over a real mosquitto: a Jetson, a mid-range phone and a low-end phone, each planning
its own round from its profile with the one planner, against the real coordinator service.

HetLoRA and FlexLoRA offer devices lower LoRA ranks in the announcement (``rank_choices``); Ravan
lets each device train the heads its budget affords. The uploads that cross the broker must carry
the ranks / heads the profiles afford, different by profile, and equal to what the simulator plans
for the same profiles and deadline (:func:`sim.engine.plan_for`).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_helpers import MAX_LEN, MODEL, NUM_CLASSES, DeviceThread, serve_in_thread, train_split

from broker.mosquitto import Mosquitto
from coordinator import aggregators
from coordinator.metrics import MetricsLog
from coordinator.service import RoundService, ServiceConfig
from coordinator.store import RoundStore
from devices.profiles import load_profile
from edge_client.client import EdgeClient, EdgeConfig
from edge_client.local_round import LocalPlan
from edge_client.planner import DevicePlanner, model_cost
from edge_client.trainer import Batch, EagerTrainer, OptimizerConfig
from export.adapters import attach
from export.models import build_model
from export.spec import AdapterSpec
from export.state import LORA_A, RAVAN_H, trainable_state
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.topics import status_topic, up_subscription
from protocol.wire import GlobalHeader, unpack
from sim.config import SimConfig
from sim.engine import plan_for
from sim.fleet import VirtualClient, client_budgets
from sim.fleet import model_cost as sim_model_cost

pytestmark = pytest.mark.mqtt

# A Jetson affords the full rank and every head; the phones a fraction by their throughput.
FLEET = {"jetson": "jetson_orin_nano_8gb", "phone": "pixel_8", "lowend": "galaxy_a14"}
RANK, HEADS, STEPS, BATCH, EXAMPLES = 8, 8, 2, 8, 32
DEADLINE_S = 60.0


def spec_of(method: str) -> AdapterSpec:
    family = aggregators.get(method).family
    return AdapterSpec(family=family, target_modules=("query", "value"), rank=RANK, heads=HEADS, seed=0)  # type: ignore[arg-type]


def sim_plans(method: str, spec: AdapterSpec, deadline_s: float) -> dict[str, LocalPlan]:
    """What the simulator plans for round 1 of the same devices, spec and deadline."""
    config = SimConfig(
        model=MODEL, target_modules=spec.target_modules, rank=RANK, heads=HEADS, max_len=MAX_LEN,
        local_steps=STEPS, batch_size=BATCH, layers=(),
    )  # fmt: skip
    base, _ = build_model(MODEL, NUM_CLASSES, seed=0)
    enc = base.encoder.config
    cost = sim_model_cost(
        config, sum(p.numel() for p in base.parameters()), enc.hidden_size, enc.num_hidden_layers
    )
    hetero = aggregators.get(method).heterogeneous_ranks
    plans = {}
    for cid, name in FLEET.items():
        budgets = client_budgets(config, load_profile(name), cost, deadline_s)
        client = VirtualClient(cid, load_profile(name), np.zeros(0, dtype=np.int64), budgets)
        plans[cid] = plan_for(client, spec, hetero, 1)
    return plans


def fleet_device(
    cid: str, index: int, spec: AdapterSpec, port: int, planned: dict[str, LocalPlan]
) -> DeviceThread:
    """A device of the fleet: its profile's planner (as ``fleetlora client --profile`` wires it)."""
    model = attach(build_model(MODEL, NUM_CLASSES, seed=0)[0], spec)
    planner = DevicePlanner(
        spec,
        cid,
        model_cost(model, spec, MAX_LEN),
        load_profile(FLEET[cid]),
        local_steps=STEPS,
        max_batch=BATCH,
    )
    train = train_split()
    indices = list(range(index * EXAMPLES, (index + 1) * EXAMPLES))

    def plan(header: GlobalHeader) -> LocalPlan:
        planned[cid] = planner.plan(header)
        return planned[cid]

    def batches(header: GlobalHeader, plan: LocalPlan) -> Iterator[Batch]:
        draw = random.Random(f"{cid}:{header.round}")
        for _ in range(plan.local_steps):
            idx = torch.tensor(draw.sample(indices, plan.batch_size or BATCH))
            yield {k: getattr(train, k)[idx] for k in ("input_ids", "attention_mask", "labels")}

    link = MqttLink(
        LinkConfig(cid, port=port, status_topic=status_topic("t", cid), backoff_max_s=1.0)
    ).start()
    config = EdgeConfig(run="t", client_id=cid, spec=spec, num_examples=EXAMPLES)
    trainer = EagerTrainer(model, OptimizerConfig(name="sgd", lr=0.05))
    return DeviceThread(EdgeClient(config, link, trainer, trainable_state(model), plan, batches), link)


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "ravan"])
def test_a_mixed_fleet_trains_what_each_profile_affords(
    mosquitto: Mosquitto, tmp_path: Path, method: str
) -> None:
    spec = spec_of(method)
    ids = tuple(FLEET)
    config = ServiceConfig(
        run="t", method=method, rounds=1, min_clients=3, deadline_s=DEADLINE_S, clients=ids
    )
    agg = aggregators.create(method, spec, device="cpu")
    initial = trainable_state(attach(build_model(MODEL, NUM_CLASSES, seed=0)[0], spec))
    state_dir = tmp_path / "state"
    service = RoundService(
        config, spec, agg, initial, RoundStore(state_dir, sync=False), MetricsLog(state_dir / "metrics.jsonl")
    )
    uploads: dict[str, tuple[dict, dict]] = {}
    seen = threading.Condition()

    def on_upload(topic: str, payload: bytes) -> None:
        header, blob = unpack(payload)
        from safetensors.torch import load

        with seen:
            uploads[header["client"]] = (header, load(blob))
            seen.notify_all()

    watcher = MqttLink(LinkConfig("watcher", port=mosquitto.port)).start()
    watcher.subscribe(up_subscription("t"), on_upload)
    assert watcher.wait_subscribed(30)
    planned: dict[str, LocalPlan] = {}
    thread, stop = serve_in_thread(service, mosquitto.port)
    devices = [fleet_device(cid, i, spec, mosquitto.port, planned).start() for i, cid in enumerate(ids)]
    try:
        thread.join(120)
        assert service.finished, "the round did not close"
        with seen:
            assert seen.wait_for(lambda: len(uploads) == len(ids), 30)
    finally:
        stop.set()
        for d in devices:
            d.close()
        watcher.close()
    expected = sim_plans(method, spec, DEADLINE_S)
    if spec.family == "lora":
        sent = {cid: h["rank"] for cid, (h, _) in uploads.items()}
        shapes = {
            cid: {t.shape[0] for k, t in s.items() if k.endswith(LORA_A)} for cid, (_, s) in uploads.items()
        }
        assert shapes == {cid: {r} for cid, r in sent.items()}  # the tensors are of the announced rank
        assert sent == {cid: p.rank or RANK for cid, p in expected.items()}
    else:
        sent = {
            cid: tuple(h["heads"]) if h["heads"] is not None else tuple(range(HEADS))
            for cid, (h, _) in uploads.items()
        }
        shapes = {
            cid: {t.shape[0] for k, t in s.items() if k.endswith(RAVAN_H)} for cid, (_, s) in uploads.items()
        }
        assert shapes == {cid: {len(h)} for cid, h in sent.items()}
        assert sent == {cid: p.heads or tuple(range(HEADS)) for cid, p in expected.items()}
    assert len(set(sent.values())) == len(ids), f"every profile trains its own share: {sent}"
    assert planned == expected  # steps, batch, rank and heads: the device's plan is the simulator's
    record = service.history[0]
    assert record["participants"] == len(ids)
    shares = record["ranks"] if spec.family == "lora" else record["heads"]  # the round's record says so too
    assert dict(zip(record["clients"], shares, strict=True)) == {
        c: len(s) if isinstance(s, tuple) else s for c, s in sent.items()
    }


def test_fleetlora_coordinator_serve_and_client_profiles_train_their_ranks(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The same through the commands a user runs: ``fleetlora coordinator serve --method hetlora`` and
    three ``fleetlora client --profile ...`` processes; the round's record names each one's rank."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    spec = spec_of("hetlora")
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    task = ["--model", "tiny-bert", "--num-classes", str(NUM_CLASSES), "--spec", spec.to_json()]
    serve = [
        sys.executable, "-m", "fleetlora", "coordinator", "serve", "--run", "t", "--method", "hetlora",
        "--rounds", "1", "--clients", ",".join(FLEET), "--min-clients", str(len(FLEET)),
        "--deadline", str(DEADLINE_S), *task, "--state-dir", str(tmp_path / "state"), "--broker", broker,
        "--device", "cpu",
    ]  # fmt: skip
    coordinator = subprocess.Popen(serve, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    clients = []
    for i, (cid, name) in enumerate(FLEET.items()):
        command = [
            sys.executable, "-m", "fleetlora", "client", "--run", "t", "--id", cid, "--dataset", "trec6",
            "--shard", f"{i}/{len(FLEET)}", "--max-examples", str(EXAMPLES), "--profile", name, *task,
            "--max-len", str(MAX_LEN), "--local-steps", str(STEPS), "--batch-size", str(BATCH),
            "--optimizer", "sgd", "--broker", broker, "--connect-jitter", "0",
        ]  # fmt: skip
        clients.append(
            subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    try:
        out, _ = coordinator.communicate(timeout=300)  # it exits after its one round
        assert coordinator.returncode == 0, out.decode()[-3000:]
        for c in clients:
            said = c.communicate(timeout=60)[0]  # each leaves at the final announcement
            assert c.returncode == 0, said.decode()[-2000:]
    finally:
        for p in (coordinator, *clients):
            if p.poll() is None:
                p.kill()
    records = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["event"] == "round"]
    expected = sim_plans("hetlora", spec, DEADLINE_S)
    assert dict(zip(record["clients"], record["ranks"], strict=True)) == {
        cid: p.rank or RANK for cid, p in expected.items()
    }
    assert len(set(record["ranks"])) == len(FLEET)
