"""Trainable state: ``dict[str, Tensor]`` keyed by stable fully-qualified names.

Everything that moves between a device and the coordinator is a trainable state or a slice of one.
This module names the tensors and groups them into adapter layers, so the aggregators, the wire
format and the ExecuTorch bundle all agree on what a key means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

State = dict[str, torch.Tensor]
V = TypeVar("V")

LORA_A = ".lora_A.default.weight"
LORA_B = ".lora_B.default.weight"
RAVAN_H = ".ravan_H"
RAVAN_S = ".ravan_s"
RAVAN_HEADS = ".ravan_heads"  # int64 indices of the heads a client uploads (a slice of H)
# A change of the frozen base a method made on the coordinator (FLoRA's merge, FedEx-LoRA's residual),
# in weight units (the LoRA scale folded in): dense ``<prefix>.base_delta`` (d x k), or factored
# ``<prefix>.base_delta_B`` (d x R) @ ``<prefix>.base_delta_A`` (R x k). Clients add it to the layer's
# output (export.base_delta); it is never trained and never uploaded.
BASE_DELTA = ".base_delta"
BASE_DELTA_A = ".base_delta_A"
BASE_DELTA_B = ".base_delta_B"
BASE_VERSION = "base_delta.version"  # int64 scalar: how many merges the coordinator's base has had
BASE_DELTA_SUFFIXES = (BASE_DELTA, BASE_DELTA_A, BASE_DELTA_B)


def is_base_delta_key(key: str) -> bool:
    """Whether ``key`` names a part of a base delta (or its version), not an adapter tensor."""
    return key == BASE_VERSION or key.endswith(BASE_DELTA_SUFFIXES)


def without_kept(entries: Mapping[str, V], kept: Sequence[str]) -> dict[str, V]:
    """The entries that travel: all but the tensors clients keep, named by suffix (FedSA-LoRA's B)."""
    suffixes = tuple(kept)
    return {k: v for k, v in entries.items() if not (suffixes and k.endswith(suffixes))}


def kept_suffixes(kept: Mapping[str, object]) -> tuple[str, ...]:
    """The LoRA factor suffixes the names in ``kept`` end with (the inverse of :func:`without_kept`)."""
    return tuple(suffix for suffix in (LORA_A, LORA_B) if any(k.endswith(suffix) for k in kept))


class StateError(ValueError):
    """A trainable state whose names or shapes do not match the model's."""


@dataclass
class Layout:
    """The adapter layers found in a state, by module prefix.

    ``lora``: prefix -> (A key, B key); ``ravan``: prefix -> H key; ``dense``: every other key
    (a fresh classification head), which every method averages like FedAvg.
    """

    lora: dict[str, tuple[str, str]] = field(default_factory=dict)
    ravan: dict[str, str] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)


def layout(state: State | dict[str, object]) -> Layout:
    """Group a state's keys into adapter layers (see :class:`Layout`)."""
    out = Layout()
    keys = set(state)
    for key in sorted(keys):
        if key.endswith(LORA_A):
            prefix = key[: -len(LORA_A)]
            b_key = prefix + LORA_B
            out.lora[prefix] = (key, b_key)
        elif key.endswith(LORA_B):
            a_key = key[: -len(LORA_B)] + LORA_A
            if a_key not in keys:  # FFA-LoRA uploads B alone
                out.lora[key[: -len(LORA_B)]] = (a_key, key)
        elif key.endswith(RAVAN_H):
            out.ravan[key[: -len(RAVAN_H)]] = key
        elif key.endswith((RAVAN_S, RAVAN_HEADS)) or is_base_delta_key(key):
            continue
        else:
            out.dense.append(key)
    return out


def trainable_state(model: nn.Module) -> State:
    """A detached copy of every trainable parameter, keyed by its fully-qualified name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: State, *, strict: bool = True) -> None:
    """Copy ``state`` into the model's trainable parameters, checking names and shapes first.

    With ``strict`` every trainable parameter must be present; nothing is written unless all checks
    pass, so a bad state never leaves the model half-updated.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise StateError(f"state has {len(unknown)} keys the model does not train, e.g. {unknown[:3]}")
    missing = sorted(set(params) - set(state))
    if strict and missing:
        raise StateError(f"state lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise StateError(f"{name}: shape {tuple(t.shape)} != model's {tuple(params[name].shape)}")
        if not torch.is_floating_point(t):
            raise StateError(f"{name}: dtype {t.dtype} is not floating point")
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)


def num_scalars(state: State) -> int:
    return sum(t.numel() for t in state.values())


def num_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def clone_state(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}
