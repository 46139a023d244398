"""``fleetlora bench aggregate`` runs every registered method on the uploads its clients would send.

(FFA-LoRA refuses an upload carrying A and FedSA-LoRA one carrying B, so a bench that fed every method
the same full uploads would stop at the first of them.)"""

from __future__ import annotations

import math

import pytest

from bench.aggregate import LLAMA7B, MINILM, Shape, plan, run_config
from coordinator.aggregators import available, get

pytestmark = pytest.mark.numerical  # compares floats across code paths: rerun under other CPU capabilities

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
    # The batched PCP gives the textbook loop's answer: both stop at a 1e-7 relative residual, so they
    # differ by convergence gaps (float64 rounding is ~1e-14), allowed 100x (tests/test_rpca.py).
    assert max_rel_diff < 1e-5


def test_the_plan_runs_the_7b_dense_reference_only_on_a_gpu():
    """On 2 CPU cores the dense FLoRA-NA reference on 4096 x 4096 layers would take tens of minutes."""
    budget = 4 * 2**30
    _, cpu_skip, cpu_note = plan(LLAMA7B, 100, quick=False, budget_bytes=budget)
    assert "flora_na/dense" in cpu_skip and "flora_na/dense" in cpu_note
    _, gpu_skip, _ = plan(LLAMA7B, 100, quick=False, budget_bytes=budget, gpu=True)
    assert not gpu_skip
    # --quick on a GPU also measures 7B at K = 100, FLoRA-NA's comparison but not the ~20 s textbook PCP
    _, quick_skip, _ = plan(LLAMA7B, 100, quick=True, budget_bytes=budget, gpu=True)
    assert quick_skip == {"pcp/numpy"}
    assert plan(MINILM, 100, quick=True, budget_bytes=budget, gpu=True)[1] == set()
