"""``fleetlora client``: the edge client of one device (train each round within its budget, publish)."""

from __future__ import annotations

import argparse
import random
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fleetlora.cli import CliError, positive_int
from fleetlora.cli._deploy import (
    adapted_model,
    add_broker_arguments,
    add_model_arguments,
    link_config,
    load_spec,
    read_secret_key,
)

BACKENDS = ("eager", "executorch")  # edge_client.backends.BACKENDS, without importing torch at start-up

NAME = "client"
HELP = "run one device's edge client: train each sampled round within its budget and publish the update"
ORDER = 30
EXAMPLES = """\
fleetlora client --run demo --id c0 --dataset trec6 --shard 0/3 --profile pixel_8
fleetlora client --run demo --id jetson-01 --broker mqtts://10.0.0.5:8883 --ca pki/ca.crt \\
    --password-file pki/clients/jetson-01.password --key keys/jetson-01.key --state-file jetson-01.json
fleetlora client --run demo --id pi-01 --bundle bundles/minilm-lora --backend executorch --dataset trec6
fleetlora client --config client.toml   # a folder made by fleetlora flash (run-client.sh does this)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_broker_arguments(p)
    p.add_argument("--id", required=True, help="client id: MQTT client id, topic level, key name")
    p.add_argument(
        "--bundle", default="", help="bundle folder: its model, classes, spec and seq len replace those flags"
    )
    p.add_argument(
        "--backend", choices=BACKENDS, default="eager", help="trainer: eager torch, or the bundle's program"
    )
    p.add_argument("--dataset", default="trec6", help="local data set (default: %(default)s)")
    p.add_argument("--shard", default="0/1", help="this device's IID share of the data set: K/N")
    p.add_argument("--max-examples", type=int, default=0, help="keep at most this many local examples")
    p.add_argument("--max-len", type=positive_int, default=32, help="tokens per example")
    p.add_argument("--profile", default="", help="device profile (name or TOML) that sets the budget")
    p.add_argument("--local-steps", type=int, default=0, help="fixed local steps (0 = from the budget)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="largest local batch")
    p.add_argument("--lr", type=float, default=2e-3, help="local learning rate")
    p.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        help="local optimizer (default: executorch sgd, eager adamw)",
    )
    p.add_argument("--key", default="", help="this device's HMAC key: a file or env:NAME")
    p.add_argument("--coordinator-key", default="", help="key verifying announcements: a file or env:NAME")
    p.add_argument("--state-file", default="", help="progress file: restarts neither retrain nor skip rounds")
    p.add_argument("--max-packet-size", type=positive_int, default=16 * 1024 * 1024, help="bytes per packet")
    p.add_argument("--connect-jitter", type=float, default=2.0, help="random delay before connecting (s)")


class DevicePlanner:
    """Each round's plan from the device profile (or fixed steps) and the time left to the deadline."""

    def __init__(self, args: argparse.Namespace, spec: Any, model: Any, indices: Any, train: Any) -> None:
        from edge_client.plan_table import model_cost

        self.args, self.spec, self.indices, self.train = args, spec, indices, train
        self.profile = None
        if args.profile:
            from devices.profiles import load_profile
            from edge_client.budget import ProfileError

            try:
                self.profile = load_profile(args.profile)
            except ProfileError as e:
                raise CliError(str(e)) from e
        self.cost = model_cost(model, spec, args.max_len)
        self.batch_size = args.batch_size

    def plan(self, header: Any) -> Any:
        # The rules: edge_client.plan_table (a native client reads them as the table flash writes).
        from edge_client.budget import compute_budget
        from edge_client.local_round import LocalPlan
        from edge_client.plan_table import device_policy, draw_heads

        steps, heads_n = self.args.local_steps or 5, self.spec.heads
        if self.profile is not None:
            policy = device_policy(
                self.spec, local_steps=self.args.local_steps, max_batch=self.args.batch_size,
                target_round_s=header.deadline - time.time(),
            )  # fmt: skip
            budget = compute_budget(self.profile, self.cost, policy)
            steps, heads_n, self.batch_size = budget.local_steps, budget.heads, budget.batch_size
            steps = self.args.local_steps or steps
        heads = None
        if self.spec.family == "ravan" and heads_n < self.spec.heads:
            heads = draw_heads(self.args.id, header.round, self.spec.heads, heads_n)
        return LocalPlan(steps, heads=heads)

    def batches(self, header: Any, plan: Any) -> Any:
        import torch

        draw = random.Random(f"{self.args.seed}:{self.args.id}:{header.round}")
        for _ in range(plan.local_steps):
            idx = torch.tensor(draw.sample(self.indices, min(self.batch_size, len(self.indices))))
            yield {
                "input_ids": self.train.input_ids[idx],
                "attention_mask": self.train.attention_mask[idx],
                "labels": self.train.labels[idx],
            }


def local_indices(n: int, shard: str, seed: int, limit: int) -> list[int]:
    """This device's IID share ``K/N`` of ``n`` examples (a seeded permutation), at most ``limit``."""
    try:
        k, total = (int(x) for x in shard.split("/"))
    except ValueError:
        raise CliError(f"--shard must be K/N, got {shard!r}") from None
    if not 0 <= k < total:
        raise CliError(f"--shard K/N needs 0 <= K < N, got {shard!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    mine = order[k::total]
    return mine[:limit] if limit > 0 else mine


def open_bundle(args: argparse.Namespace) -> Any:
    """The ``--bundle`` (verified against its manifest), or None; checks it against the other flags."""
    if not args.bundle:
        if args.backend == "executorch":
            raise CliError("--backend executorch needs --bundle (the training program)")
        return None
    from export.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        raise CliError(str(e)) from e
    if args.spec != "{}":
        raise CliError("--spec conflicts with --bundle: the bundle fixes the adapter spec")
    hi = bundle.info.batch_max
    if args.backend == "executorch" and args.batch_size > hi:
        raise CliError(f"--batch-size {args.batch_size} exceeds the bundle program's largest batch {hi}")
    return bundle


def local_model(args: argparse.Namespace, bundle: Any) -> tuple[Any, Any, Any]:
    """``(spec, adapted torch model, tokenizer)``: from the bundle when given, else from the flags.

    The torch model trains with ``--backend eager`` and prices the budget with either backend.
    """
    if bundle is None:
        spec = load_spec(args.spec, seed=args.seed)
        model, tokenizer = adapted_model(args, spec)
        return spec, model, tokenizer
    from export.adapters import attach
    from export.models import ModelError, build_model

    info = bundle.info
    args.model, args.num_classes, args.max_len = info.model, info.num_classes, info.seq_len
    try:
        base, tokenizer = build_model(info.model, info.num_classes, seed=info.model_seed)
    except ModelError as e:
        raise CliError(str(e)) from e
    print(
        f"{args.id}: bundle {bundle.path}: {info.model}, {info.num_classes} classes, seq len {info.seq_len}"
    )
    return bundle.spec, attach(base, bundle.spec), tokenizer


def local_trainer(args: argparse.Namespace, bundle: Any, model: Any) -> Any:
    """The ``--backend`` trainer with ``--optimizer`` (the ExecuTorch runtime offers SGD only)."""
    from edge_client.backends import make_trainer
    from edge_client.trainer import OptimizerConfig

    name = args.optimizer or ("sgd" if args.backend == "executorch" else "adamw")
    if args.backend == "executorch" and name != "sgd":
        raise CliError(f"--backend executorch trains with SGD only, not --optimizer {name}")
    try:
        optimizer = OptimizerConfig(name=name, lr=args.lr)
    except ValueError as e:
        raise CliError(str(e)) from e
    return make_trainer(args.backend, bundle=bundle, model=model, optimizer=optimizer)


def run(args: argparse.Namespace) -> int:
    from edge_client.client import EdgeClient, EdgeConfig, run_device
    from edge_client.mqtt_link import MqttLink
    from edge_client.topics import status_topic
    from export.data import DataError, load_text_dataset, tokenize_cached

    bundle = open_bundle(args)
    spec, model, tokenizer = local_model(args, bundle)
    try:
        dataset = load_text_dataset(args.dataset)
        train, _ = tokenize_cached(dataset, tokenizer, args.max_len)
    except DataError as e:
        raise CliError(str(e)) from e
    indices = local_indices(len(train), args.shard, args.seed, args.max_examples)
    planner = DevicePlanner(args, spec, model, indices, train)
    trainer = local_trainer(args, bundle, model)
    config = EdgeConfig(
        run=args.run, client_id=args.id, spec=spec, num_examples=len(indices), key=read_secret_key(args.key),
        coordinator_key=read_secret_key(args.coordinator_key),
        state_file=Path(args.state_file) if args.state_file else None,
    )  # fmt: skip
    link_cfg = link_config(
        args, args.id, status_topic=status_topic(args.run, args.id), max_packet_size=args.max_packet_size,
        connect_jitter_s=args.connect_jitter,
    )  # fmt: skip
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with MqttLink(link_cfg) as link:
        client = EdgeClient(config, link, trainer, trainer.get_trainable(), planner.plan, planner.batches)
        progress = run_device(client, stop)
    print(
        f"{args.id} ({args.backend}): last round {progress.last_round}, "
        f"outcome {progress.last_outcome or '-'}"
        + (f", missed {progress.missed}" if progress.missed else "")
        + (f", error: {progress.last_error}" if progress.last_error else "")
    )
    return 0
