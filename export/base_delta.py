"""A versioned change of the frozen base, applied to a model without touching its weights.

Methods that change the frozen base on the coordinator (FLoRA merges each round's stacked product,
FedEx-LoRA adds its residual) send the change with the global adapter, under the keys named in
:mod:`export.state` (``<prefix>.base_delta`` dense, or ``<prefix>.base_delta_B`` /
``<prefix>.base_delta_A`` factored). The simulator shares one base model across clients and methods,
so the change is never merged into the weights (float ``W + D - D`` would drift the shared base):
:func:`applied_base_delta` adds ``x D^T`` to the adapted layer's output through a forward hook for
the duration of a round or an evaluation and removes it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from export.state import (
    BASE_DELTA,
    BASE_DELTA_A,
    BASE_DELTA_B,
    BASE_DELTA_SUFFIXES,
    BASE_VERSION,
    State,
    StateError,
    is_base_delta_key,
)

# prefix -> (dense d x k,) or (B d x R, A R x k)
DeltaFactors = tuple[torch.Tensor, ...]


def split_base_delta(state: State) -> tuple[State, State]:
    """``(adapter part, base-delta part)`` of a payload."""
    rest = {k: v for k, v in state.items() if not is_base_delta_key(k)}
    delta = {k: v for k, v in state.items() if is_base_delta_key(k)}
    return rest, delta


def base_delta_layers(delta: State) -> dict[str, DeltaFactors]:
    """The base delta per layer prefix: ``(D,)`` dense or ``(B, A)`` factored, validated."""
    out: dict[str, DeltaFactors] = {}
    prefixes = {k[: -len(s)] for k in delta for s in BASE_DELTA_SUFFIXES if k.endswith(s)}
    for prefix in sorted(prefixes):
        dense = delta.get(prefix + BASE_DELTA)
        b, a = delta.get(prefix + BASE_DELTA_B), delta.get(prefix + BASE_DELTA_A)
        if dense is not None and (a is not None or b is not None):
            raise StateError(f"{prefix}: a base delta is either dense or factored, not both")
        if dense is not None:
            if dense.dim() != 2:
                raise StateError(f"{prefix}{BASE_DELTA}: expected a matrix, got shape {tuple(dense.shape)}")
            out[prefix] = (dense,)
            continue
        if a is None or b is None:
            raise StateError(f"{prefix}: a factored base delta needs both {BASE_DELTA_B} and {BASE_DELTA_A}")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise StateError(f"{prefix}: base delta factors {tuple(b.shape)} @ {tuple(a.shape)} do not chain")
        out[prefix] = (b, a)
    return out


def dense_base_delta(factors: DeltaFactors) -> torch.Tensor:
    """The ``d x k`` matrix of one layer's base delta."""
    return factors[0] if len(factors) == 1 else factors[0] @ factors[1]


def base_version(state: State) -> int:
    """How many merges the base of ``state`` has had (0 when it carries no version)."""
    v = state.get(BASE_VERSION)
    return int(v) if v is not None else 0


@contextmanager
def applied_base_delta(model: nn.Module, delta: State) -> Iterator[None]:
    """Within the block, every layer named in ``delta`` outputs ``base(x) + x D^T`` (plus its adapter).

    The hook sits on the adapted module itself (peft's LoRA wrapper), so it adds to the same output
    the adapter adds to; shapes are checked against the wrapped ``nn.Linear`` before any hook is set.
    """
    layers = base_delta_layers(delta)
    handles = []
    try:
        for prefix, factors in layers.items():
            try:
                module = model.get_submodule(prefix)
            except AttributeError as e:
                raise StateError(f"base delta for {prefix}, which the model does not have") from e
            linear = getattr(module, "base_layer", module)
            shape = (getattr(linear, "out_features", None), getattr(linear, "in_features", None))
            got = (factors[0].shape[0], factors[-1].shape[1])
            if got != shape:
                raise StateError(f"{prefix}: base delta is {got}, the layer is {shape}")
            handles.append(module.register_forward_hook(_hook(factors)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(
    factors: DeltaFactors,
) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
    def add_delta(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # the factors follow x: a CUDA coordinator's global can meet a CPU model
        if len(factors) == 1:
            return output + x @ factors[0].to(x).t()
        b, a = factors
        return output + (x @ a.to(x).t()) @ b.to(x).t()

    return add_delta


__all__ = [
    "applied_base_delta",
    "base_delta_layers",
    "base_version",
    "dense_base_delta",
    "split_base_delta",
]
