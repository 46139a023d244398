"""``fleetlora bench aggregate`` runs every registered method on the uploads its clients would send.

(FFA-LoRA refuses an upload carrying A and FedSA-LoRA one carrying B, so a bench that fed every method
the same full uploads would stop at the first of them.)"""

from __future__ import annotations

import math

import pytest

from coordinator.aggregators import available, get
from coordinator.bench_aggregate import Shape, run_config

TINY = Shape("tiny", 24, 4, 4)


def test_every_method_runs_at_k100_and_both_comparisons_are_measured(capsys: pytest.CaptureFixture[str]):
    ratios: dict[str, float] = {}
    run_config(TINY, 100, TINY.layers, set(), "", seed=0, ratios=ratios)
    rows = {line.split()[3]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert set(available()) | {"flora_na/dense", "pcp/numpy"} == set(rows)
    for name in available():
        divergence = float(rows[name][5])
        # FedSA-LoRA keeps B on each client: there is no global product to diverge from.
        assert math.isnan(divergence) == (name == "fedsa_lora"), name
        if get(name).family == "lora" and name != "fedsa_lora":
            assert 0 <= divergence < 1, name
    assert ratios["fedrpca"] > 0 and ratios["flora_na"] > 0
    max_rel_diff = float(rows["pcp/numpy"][-1])
    assert max_rel_diff < 1e-5  # the batched PCP gives the textbook loop's answer
