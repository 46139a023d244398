"""The simulator's run config: every flag of ``fleetlora sim``, validated in one place."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from export.spec import AdapterSpec

# Training settings a method may override in ``method_params`` (tuned per method, as the papers did).
TRAINING_KEYS = frozenset(
    {"lr", "momentum", "server_lr", "server_momentum", "optimizer", "batch_size", "weighting"}
)


class ConfigError(ValueError):
    """A run config that cannot run: said in one line, before anything heavy starts."""


@dataclass(frozen=True)
class SimConfig:
    """One federated experiment (one or several methods on identical clients, data and budgets).

    ``layers`` are the transformer blocks that carry adapters; when they are the upper blocks only,
    the frozen lower blocks' outputs are computed once and cached (identical results, much faster).
    ``local_steps`` = 0 lets each device's budget decide its steps; > 0 fixes them for everyone.
    ``trainer`` = ``executorch`` trains with a bundle's program (SGD only, built once and cached);
    its inputs are token ids, so it runs the frozen lower blocks instead of reading them from the cache.

    The protocol (``val_fraction``, ``patience``, ``seeds``): a validation split is carved from the
    training data; every round is scored on it, the round reported is the one with the best
    validation accuracy (a run stops after ``patience`` rounds without improvement, at most
    ``rounds``), and the test split is read once, for that round's global adapter. ``centralized``
    adds the same adapter trained on the pooled training data as a reference row.

    ``method_params`` holds, per method, the aggregator's own options and overrides of the training
    settings in :data:`TRAINING_KEYS` (what ``fleetlora tune`` writes), e.g.
    ``{"fedrpca": {"beta": 2.0, "lr": 0.02}}``.
    """

    methods: tuple[str, ...] = ("fedit", "fedrpca", "flora_na", "ravan")
    model: str = "minilm"
    dataset: str = "reuters8"
    clients: int = 20
    clients_per_round: int = 10
    rounds: int = 12
    partition: str = "dirichlet"  # dirichlet | iid
    alpha: float = 0.3
    device_mix: str = "default"
    local_steps: int = 0
    max_steps: int = 8
    batch_size: int = 16
    lr: float = 0.05
    optimizer: str = "sgd"  # SGD (with momentum): what the ExecuTorch runtime offers devices
    # Local SGD without momentum (it restarts every round) and momentum at the server instead (FedAvgM),
    # weighted by the examples each client processed: measured here on R8 (fedit, 10 rounds, seed 0),
    # test 0.807 with local momentum 0.9, 0.881 with server momentum, 0.921 with work weighting too.
    momentum: float = 0.0  # local SGD momentum (reset every round: a round starts from the global)
    server_lr: float = 1.0  # server step on the aggregate's change (FedAvgM; lr 1 and momentum 0 = plain)
    server_momentum: float = 0.9
    rank: int = 8
    lora_alpha: float = 16.0
    heads: int = 4
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] = (5,)
    max_len: int = 0  # tokens per example; 0 = from the training split's length distribution, at most:
    max_len_cap: int = 64  # what 0 may choose: a step costs in proportion to its tokens
    deadline_s: float = 0.0  # virtual round deadline; 0 = derived from the device mix
    seed: int = 0
    out: str = "runs/sim"
    transport: str = "inproc"
    broker: str = ""
    ray_address: str = ""  # "" = a private Ray on this machine; "auto" or host:port = join a cluster
    ray_actors: int = 0  # Ray actors (one model each); 0 = one per CPU of the cluster
    trainer: str = "eager"
    threads: int = 0  # torch intra-op threads; 0 = the idle cores (sim/threads.py)
    workers: int = 0  # client worker threads of one torch thread each; 0 = one per core (sim/pool.py)
    device: str = "auto"  # where clients train and rounds are scored: auto = cuda when available
    batched: str = "auto"  # a round's clients as one batch (sim/batched.py): auto | on | off
    weighting: str = "work"
    eval_examples: int = 0  # the test split is read once per reported model: all of it (0), or a subset
    val_fraction: float = 0.1  # of the training split, stratified, held out from every client
    patience: int = 5  # stop after this many rounds without a better validation accuracy; 0 = never
    seeds: tuple[int, ...] = ()  # several seeds: mean +- std and paired differences; () = (seed,)
    centralized: bool = True  # the reference row: the same adapter trained on the pooled data
    centralized_max_epochs: float = 2.0  # how far the reference trains past the federated budget
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.clients >= 1, f"clients must be >= 1, got {self.clients}"),
            (
                1 <= self.clients_per_round <= self.clients,
                f"clients_per_round must be in [1, clients={self.clients}], got {self.clients_per_round}",
            ),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (
                self.partition in ("dirichlet", "iid"),
                f"partition must be dirichlet or iid, not {self.partition!r}",
            ),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (self.local_steps >= 0 and self.max_steps >= 1, "local_steps must be >= 0 and max_steps >= 1"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (
                self.transport in ("inproc", "mqtt", "ray"),
                f"transport must be inproc, mqtt or ray: {self.transport!r}",
            ),
            (
                self.trainer in ("eager", "executorch"),
                f"trainer must be eager or executorch: {self.trainer!r}",
            ),
            (
                self.trainer != "executorch" or self.optimizer == "sgd",
                f"the executorch trainer runs the runtime's SGD only: pass --optimizer sgd "
                f"(not {self.optimizer!r})",
            ),
            (self.ray_actors >= 0, f"ray_actors must be >= 0, got {self.ray_actors}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda: {self.device!r}"),
            (self.batched in ("auto", "on", "off"), f"batched must be auto, on or off: {self.batched!r}"),
            (self.max_len == 0 or self.max_len >= 8, f"max_len must be 0 (auto) or >= 8, got {self.max_len}"),
            (self.max_len_cap >= 32, f"max_len_cap must be >= 32, got {self.max_len_cap}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}"),
            (0 <= self.server_momentum < 1, f"server_momentum must be in [0, 1), got {self.server_momentum}"),
            (0 < self.val_fraction < 0.5, f"val_fraction must be in (0, 0.5), got {self.val_fraction}"),
            (self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
            (self.centralized_max_epochs >= 0, "centralized_max_epochs must be >= 0"),
            (len(set(self.seeds)) == len(self.seeds), f"seeds repeat: {self.seeds}"),
            (self.deadline_s >= 0, f"deadline_s must be >= 0, got {self.deadline_s}"),
            (bool(self.methods), "give at least one method"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for method, params in self.method_params.items():
            if method not in self.methods:
                raise ConfigError(
                    f"method_params names {method!r}, which is not run ({', '.join(self.methods)})"
                )
            for key in TRAINING_KEYS & set(params):
                try:
                    replace(self, **{key: params[key]}, method_params={}, methods=(method,))
                except (ConfigError, TypeError) as e:
                    raise ConfigError(f"method_params[{method!r}]: {e}") from None
            if own := self.aggregator_params(method):
                from coordinator import aggregators  # the aggregators (and torch) only when options are given

                try:
                    aggregators.method_options(method, own)
                except (aggregators.OptionsError, KeyError) as e:
                    raise ConfigError(f"method_params[{method!r}]: {e}") from None

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)

    def for_method(self, method: str) -> SimConfig:
        """This config with the method's training overrides from ``method_params`` applied."""
        overrides = {k: v for k, v in self.method_params.get(method, {}).items() if k in TRAINING_KEYS}
        return replace(self, **overrides) if overrides else self

    def aggregator_params(self, method: str) -> dict[str, Any]:
        """The method's own options (``method_params`` less the training overrides)."""
        return {k: v for k, v in self.method_params.get(method, {}).items() if k not in TRAINING_KEYS}

    def spec(self, family: str) -> AdapterSpec:
        """The adapter spec every client of a method of this family trains."""
        return AdapterSpec(
            family=family,  # type: ignore[arg-type]
            target_modules=self.target_modules,
            layers=self.layers,
            rank=self.rank,
            alpha=self.lora_alpha,
            heads=self.heads,
            seed=self.seed,
        )

    def flag_values(
        self, skip: tuple[str, ...] = ("out", "seeds", "seed", "method_params")
    ) -> dict[str, Any]:
        """The settings that differ from the defaults, keyed as ``fleetlora sim``'s flags (a TOML run
        config): tuples become comma-separated strings."""
        default = SimConfig()
        renamed = {"methods": "method", "deadline_s": "deadline"}
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if name in skip or value == getattr(default, name):
                continue
            key = renamed.get(name, name).replace("_", "-")
            out[key] = ",".join(map(str, value)) if isinstance(value, tuple | list) else value
        return out

    @classmethod
    def from_flag_values(cls, values: dict[str, Any]) -> SimConfig:
        """The inverse of :meth:`flag_values`: a run config's TOML keys (flags) to a config."""
        renamed = {"method": "methods", "deadline": "deadline_s"}
        tuples = {"methods", "layers", "target_modules", "seeds"}
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = renamed.get(key.replace("-", "_"), key.replace("-", "_"))
            if name not in names:
                raise ConfigError(f"unknown setting {key!r}")
            if name in tuples and isinstance(value, str):
                parts = [v.strip() for v in value.split(",") if v.strip()]
                value = tuple(int(v) for v in parts) if name in ("layers", "seeds") else tuple(parts)
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
