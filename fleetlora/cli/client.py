"""``fleetlora client``: the edge client of one device (train each round within its budget, publish)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from fleetlora.cli import CliError, positive_int
from fleetlora.cli._deploy import (
    Task,
    add_broker_arguments,
    add_model_arguments,
    link_config,
    local_data,
    read_secret_key,
    resolve_task,
    task_model,
)

log = logging.getLogger(__name__)

DEFAULT_LR = {"sgd": 0.05, "adamw": 2e-3}  # SGD (momentum 0.9) at the simulator's rate
BACKENDS = ("eager", "executorch")  # edge_client.backends.BACKENDS, without importing torch at start-up

NAME = "client"
HELP = "run one device's edge client: train each sampled round within its budget and publish the update"
ORDER = 30
EXAMPLES = """\
fleetlora client --run demo --id c0 --dataset trec6 --shard 0/3 --profile pixel_8
fleetlora client --run demo --id pi-01 --bundle bundles/r8 --backend executorch --data data/pi-01.jsonl
fleetlora client --run demo --id jetson-01 --bundle bundles/r8 --data my-texts.csv \\
    --broker mqtts://10.0.0.5:8883 --ca pki/ca.crt --password-file pki/clients/jetson-01.password \\
    --key keys/jetson-01.key --coordinator-key pki/clients/coordinator.announce.key --state-file j01.json
fleetlora client --config client.toml   # a folder made by fleetlora flash (run-client.sh does this)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_broker_arguments(p)
    p.add_argument("--id", required=True, help="client id: MQTT client id, topic level, key name")
    p.add_argument(
        "--backend", choices=BACKENDS, default="eager", help="trainer: eager torch, or the bundle's program"
    )
    p.add_argument(
        "--data", default="",
        help="this device's own examples: a .jsonl ({\"text\", \"label\"} a line), a .csv (text,label "
        "columns) or a folder per label; labels are the bundle's names",
    )  # fmt: skip
    p.add_argument("--dataset", default="", help="a built-in data set instead of --data (demos): trec6, ...")
    p.add_argument("--shard", default="0/1", help="with --dataset: this device's IID share of it, K/N")
    p.add_argument("--max-examples", type=int, default=0, help="train on at most this many local examples")
    p.add_argument("--max-len", type=positive_int, help="tokens per example, without --bundle (default 32)")
    p.add_argument("--profile", default="", help="device profile (name or TOML) that sets the budget")
    p.add_argument("--local-steps", type=int, default=0, help="fixed local steps (0 = from the budget)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="largest local batch")
    p.add_argument(
        "--lr",
        type=float,
        help="local learning rate (default: 0.05 with SGD, as the simulator; 2e-3 with AdamW)",
    )
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


def device_planner(args: argparse.Namespace, spec: Any, model: Any) -> Any:
    """This device's :class:`edge_client.planner.DevicePlanner`: ``--profile``'s budget each round."""
    from devices.profiles import load_profile
    from edge_client.budget import ProfileError
    from edge_client.planner import DevicePlanner, model_cost

    try:
        profile = load_profile(args.profile) if args.profile else None
    except ProfileError as e:
        raise CliError(str(e)) from e
    return DevicePlanner(
        spec, args.id, model_cost(model, spec, args.max_len), profile, local_steps=args.local_steps,
        max_batch=args.batch_size,
    )  # fmt: skip


def local_batches(seed: int, client: str, indices: list[int], train: Any) -> Any:
    """The plan's batches: ``plan.batch_size`` of this device's examples a step, a seeded draw per round."""

    def batches(header: Any, plan: Any) -> Any:
        import torch

        draw = random.Random(f"{seed}:{client}:{header.round}")
        for _ in range(plan.local_steps):
            idx = torch.tensor(draw.sample(indices, min(plan.batch_size, len(indices))))
            yield {
                "input_ids": train.input_ids[idx],
                "attention_mask": train.attention_mask[idx],
                "labels": train.labels[idx],
            }

    return batches


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


def resolve_client_task(args: argparse.Namespace) -> tuple[Task, Any]:
    """The task (from the bundle, else the flags) and, with ``--dataset``, the built-in data set,
    whose classes must be the task's."""
    from export.data import DataError, load_text_dataset

    if args.backend == "executorch" and not args.bundle:
        raise CliError("--backend executorch needs --bundle (the training program)")
    if bool(args.data) == bool(args.dataset):
        raise CliError("give --data (this device's examples) or --dataset (a built-in demo set), one of them")
    dataset = None
    if args.dataset:
        try:
            dataset = load_text_dataset(args.dataset)
        except DataError as e:
            raise CliError(str(e)) from e
    task = resolve_task(
        args, seq_len=args.max_len, spec_defaults={"seed": args.seed}, default_model="tiny-bert",
        default_num_classes=len(dataset.classes) if dataset is not None else None,
    )  # fmt: skip
    if task.seq_len == 0:
        task = dataclasses.replace(task, seq_len=32)
    if dataset is not None and (
        len(dataset.classes) != task.num_classes or (task.labels and task.labels != dataset.classes)
    ):
        raise CliError(
            f"--dataset {dataset.name} has the classes {list(dataset.classes)}, the task "
            f"{list(task.labels) or task.num_classes}: use a bundle exported for it, or --data"
        )
    if task.bundle is not None:
        hi = task.bundle.info.batch_max
        if args.backend == "executorch" and args.batch_size > hi:
            raise CliError(f"--batch-size {args.batch_size} exceeds the bundle program's largest batch {hi}")
    return task, dataset


def local_trainer(args: argparse.Namespace, bundle: Any, model: Any) -> Any:
    """The ``--backend`` trainer with ``--optimizer`` (the ExecuTorch runtime offers SGD only)."""
    from edge_client.backends import make_trainer
    from edge_client.trainer import OptimizerConfig

    name = args.optimizer or ("sgd" if args.backend == "executorch" else "adamw")
    if args.backend == "executorch" and name != "sgd":
        raise CliError(f"--backend executorch trains with SGD only, not --optimizer {name}")
    try:
        optimizer = OptimizerConfig(name=name, lr=args.lr or DEFAULT_LR[name])
    except ValueError as e:
        raise CliError(str(e)) from e
    return make_trainer(args.backend, bundle=bundle, model=model, optimizer=optimizer)


def device_data(
    args: argparse.Namespace, task: Task, dataset: Any, tokenizer: Any
) -> tuple[Any, list[int], Any]:
    """``(training split, this device's training indices, validation split)``."""
    from export.data import DataError, tokenize_cached
    from export.local_data import VALIDATION_MAX

    if dataset is None:
        data = local_data(args.data, task, tokenizer)
        print(f"{args.id}: {data.describe()}")
        n = min(len(data.train), args.max_examples) if args.max_examples > 0 else len(data.train)
        return data.train, list(range(n)), data.validation
    try:
        train, test = tokenize_cached(dataset, tokenizer, task.seq_len)
    except DataError as e:
        raise CliError(str(e)) from e
    indices = local_indices(len(train), args.shard, args.seed, args.max_examples)
    return train, indices, test.subset(local_indices(len(test), args.shard, args.seed, VALIDATION_MAX))


def run(args: argparse.Namespace) -> int:
    from edge_client.client import EdgeClient, EdgeConfig, run_device
    from protocol.mqtt_link import MqttLink
    from protocol.topics import status_topic

    task, dataset = resolve_client_task(args)
    args.max_len = task.seq_len
    model, tokenizer = task_model(task)
    print(f"{args.id}: {task.describe()}")
    train, indices, validation = device_data(args, task, dataset, tokenizer)
    planner = device_planner(args, task.spec, model)
    trainer = local_trainer(args, task.bundle, model)
    eval_batch = min(64, task.bundle.info.batch_max) if task.bundle is not None else 64
    config = EdgeConfig(
        run=args.run, client_id=args.id, spec=task.spec, num_examples=len(indices),
        key=read_secret_key(args.key), coordinator_key=read_secret_key(args.coordinator_key),
        state_file=Path(args.state_file) if args.state_file else None, model=task.model,
        num_classes=task.num_classes, report_training=True,
        profile=Path(args.profile).stem if args.profile else None,
    )  # fmt: skip
    link_cfg = link_config(
        args, args.id, status_topic=status_topic(args.run, args.id), max_packet_size=args.max_packet_size,
        connect_jitter_s=args.connect_jitter,
    )  # fmt: skip
    if link_cfg.tls and config.coordinator_key is None:
        log.warning(
            "%s: no --coordinator-key: announcements from the broker are trusted unverified (give the "
            "coordinator's announcement key, e.g. pki/clients/coordinator.announce.key)",
            args.id,
        )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with MqttLink(link_cfg) as link:
        client = EdgeClient(
            config, link, trainer, trainer.get_trainable(), planner.plan,
            local_batches(args.seed, args.id, indices, train),
            eval_batches=lambda: validation.batches(eval_batch),
        )  # fmt: skip
        progress = run_device(client, stop)
        failure = link.failure
    print(
        f"{args.id} ({args.backend}): last round {progress.last_round}, "
        f"outcome {progress.last_outcome or '-'}"
        + (f", missed {progress.missed}" if progress.missed else "")
        + (f", error: {progress.last_error}" if progress.last_error else "")
    )
    if failure is not None:
        raise CliError(f"{args.id}: {failure}")
    return 0
