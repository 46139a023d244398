"""The adapter spec: the one value that fully determines an adapter's trainable tensors.

The coordinator and every device rebuild the same adapter from the same spec, including every frozen
random tensor (Ravan's bases, FFA-LoRA's frozen A), so those tensors are never sent. The spec travels
as JSON inside bundles and update envelopes and is identified by :meth:`AdapterSpec.digest`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

Family = Literal["lora", "ravan"]
BasisInit = Literal["gram_schmidt", "normal"]

DTYPES = ("float32", "bfloat16", "float16")


#: The LoRA ranks a client may train instead of the global rank (those below it; edge_client.planner).
RANK_LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def rank_choices(max_rank: int) -> tuple[int, ...]:
    """The ranks a client may train under a global rank of ``max_rank``: the ladder up to it."""
    return (*(r for r in RANK_LADDER if r < max_rank), max_rank)


class SpecError(ValueError):
    """An adapter spec that cannot describe a valid adapter."""


@dataclass(frozen=True)
class AdapterSpec:
    """What a device trains on top of the frozen base.

    Parameters
    ----------
    family : {"lora", "ravan"}
        LoRA (``W0 + alpha/r * B A``) or Ravan (``W0 + sum_i s_i B_i H_i A_i``).
    target_modules : tuple of str
        Names of the linear layers to adapt, matched as a suffix of the module path (peft's rule).
    layers : tuple of int, optional
        Only adapt these transformer block indices (all when empty). Adapting only upper layers lets
        the simulator cache the frozen lower layers' outputs.
    rank : int
        LoRA rank (the maximum rank when devices train heterogeneous ranks).
    alpha : float
        LoRA scaling numerator, ``gamma = alpha / rank``.
    heads : int
        Number of Ravan heads ``h``.
    head_rank : int
        Ravan head size ``r_h``; 0 derives it from the LoRA budget of ``rank`` (METHODS.md section 2.1).
    basis_init : {"gram_schmidt", "normal"}
        How Ravan's frozen ``B_i`` and ``A_i`` are drawn from ``seed``.
    freeze_a : bool
        FFA-LoRA: ``A`` is drawn from ``seed``, frozen and never sent; only ``B`` trains.
    trainable_extra : tuple of str
        Whole modules that train besides the adapter (a fresh classification head), averaged by every
        method like plain FedAvg.
    dtype : str
        Storage dtype of trainable tensors.
    seed : int
        Seed of every frozen random tensor of the adapter.
    """

    family: Family = "lora"
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] = ()
    rank: int = 8
    alpha: float = 16.0
    heads: int = 4
    head_rank: int = 0
    basis_init: BasisInit = "gram_schmidt"
    freeze_a: bool = False
    trainable_extra: tuple[str, ...] = ("classifier",)
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in ("lora", "ravan"):
            raise SpecError(f"family must be 'lora' or 'ravan', got {self.family!r}")
        if not self.target_modules:
            raise SpecError("target_modules must name at least one module")
        if self.rank < 1:
            raise SpecError(f"rank must be >= 1, got {self.rank}")
        if self.heads < 1:
            raise SpecError(f"heads must be >= 1, got {self.heads}")
        if self.head_rank < 0:
            raise SpecError(f"head_rank must be >= 0, got {self.head_rank}")
        if self.basis_init not in ("gram_schmidt", "normal"):
            raise SpecError(f"basis_init must be 'gram_schmidt' or 'normal', got {self.basis_init!r}")
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise SpecError(f"alpha must be a positive number, got {self.alpha}")
        if any(i < 0 for i in self.layers):
            raise SpecError(f"layers must be non-negative indices, got {self.layers}")

    @property
    def scaling(self) -> float:
        """LoRA's ``gamma = alpha / rank``."""
        return self.alpha / self.rank

    def ravan_head_rank(self, d_out: int, d_in: int) -> int:
        """Head size ``r_h`` for a ``d_out x d_in`` layer: explicit, or matched to the LoRA budget."""
        if self.head_rank:
            return self.head_rank
        return head_rank_for_budget(self.rank, d_out, d_in, self.heads)

    def with_(self, **changes: Any) -> AdapterSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["layers"] = list(self.layers)
        d["trainable_extra"] = list(self.trainable_extra)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterSpec:
        if not isinstance(d, dict):
            raise SpecError(f"adapter spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"unknown adapter spec keys: {sorted(unknown)}")
        kw = dict(d)
        for key in ("target_modules", "layers", "trainable_extra"):
            if key in kw:
                if not isinstance(kw[key], list | tuple):
                    raise SpecError(f"{key} must be a list")
                kw[key] = tuple(kw[key])
        try:
            return cls(**kw)
        except TypeError as e:
            raise SpecError(str(e)) from e

    @classmethod
    def from_json(cls, text: str | bytes) -> AdapterSpec:
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise SpecError(f"adapter spec is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def digest(self) -> str:
        """A short stable hash of the spec; envelopes carry it so mismatched adapters are refused."""
        return _digest(self)


@functools.lru_cache(maxsize=64)
def _digest(spec: AdapterSpec) -> str:
    # Cached: the coordinator checks it on every update it receives (a spec is frozen and hashable).
    return hashlib.sha256(spec.to_json().encode()).hexdigest()[:16]


def head_rank_for_budget(rank: int, d_out: int, d_in: int, heads: int) -> int:
    """Ravan head rank matching a rank-``rank`` LoRA's budget ``N = r (d + k)``: ``floor(sqrt(N / h))``.

    Capped so that the ``h * r_h`` orthonormal basis vectors fit in ``min(d, k)`` dimensions.
    """
    budget = rank * (d_out + d_in)
    r_h = math.isqrt(budget // heads)
    return max(1, min(r_h, min(d_out, d_in) // heads))
