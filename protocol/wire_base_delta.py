"""The coordinator's change of the frozen base inside a global envelope: names, dtypes and shapes.

FLoRA and FedEx-LoRA change the frozen base on the coordinator and send the change with every
global adapter (:mod:`coordinator.versioned_base`): per adapted LoRA layer either a dense
``<prefix>.base_delta`` (d, k) or factors ``<prefix>.base_delta_B`` (d, R) and ``.base_delta_A``
(R, k), plus the int64 scalar ``base_delta.version``. Only a global may carry them (a device never
changes the base); their ``d`` and ``k`` are those of the layer's LoRA factors in the template, and
``R`` of the two factors must agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from export.state import (
    BASE_DELTA,
    BASE_DELTA_A,
    BASE_DELTA_B,
    BASE_VERSION,
    LORA_A,
    LORA_B,
    is_base_delta_key,
)
from protocol.wire_errors import EnvelopeError, Reason


class _Declared(Protocol):  # wire_tensors.Entry: a tensor as the safetensors header declares it
    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def base_delta_names(names: set[str]) -> set[str]:
    """The names among ``names`` that belong to a base delta."""
    return {n for n in names if is_base_delta_key(n)}


def check_base_delta(
    entries: Mapping[str, _Declared], names: set[str], lora: Mapping[str, Mapping[str, tuple[int, ...]]]
) -> None:
    """Check the base-delta tensors ``names`` (:func:`base_delta_names`) of ``entries`` against the
    template's LoRA layers ``lora`` (prefix -> {factor key: full-rank shape}); :class:`EnvelopeError`
    for anything not right."""
    if BASE_VERSION not in names:
        raise EnvelopeError(Reason.MISSING_KEY, f"a base delta without {BASE_VERSION}")
    # Its dtype (I64) is checked with every other dtype (wire_tensors.check_dtypes), before this.
    _need(entries[BASE_VERSION].shape == (), f"{BASE_VERSION}: {entries[BASE_VERSION].shape}, want a scalar")
    for prefix in sorted({_prefix(n) for n in names if n != BASE_VERSION}):
        layer = lora.get(prefix)
        if layer is None or prefix + LORA_A not in layer or prefix + LORA_B not in layer:
            raise EnvelopeError(Reason.UNKNOWN_KEY, f"a base delta for {prefix!r}, not a LoRA layer here")
        d, k = layer[prefix + LORA_B][0], layer[prefix + LORA_A][1]
        dense, b, a = (entries.get(prefix + s) for s in (BASE_DELTA, BASE_DELTA_B, BASE_DELTA_A))
        if dense is not None:
            if b is not None or a is not None:
                raise EnvelopeError(Reason.SHAPE, f"{prefix}: a base delta is dense or factored, not both")
            _need(dense.shape == (d, k), f"{prefix}{BASE_DELTA}: {dense.shape}, want {(d, k)}")
            continue
        if b is None or a is None:
            raise EnvelopeError(Reason.MISSING_KEY, f"{prefix}: a factored base delta needs B and A")
        _need(
            len(b.shape) == 2 and len(a.shape) == 2 and b.shape[0] == d and a.shape[1] == k
            and b.shape[1] == a.shape[0] >= 1,
            f"{prefix}: base delta factors {b.shape} @ {a.shape}, want ({d}, R) @ (R, {k})",
        )  # fmt: skip


def _prefix(name: str) -> str:
    suffix = next(s for s in (BASE_DELTA_A, BASE_DELTA_B, BASE_DELTA) if name.endswith(s))  # longest first
    return name[: -len(suffix)]


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise EnvelopeError(Reason.SHAPE, message)
