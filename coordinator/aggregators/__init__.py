"""Aggregation methods, one module each, registered by name.

A new method is one module defining an :class:`Aggregator` subclass (with, when it has options, their
:class:`MethodOptions` dataclass as its ``Options``) plus one line in ``_MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from coordinator.aggregators.base import (
    AggregationError,
    Aggregator,
    ClientInfo,
    ClientUpdate,
    MethodOptions,
    OptionsError,
)
from export.spec import AdapterSpec

# method name -> module defining it (imported lazily so one broken optional method never blocks others)
_MODULES: dict[str, str] = {
    "fedit": "coordinator.aggregators.fedit",
    "fedrpca": "coordinator.aggregators.fedrpca",
    "flora_na": "coordinator.aggregators.flora_na",
    "ravan": "coordinator.aggregators.ravan",
    "ffa_lora": "coordinator.aggregators.single_factor",
    "fedsa_lora": "coordinator.aggregators.single_factor",
    "flora": "coordinator.aggregators.flora",
    "flexlora": "coordinator.aggregators.flexlora",
    "hetlora": "coordinator.aggregators.hetlora",
    "fedex_lora": "coordinator.aggregators.fedex_lora",
    "lora_fair": "coordinator.aggregators.lora_fair",
    "fed_sb": "coordinator.aggregators.fed_sb",
    "task_arithmetic": "coordinator.aggregators.scaled_avg",
    "fedexp": "coordinator.aggregators.scaled_avg",
}


def available() -> list[str]:
    """Registered method names."""
    return list(_MODULES)


def get(name: str) -> type[Aggregator]:
    """The aggregator class registered under ``name``."""
    if name not in _MODULES:
        raise KeyError(f"unknown aggregation method {name!r}; choose from {', '.join(_MODULES)}")
    module = importlib.import_module(_MODULES[name])
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Aggregator) and getattr(obj, "name", None) == name:
            return obj
    raise KeyError(f"module {_MODULES[name]} defines no Aggregator named {name!r}")


def method_options(name: str, params: Mapping[str, Any]) -> MethodOptions:
    """Method ``name``'s options from a mapping (``--method-params``, a run config's table), checked:
    :class:`OptionsError` names the method and the key or value it refuses."""
    return get(name).Options.from_params(name, params)


def create(name: str, spec: AdapterSpec, **params: Any) -> Aggregator:
    """An aggregator instance; ``params`` are ``device``, ``weighting``, ``chunk_bytes`` and the
    method's options (the fields of its ``Options``)."""
    return get(name)(spec, **params)


__all__ = [
    "AggregationError",
    "Aggregator",
    "ClientInfo",
    "ClientUpdate",
    "MethodOptions",
    "OptionsError",
    "available",
    "create",
    "get",
    "method_options",
]
