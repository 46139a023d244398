"""What every virtual client trains with: the adapted model and its trainer.

Built the same way by the simulator's driver and by every Ray actor (``sim.ray_transport``), so all of
them hold bit-identical frozen weights and adapter templates without any of it travelling.
"""

from __future__ import annotations

from torch import nn

from edge_client.backends import make_trainer
from edge_client.trainer import OptimizerConfig, Trainer
from export.adapters import attach
from export.models import build_model
from export.spec import AdapterSpec
from sim.config import SimConfig
from sim.threads import choose_device


def adapted_model(
    config: SimConfig, num_classes: int, family: str, spec: AdapterSpec | None = None
) -> nn.Module:
    """The frozen base with a fresh adapter: bit-identical wherever it is built with the same config."""
    base, _ = build_model(config.model, num_classes, seed=config.seed)
    return attach(base, spec or config.spec(family))


def client_trainer(
    config: SimConfig, model: nn.Module, family: str, num_classes: int, base_delta: bool = False
) -> Trainer:
    """The trainer every virtual client uses (in this process or in a Ray actor).

    ``eager`` trains ``model``; ``executorch`` trains the training program of a bundle of the same
    model and adapter (built once, then read from the cache), with base-delta inputs for a method
    that changes the base (``base_delta``).
    """
    optimizer = OptimizerConfig(name=config.optimizer, lr=config.lr, momentum=config.momentum)
    bundle = None
    if config.trainer == "executorch":
        from export.build import cached_bundle

        bundle = cached_bundle(
            config.model, config.spec(family), num_classes=num_classes, seq_len=config.max_len,
            batch_range=(2, max(2, config.batch_size)), model_seed=config.seed, base_delta=base_delta,
        )  # fmt: skip
    return make_trainer(config.trainer, bundle=bundle, model=model, optimizer=optimizer)


def world_device(config: SimConfig) -> str:
    """Where this config's models train and score: ``--device``; the MQTT transport and the
    ExecuTorch trainer hand tensors to code that runs on the host, so they stay on the CPU."""
    device, _ = choose_device(config.device)
    return "cpu" if config.transport == "mqtt" or config.trainer == "executorch" else device
