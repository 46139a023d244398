"""``fleetlora coordinator serve``: the long-running coordinator service over MQTT."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType

from fleetlora.cli import CliError, as_list, non_negative_float, positive_int
from fleetlora.cli._deploy import (
    adapted_model,
    add_broker_arguments,
    add_model_arguments,
    link_config,
    load_spec,
    read_secret_key,
)

NAME = "coordinator"
HELP = "run the coordinator service: rounds, validation, persistence, aggregation (CUDA when present)"
ORDER = 20
EXAMPLES = """\
fleetlora coordinator serve --run demo --method fedit --rounds 5 --clients c0,c1,c2 --min-clients 2
fleetlora coordinator serve --run demo --method ravan --rounds 10 --sample-fraction 0.5 --deadline 120
fleetlora coordinator serve --run demo --method fedit --rounds 5 --clients c0,c1 --clip-norm 5
fleetlora coordinator serve --run demo --method fedit --rounds 3 --clients c0,c1 \\
    --broker mqtts://127.0.0.1:8883 --ca pki/ca.crt --password-file pki/clients/coordinator.password \\
    --keys keys/ --state-dir state/ --metrics state/metrics.jsonl"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser(
        "serve", help="run rounds until the last one is aggregated (resumes after a crash)"
    )
    add_model_arguments(p)
    add_broker_arguments(p)
    p.add_argument("--method", default="fedit", help="aggregation method (default: %(default)s)")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds to run (default: %(default)s)")
    p.add_argument(
        "--min-clients", type=positive_int, default=1, help="quorum to close a round at its deadline"
    )
    p.add_argument(
        "--deadline", type=non_negative_float, default=60.0, help="seconds a round waits for updates"
    )
    p.add_argument("--clients", default="", help="the fleet roster: client ids, comma-separated")
    p.add_argument("--clients-per-round", type=int, default=0, help="sampled from the roster (0 = all)")
    p.add_argument(
        "--sample-fraction", type=float, default=1.0, help="without a roster: fraction drawn per round"
    )
    p.add_argument("--state-dir", default="coordinator-state", help="where rounds are persisted")
    p.add_argument("--metrics", default="", help="JSON-lines metrics file (default: STATE_DIR/metrics.jsonl)")
    p.add_argument("--keys", default="", help="folder of CLIENT.key HMAC keys: updates must be signed")
    p.add_argument("--coordinator-key", default="", help="key file (or env:NAME) signing announcements")
    p.add_argument("--client-id", default="coordinator", help="MQTT client id / username")
    p.add_argument("--no-sync", action="store_true", help="skip fsync (survives kill -9, not a power cut)")
    p.add_argument("--device", default="auto", help="aggregation device: auto (CUDA when present), cpu, cuda")
    p.add_argument("--weighting", choices=["examples", "uniform"], default="examples", help="client weights")
    p.add_argument(
        "--clip-norm", type=non_negative_float, default=0.0,
        help="largest L2 norm of an update's change to the global adapter (0 = no limit)",
    )  # fmt: skip
    p.add_argument(
        "--clip-mode", choices=["scale", "reject"], default="scale",
        help="an update above --clip-norm: scaled down to it, or rejected as 'outsized' (%(default)s)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from coordinator import aggregators
    from coordinator.metrics import MetricsLog
    from coordinator.service import RoundService, ServiceConfig, ServiceError
    from coordinator.service_mqtt import serve
    from coordinator.store import RoundStore, StoreError
    from edge_client.keys import KeyFileError, read_keyring
    from export.state import trainable_state

    if args.method not in aggregators.available():
        raise CliError(f"unknown method {args.method!r}; choose from {', '.join(aggregators.available())}")
    spec = load_spec(args.spec, family=aggregators.get(args.method).family, seed=args.seed)
    try:
        config = ServiceConfig(
            run=args.run, method=args.method, rounds=args.rounds, min_clients=args.min_clients,
            deadline_s=args.deadline, clients=tuple(as_list(args.clients)),
            clients_per_round=args.clients_per_round, sample_fraction=args.sample_fraction, seed=args.seed,
            clip_norm=args.clip_norm, clip_mode=args.clip_mode,
        )  # fmt: skip
        keys = read_keyring(args.keys) if args.keys else None
    except (ServiceError, KeyFileError) as e:
        raise CliError(str(e)) from e
    model, _ = adapted_model(args, spec)
    agg = aggregators.create(args.method, spec, device=args.device, weighting=args.weighting)
    state_dir = Path(args.state_dir)
    metrics = MetricsLog(args.metrics or state_dir / "metrics.jsonl")
    service = RoundService(
        config, spec, agg, trainable_state(model), RoundStore(state_dir, sync=not args.no_sync), metrics,
        device_keys=keys, coordinator_key=read_secret_key(args.coordinator_key),
    )  # fmt: skip
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # finish the batch in hand (persisted, acknowledged), then leave

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve(service, link_config(args, args.client_id), stop)
    except StoreError as e:
        raise CliError(str(e)) from e
    finally:
        metrics.close()
    for record in service.history:
        print(f"round {record['round']}: {record['participants']} updates, rejected {record['rejected']}")
    print("done" if service.finished else f"stopped in round {service.round} (state in {state_dir})")
    return 0
