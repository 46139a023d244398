"""``fleetlora coordinator serve``: the long-running coordinator service over MQTT."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from fleetlora.cli import CliError, as_list, non_negative_float, positive_int
from fleetlora.cli._dashboard import add_serve_arguments, add_status_arguments, start_dashboard, status
from fleetlora.cli._deploy import (
    add_broker_arguments,
    add_model_arguments,
    link_config,
    read_secret_key,
    resolve_task,
    task_model,
)

log = logging.getLogger(__name__)

NAME = "coordinator"
HELP = "run the coordinator service: rounds, validation, persistence, aggregation (CUDA when present)"
ORDER = 20
EXAMPLES = """\
fleetlora coordinator serve --run demo --bundle bundles/r8 --method fedrpca --rounds 5 --clients d1,d2,d3 \\
    --pki pki --keys keys --state-dir state --eval-data data/test.jsonl   # TLS, signed both ways
fleetlora coordinator serve --run demo --bundle bundles/r8 --method ravan --rounds 10 --sample-fraction 0.5
fleetlora coordinator serve --run demo --model tiny-bert --num-classes 6 --method fedit --rounds 5 \\
    --clients c0,c1,c2 --min-clients 2 --clip-norm 5    # a plain local broker, no bundle
fleetlora coordinator serve --run demo --bundle bundles/r8 --rounds 3 --clients c0,c1 \\
    --broker mqtts://10.0.0.5:8883 --ca pki/ca.crt --password-file pki/clients/coordinator.password \\
    --coordinator-key pki/clients/coordinator.announce.key --keys keys/ --state-dir state/
fleetlora coordinator serve --run demo --bundle bundles/r8 --rounds 5 --clients d1,d2 --http 127.0.0.1:8080
    # then open http://127.0.0.1:8080/ (live fleet, round, curves, refusals, adapter download)
fleetlora coordinator status --http http://127.0.0.1:8080      # the same as tables in the terminal
fleetlora coordinator serve --run demo --bundle bundles/r8 --clients d1,d2 --http 0.0.0.0:8080 \\
    --http-token env:DASH_TOKEN    # any other address needs a bearer token (16+ characters)"""


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
    p.add_argument(
        "--pki", default="",
        help="credentials folder of `fleetlora broker init-ca`: sets --ca, --password-file (of --client-id) "
        "and --coordinator-key from it unless given, and the broker address `broker run --dir` recorded",
    )  # fmt: skip
    p.add_argument("--state-dir", default="coordinator-state", help="where rounds are persisted")
    p.add_argument(
        "--keep-globals", type=int, default=0,
        help="keep the global of the last N rounds in the state folder (0 = every round's)",
    )  # fmt: skip
    p.add_argument(
        "--eval-data", default="",
        help="held-out examples (the --data formats of fleetlora client) each new global is evaluated on",
    )  # fmt: skip
    p.add_argument("--metrics", default="", help="JSON-lines metrics file (default: STATE_DIR/metrics.jsonl)")
    p.add_argument("--keys", default="", help="folder of CLIENT.key HMAC keys: updates must be signed")
    p.add_argument("--coordinator-key", default="", help="key file (or env:NAME) signing announcements")
    p.add_argument("--client-id", default="coordinator", help="MQTT client id / username")
    p.add_argument("--no-sync", action="store_true", help="skip fsync (survives kill -9, not a power cut)")
    p.add_argument("--device", default="auto", help="aggregation device: auto (CUDA when present), cpu, cuda")
    p.add_argument("--weighting", choices=["examples", "uniform"], default="examples", help="client weights")
    p.add_argument(
        "--method-params", default="{}",
        help='the method\'s options, JSON as in fleetlora sim, e.g. \'{"fedrpca": {"beta": 4}}\'',
    )  # fmt: skip
    p.add_argument(
        "--clip-norm", type=non_negative_float, default=0.0,
        help="largest L2 norm of an update's change to the global adapter (0 = no limit)",
    )  # fmt: skip
    p.add_argument(
        "--clip-mode", choices=["scale", "reject"], default="scale",
        help="an update above --clip-norm: scaled down to it, or rejected as 'outsized' (%(default)s)",
    )  # fmt: skip
    add_serve_arguments(p)
    status = actions.add_parser(
        "status", help="print a serving coordinator's dashboard (--http) as tables: round, fleet, curves"
    )
    add_status_arguments(status)


def apply_pki(args: argparse.Namespace) -> None:
    """``--pki DIR``: the CA, the coordinator's password and announcement key in DIR, unless given."""
    if not args.pki:
        return
    from broker.credentials import CredentialPaths

    paths = CredentialPaths(Path(args.pki))
    wanted = {
        "ca": paths.ca_cert, "password_file": paths.password_of(args.client_id),
        "coordinator_key": paths.announce_key,
    }  # fmt: skip
    for dest, path in wanted.items():
        if getattr(args, dest):
            continue
        if not path.is_file():
            raise CliError(
                f"--pki {args.pki}: {path} not found; enrolling the first device creates the coordinator's "
                f"credentials (fleetlora devices enroll NAME --pki {args.pki})"
            )
        setattr(args, dest, str(path))


def evaluator(args: argparse.Namespace, task: Any, tokenizer: Any, model: Any, agg: Any) -> Any:
    """The ``--eval-data`` evaluator of each new global, or None."""
    if not args.eval_data:
        return None
    if task.bundle is None or not task.labels:
        raise CliError("--eval-data needs --bundle with label names (its sequence length and labels)")
    from coordinator.evaluation import GlobalEvaluator
    from export.data import DataError
    from export.local_data import load_examples
    from export.state import trainable_state

    try:
        examples = load_examples(args.eval_data, tokenizer, task.seq_len, task.labels)
    except DataError as e:
        raise CliError(str(e)) from e
    print(f"evaluating every new global on {len(examples)} examples of {args.eval_data}")
    return GlobalEvaluator(model, task.spec, agg, trainable_state(model), examples)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--method-params`` (JSON, or a run config's table): ``{METHOD: {option: value}}`` for --method."""
    from coordinator import aggregators

    try:
        raw = args.method_params
        params = raw if isinstance(raw, dict) else json.loads(raw)
    except ValueError as e:
        raise CliError(f"--method-params is not JSON: {e}") from e
    if not isinstance(params, dict) or any(not isinstance(v, dict) for v in params.values()):
        raise CliError(f'--method-params must map a method to its options, e.g. {{"{args.method}": {{...}}}}')
    other = sorted(set(params) - {args.method})
    if other:
        raise CliError(f"--method-params names {other[0]!r}, but --method is {args.method!r}")
    own = params.get(args.method, {})
    try:
        aggregators.method_options(args.method, own)
    except aggregators.OptionsError as e:
        raise CliError(f"--method-params: {e}") from e
    return own


def run(args: argparse.Namespace) -> int:
    if args.action == "status":
        return status(args)
    from coordinator import aggregators
    from coordinator.metrics import MetricsLog
    from coordinator.service import RoundService, ServiceConfig, ServiceError
    from coordinator.service_mqtt import LinkFailed, serve
    from coordinator.store import RoundStore, StoreError
    from export.state import trainable_state
    from protocol.keys import KeyFileError, read_keyring

    if args.method not in aggregators.available():
        raise CliError(f"unknown method {args.method!r}; choose from {', '.join(aggregators.available())}")
    options = method_options(args)
    family = aggregators.get(args.method).family
    task = resolve_task(args, seq_len=None, spec_defaults={"family": family, "seed": args.seed})
    if task.spec.family != family:
        source = task.bundle.path if task.bundle else "--spec"
        raise CliError(f"--method {args.method} trains {family} adapters; {source} has {task.spec.family}")
    apply_pki(args)
    try:
        config = ServiceConfig(
            run=args.run, method=args.method, rounds=args.rounds, min_clients=args.min_clients,
            deadline_s=args.deadline, clients=tuple(as_list(args.clients)),
            clients_per_round=args.clients_per_round, sample_fraction=args.sample_fraction, seed=args.seed,
            clip_norm=args.clip_norm, clip_mode=args.clip_mode,
            model=task.model, num_classes=task.num_classes,
            labels=task.labels, seq_len=task.seq_len, model_seed=task.model_seed,
        )  # fmt: skip
        keys = read_keyring(args.keys) if args.keys else None
        store = RoundStore(Path(args.state_dir), sync=not args.no_sync, keep_globals=args.keep_globals)
    except (ServiceError, KeyFileError, StoreError) as e:
        raise CliError(str(e)) from e
    link = link_config(args, args.client_id)
    coordinator_key = read_secret_key(args.coordinator_key)
    if link.tls and coordinator_key is None:
        log.warning("no --coordinator-key: announcements go out unsigned and devices cannot verify them")
    print(task.describe())
    model, tokenizer = task_model(task)
    agg = aggregators.create(args.method, task.spec, device=args.device, weighting=args.weighting, **options)
    metrics = MetricsLog(args.metrics or store.root / "metrics.jsonl")
    service = RoundService(
        config, task.spec, agg, trainable_state(model), store, metrics, device_keys=keys,
        coordinator_key=coordinator_key, evaluate=evaluator(args, task, tokenizer, model, agg),
    )  # fmt: skip
    dashboard = start_dashboard(args, service, store)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # finish the batch in hand (persisted, acknowledged), then leave

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve(service, link, stop)
    except (StoreError, LinkFailed) as e:
        raise CliError(str(e)) from e
    finally:
        if dashboard is not None:
            dashboard.close()
        metrics.close()
    if not service.finished:
        print(f"stopped in round {service.round} (state in {store.root}; serve again to resume)")
        return 0
    print(f"done: {args.rounds} rounds; the global of every round is in {store.root}")
    print(f"take the model out with: fleetlora export-adapter --state {store.root} --out my-adapter")
    return 0
