"""``fleetlora sim``: run an emulated fleet on a real model and real data, compare methods, draw it."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from fleetlora.cli import CliError, DeprecatedAlias, as_list, non_negative_float, positive_int

NAME = "sim"
ORDER = 10
HELP = "emulate a fleet on one machine and compare aggregation methods"
EXAMPLES = """fleetlora sim                  # MiniLM + Reuters-R8, 20 clients, fedit/fedrpca/flora_na/ravan
fleetlora sim --method fedit,ravan --rounds 5 --clients 50 --alpha 0.1
fleetlora sim --dataset trec6 --partition iid --local-steps 5 --out runs/trec
fleetlora sim --method all --config experiment.toml   # TOML keys match the flags
fleetlora sim --transport ray --ray-actors 4    # clients spread over Ray actors (same numbers)
fleetlora sim --method fedit,fedrpca --seeds 0,1,2,3,4   # mean +- std, paired differences with 95% CI
fleetlora sim --config runs/tune/tuned.toml     # the settings `fleetlora tune` chose on validation
fleetlora sim --method fedit --layers '' --batched on   # adapters on every block, clients batched"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sim.config import SimConfig

    d = SimConfig()
    p.add_argument(
        "--method",
        default=",".join(d.methods),
        help="method(s), comma-separated, or 'all' (default: %(default)s)",
    )
    p.add_argument("--model", default=d.model, help="registered model (default: %(default)s)")
    p.add_argument("--dataset", default=d.dataset, help="reuters8 | 20news | trec6 (default: %(default)s)")
    p.add_argument(
        "--clients", type=positive_int, default=d.clients, help="virtual clients (default: %(default)s)"
    )
    p.add_argument(
        "--clients-per-round", type=positive_int, default=d.clients_per_round, help="sampled each round"
    )
    p.add_argument(
        "--rounds", type=positive_int, default=d.rounds, help="federated rounds (default: %(default)s)"
    )
    p.add_argument(
        "--partition", choices=["dirichlet", "iid"], default=d.partition, help="label split across clients"
    )
    p.add_argument(
        "--alpha", type=non_negative_float, default=d.alpha, help="Dirichlet alpha (smaller = more skew)"
    )
    p.add_argument(
        "--device-mix", default=d.device_mix, help="device mix from devices/mixes.toml (default: %(default)s)"
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=d.local_steps,
        help="fixed local steps; 0 = from each device's budget",
    )
    p.add_argument(
        "--max-steps", type=positive_int, default=d.max_steps, help="most local steps a budget may grant"
    )
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="largest local batch")
    p.add_argument(
        "--lr", type=non_negative_float, default=d.lr, help="local learning rate (default: %(default)s)"
    )
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=d.optimizer, help="local optimizer")
    p.add_argument(
        "--momentum",
        type=non_negative_float,
        default=d.momentum,
        help="local SGD momentum (default: %(default)s)",
    )
    p.add_argument(
        "--server-lr",
        type=non_negative_float,
        default=d.server_lr,
        help="server step on each round's aggregate (FedAvgM; 1 = the aggregate itself)",
    )
    p.add_argument(
        "--server-momentum",
        type=non_negative_float,
        default=d.server_momentum,
        help="server momentum (FedAvgM)",
    )
    p.add_argument(
        "--rank", type=positive_int, default=d.rank, help="LoRA rank; Ravan heads match its budget"
    )
    p.add_argument("--heads", type=positive_int, default=d.heads, help="Ravan heads (default: %(default)s)")
    p.add_argument(
        "--lora-alpha", type=non_negative_float, default=d.lora_alpha, help="LoRA alpha (scale alpha/r)"
    )
    p.add_argument(
        "--target-modules",
        default=",".join(d.target_modules),
        help="adapted linear layers (default: %(default)s)",
    )
    p.add_argument(
        "--weighting",
        choices=["examples", "work", "uniform"],
        default=d.weighting,
        help="client weights: local examples, examples processed this round (work), or equal",
    )
    p.add_argument(
        "--layers", default=",".join(map(str, d.layers)), help="adapted blocks, e.g. 4,5 ('' = all)"
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=d.max_len,
        help="tokens per example; 0 = the training split's median, rounded up to a multiple of 32, "
        "at most --max-len-cap",
    )
    p.add_argument(
        "--max-len-cap",
        type=positive_int,
        default=d.max_len_cap,
        help="the most tokens --max-len 0 may choose",
    )
    p.add_argument(
        "--deadline",
        type=non_negative_float,
        default=d.deadline_s,
        help="virtual round deadline in s (0 = auto)",
    )
    p.add_argument(
        "--eval-examples",
        type=int,
        default=d.eval_examples,
        help="test examples read (once, for the round validation chose); 0 = the whole test split",
    )
    p.add_argument(
        "--val-fraction",
        type=non_negative_float,
        default=d.val_fraction,
        help="share of the training split held out for validation (default: %(default)s)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop after this many rounds without better validation accuracy (0 = run every round)",
    )
    p.add_argument(
        "--seeds", default="", help="several seeds, e.g. 0,1,2: mean +- std and paired differences"
    )
    p.add_argument(
        "--centralized",
        action=argparse.BooleanOptionalAction,
        default=d.centralized,
        help="add the centralized reference rows (same adapter on the pooled data)",
    )
    p.add_argument(
        "--centralized-max-epochs",
        type=non_negative_float,
        default=d.centralized_max_epochs,
        help="how far the reference trains past the federated budget (epochs)",
    )
    p.add_argument(
        "--transport", choices=["inproc", "mqtt", "ray"], default=d.transport, help="how clients are reached"
    )
    p.add_argument(
        "--backend", dest="transport", choices=["inproc", "mqtt", "ray"], action=DeprecatedAlias,
        use="--transport", why="--backend is the trainer in fleetlora client; here the trainer is --trainer",
    )  # fmt: skip
    p.add_argument("--broker", default="", help="mqtt://host:port of an external broker (default: embedded)")
    p.add_argument(
        "--ray-address",
        default=d.ray_address,
        help="ray: 'auto' or host:port joins a running cluster (default: a private one on 127.0.0.1)",
    )
    p.add_argument(
        "--ray-actors",
        type=int,
        default=d.ray_actors,
        help="ray: actors, each holding the model once (0 = one per CPU)",
    )
    p.add_argument(
        "--trainer", choices=["eager", "executorch"], default=d.trainer, help="client trainer backend"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch threads; 0 = the cores not already busy (printed at start)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="clients trained at once, each on its own thread and model copy with one torch thread; "
        "0 = one per core (printed at start)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=d.device,
        help="where clients train and rounds are scored; auto = cuda when torch sees one (printed)",
    )
    p.add_argument(
        "--batched",
        choices=["auto", "on", "off"],
        default=d.batched,
        help="train a round's clients as one batch; auto = on a GPU",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed: the same seed repeats the numbers exactly")
    p.add_argument("--out", default=d.out, help="run folder (default: %(default)s)")
    p.add_argument("--method-params", default="{}", help='JSON per method, e.g. \'{"fedrpca": {"beta": 2}}\'')


def config_from_args(args: argparse.Namespace) -> object:
    from coordinator import aggregators
    from sim.config import ConfigError, SimConfig

    methods = as_list(args.method)
    if methods == ["all"]:
        methods = aggregators.available()
    unknown = [m for m in methods if m not in aggregators.available()]
    if unknown:
        raise CliError(
            f"unknown method(s) {unknown}; choose from {', '.join(aggregators.available())} or 'all'"
        )
    try:
        params = (
            args.method_params if isinstance(args.method_params, dict) else json.loads(args.method_params)
        )
        layers = tuple(int(x) for x in as_list(args.layers)) if args.layers != "" else ()
        special = {
            "methods": tuple(methods),
            "layers": layers,
            "target_modules": tuple(as_list(args.target_modules)),
            "deadline_s": args.deadline,
            "method_params": params,
            "seeds": tuple(int(x) for x in as_list(args.seeds)),
        }
        # every other config field has a flag of the same name
        plain = {f.name: getattr(args, f.name) for f in fields(SimConfig) if f.name not in special}
        return SimConfig(**plain, **special)
    except (ConfigError, ValueError) as e:
        raise CliError(str(e)) from e


def device_line(config: object) -> str:
    """The device and batching choice, printed at start (``--device cuda`` without one: a clear error)."""
    from sim.engine import wants_batched, world_workers
    from sim.threads import choose_device
    from sim.trainers import world_device

    try:
        _, why = choose_device(config.device)  # type: ignore[attr-defined]
    except ValueError as e:
        raise CliError(str(e)) from e
    device = world_device(config)  # type: ignore[arg-type]
    batched = "on" if wants_batched(config, device) else "off"  # type: ignore[arg-type]
    workers, how = world_workers(config, device)  # type: ignore[arg-type]
    return (
        f"device: {device} ({why}); batched clients: {batched} (--batched {config.batched}); "  # type: ignore[attr-defined]
        f"client workers: {workers} ({how}{', one torch thread each' if workers > 1 else ''})"
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from sim.fleet import NoTrainingError
    from sim.run import run_experiment, say
    from sim.threads import apply_threads

    say(apply_threads(config.threads))  # type: ignore[attr-defined]
    say(device_line(config))
    try:
        run_experiment(config)  # type: ignore[arg-type]
    except NoTrainingError as e:
        raise CliError(f"nothing was trained: {e}") from e
    return 0
