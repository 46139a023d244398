"""The budget rules written out as a table (what a native client reads) agree with compute_budget."""

from __future__ import annotations

import dataclasses
import random

from devices.profiles import list_profiles, load_profile
from edge_client.budget import BudgetError, compute_budget
from edge_client.plan_table import RESOLUTION_S, lookup, plan_rows
from edge_client.planner import device_policy, draw_heads, model_cost
from export.adapters import attach
from export.models import build_model
from export.spec import AdapterSpec


def test_the_table_is_the_budget_for_every_time_left_but_within_its_resolution() -> None:
    spec = AdapterSpec(family="ravan", rank=8, heads=4)
    model, _ = build_model("tiny-bert", 6)
    cost = model_cost(attach(model, spec), spec, 64)
    # A heavier model than tiny-BERT, so that most devices' budgets change over the first minutes.
    cost = dataclasses.replace(cost, train_flops_per_example=cost.train_flops_per_example * 2000)
    draw = random.Random(0)
    checked = 0
    for name in list_profiles():
        profile = load_profile(name)
        try:
            rows = plan_rows(profile, cost, spec, local_steps=0, max_batch=16)
        except BudgetError:
            continue
        assert [r.min_round_s for r in rows] == sorted({r.min_round_s for r in rows})
        for _ in range(300):
            t = draw.uniform(0.0, 2 * rows[-1].min_round_s + 10)
            if any(abs(max(t, 1.0) - r.min_round_s) <= RESOLUTION_S for r in rows):
                continue  # within the resolution of a change
            policy = device_policy(spec, local_steps=0, max_batch=16, target_round_s=t)
            b, r = compute_budget(profile, cost, policy), lookup(rows, t)
            assert (b.local_steps, b.batch_size, b.rank, b.heads) == (
                r.local_steps,
                r.batch_size,
                r.rank,
                r.heads,
            )
            checked += 1
    assert checked > 1000


def test_the_head_draw_is_stable_distinct_and_sorted() -> None:
    heads = draw_heads("dev0", 3, 8, 3)
    assert heads == draw_heads("dev0", 3, 8, 3) == tuple(sorted(set(heads))) and len(heads) == 3
    assert {draw_heads("dev0", r, 8, 3) for r in range(20)} != {heads}  # it changes with the round


def test_a_device_trains_a_lower_rank_only_when_the_announcement_offers_it() -> None:
    """The one planner: the rank ladder below the global rank, taken only where the announcement lists
    ``rank_choices``; the rank follows throughput, and fixed steps change the steps only."""
    from edge_client.planner import DevicePlanner
    from export.spec import rank_choices

    assert rank_choices(8) == (1, 2, 4, 8) and rank_choices(6) == (1, 2, 4, 6) and rank_choices(1) == (1,)
    spec = AdapterSpec(family="lora", rank=8, heads=4)
    model, _ = build_model("tiny-bert", 6)
    cost = model_cost(attach(model, spec), spec, 32)

    def header(ranks: tuple[int, ...] | None) -> object:
        return type("Header", (), {"deadline": 1_000_060.0, "round": 1, "rank_choices": ranks})()

    def planned(profile: str, ranks: tuple[int, ...] | None, steps: int = 0) -> tuple[int, int | None]:
        planner = DevicePlanner(spec, "dev", cost, load_profile(profile), local_steps=steps, max_batch=8)
        budget = planner.budget(1_000_060.0, ranks, now=1_000_000.0)
        plan = planner.plan(header(ranks)) if steps else None
        return budget.rank, (plan.local_steps if plan else None)

    assert planned("galaxy_a14", None)[0] == 8  # offered nothing: the global rank
    assert [planned(p, rank_choices(8))[0] for p in ("jetson_orin_nano_8gb", "pixel_8", "galaxy_a14")] == [
        8,
        2,
        1,
    ]
    assert planned("pixel_8", rank_choices(8), steps=3)[1] == 3
