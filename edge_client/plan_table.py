"""A device's round plan: the budget policy it trains under, and that policy written out as a table.

The budget rules live in one place, :func:`edge_client.budget.compute_budget`, and the plan made of
a budget in another, :mod:`edge_client.planner`. The Python client (``fleetlora client``) evaluates
them at the start of each round for the time left to the deadline; a client in another language
(``native/``) cannot run them, so ``fleetlora flash`` evaluates them for its device ahead of time into
``plan.json``: rows ``(min_round_s, local_steps, batch_size, rank, heads)`` sorted by
``min_round_s``, where each row is the budget for every time left at or above its ``min_round_s``
(up to the next row; at the spec's full rank: a native client trains its bundle's rank). The budget
only ever grows with the time left (its docstring), so the table is exact up to the resolution at
which the changes are located (:data:`RESOLUTION_S`).

Two draws a plan needs are SHA-256 rules, reproducible in any language:

- Ravan heads: the ``n`` of ``total`` heads with the smallest ``SHA-256("{client}:{round}:{head}")``,
  ascending (:func:`edge_client.planner.draw_heads`).
- The native client's batches: its examples ordered by ``SHA-256("{client}:{round}:{index}")``, taken
  ``batch`` at a time, wrapping around (``native/src/plan.cpp``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge_client.budget import Budget, DeviceProfile, ModelCost, compute_budget
from edge_client.planner import MIN_ROUND_S, device_policy

FORMAT = 1
RESOLUTION_S = 1e-3  # a row's min_round_s is at most this far above where its budget starts
SATURATION_S = 1e7  # beyond this much time left, no budget grows any more


@dataclass(frozen=True)
class PlanRow:
    """The budget of a round with at least ``min_round_s`` seconds left to the deadline."""

    min_round_s: float
    local_steps: int
    batch_size: int
    rank: int
    heads: int


_Key = tuple[int, int, int, int]  # (local_steps, batch_size, rank, heads)


def _key(b: Budget) -> _Key:
    return (b.local_steps, b.batch_size, b.rank, b.heads)


def plan_rows(
    profile: DeviceProfile, cost: ModelCost, spec: Any, *, local_steps: int, max_batch: int
) -> list[PlanRow]:
    """The device's budget for every time left, as rows (see the module docstring).

    Raises :class:`edge_client.budget.BudgetError` when the device cannot train at all.
    """

    def at(t: float) -> _Key:
        policy = device_policy(spec, local_steps=local_steps, max_batch=max_batch, target_round_s=t)
        return _key(compute_budget(profile, cost, policy))

    top = at(SATURATION_S)
    hi = 2 * MIN_ROUND_S
    while at(hi) != top and hi < SATURATION_S:
        hi *= 2
    rows = [PlanRow(MIN_ROUND_S, *at(MIN_ROUND_S))]

    def split(a: float, ka: _Key, b: float, kb: _Key) -> None:
        # Every part of the budget is non-decreasing in the time left: equal ends, nothing changes between.
        if ka == kb:
            return
        if b - a <= RESOLUTION_S:
            rows.append(PlanRow(b, *kb))
            return
        m = (a + b) / 2
        km = at(m)
        split(a, ka, m, km)
        split(m, km, b, kb)

    split(MIN_ROUND_S, at(MIN_ROUND_S), min(hi, SATURATION_S), top)
    return rows


def lookup(rows: list[PlanRow], time_left_s: float) -> PlanRow:
    """The row a client with ``time_left_s`` to the deadline plans with (what ``native/`` does)."""
    t = max(MIN_ROUND_S, time_left_s)
    return [r for r in rows if r.min_round_s <= t][-1]


def plan_table(
    profile: DeviceProfile, cost: ModelCost, spec: Any, *, local_steps: int, max_batch: int
) -> dict[str, Any]:
    """``plan.json``'s contents for a device (its rows, and what they were made for)."""
    rows = plan_rows(profile, cost, spec, local_steps=local_steps, max_batch=max_batch)
    return {
        "format": FORMAT,
        "device": profile.name,
        "spec": spec.digest(),
        "family": spec.family,
        "local_steps": local_steps,
        "max_batch": max_batch,
        "rows": [asdict(r) for r in rows],
    }
