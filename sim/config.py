"""The simulator's run config: every flag of ``fleetlora sim``, validated in one place."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.spec import AdapterSpec


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
    """

    methods: tuple[str, ...] = ("fedit", "fedrpca", "flora_na", "ravan")
    model: str = "minilm"
    dataset: str = "reuters8"
    clients: int = 20
    clients_per_round: int = 20
    rounds: int = 10
    partition: str = "dirichlet"  # dirichlet | iid
    alpha: float = 0.3
    device_mix: str = "default"
    local_steps: int = 0
    max_steps: int = 4
    batch_size: int = 16
    lr: float = 0.05
    optimizer: str = "sgd"  # SGD with momentum 0.9: what the ExecuTorch runtime offers devices
    rank: int = 8
    lora_alpha: float = 16.0
    heads: int = 4
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] = (5,)
    max_len: int = 32
    deadline_s: float = 0.0  # virtual round deadline; 0 = derived from the device mix
    seed: int = 0
    out: str = "runs/sim"
    transport: str = "inproc"
    broker: str = ""
    ray_address: str = ""  # "" = a private Ray on this machine; "auto" or host:port = join a cluster
    ray_actors: int = 0  # Ray actors (one model each); 0 = one per CPU of the cluster
    trainer: str = "eager"
    weighting: str = "examples"
    eval_examples: int = 500  # a fixed random subset of the test split; 0 = all of it
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
            (self.max_len >= 8, f"max_len must be >= 8, got {self.max_len}"),
            (self.deadline_s >= 0, f"deadline_s must be >= 0, got {self.deadline_s}"),
            (bool(self.methods), "give at least one method"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
