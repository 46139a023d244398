"""Pick a trainer backend by name: ``eager`` (torch) or ``executorch`` (the bundle's program).

Neither torch-heavy model code nor executorch is imported until a trainer is made.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from edge_client.trainer import EagerTrainer, OptimizerConfig, Trainer
from export.bundle import Bundle, load_bundle

BACKENDS = ("eager", "executorch")


def eager_model_from_bundle(bundle: Bundle) -> nn.Module:
    """The bundle's model with its adapter, built in torch (same seed: same initial adapter)."""
    from export.adapters import attach
    from export.models import build_model

    model, _ = build_model(bundle.info.model, bundle.info.num_classes, bundle.info.model_seed)
    return attach(model, bundle.spec)


def make_trainer(
    backend: str,
    *,
    bundle: str | Path | Bundle | None = None,
    model: nn.Module | None = None,
    optimizer: OptimizerConfig | None = None,
) -> Trainer:
    """A trainer of the named backend.

    ``executorch`` needs a ``bundle``; ``eager`` trains ``model``, or builds the bundle's model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown trainer backend {backend!r}; choose from {', '.join(BACKENDS)}")
    loaded = bundle if isinstance(bundle, Bundle) or bundle is None else load_bundle(bundle)
    if backend == "executorch":
        if loaded is None:
            raise ValueError("the executorch backend needs a bundle")
        from edge_client.executorch_trainer import ExecuTorchTrainer

        return ExecuTorchTrainer.from_bundle(loaded, optimizer)
    if model is None:
        if loaded is None:
            raise ValueError("the eager backend needs a model or a bundle")
        model = eager_model_from_bundle(loaded)
    return EagerTrainer(model, optimizer)
