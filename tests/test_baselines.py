"""The baselines' own invariants (METHODS.md 6), their downloads, the client side of a base change,
and the simulator running every method (tiny BERT, TREC-6)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
from tolerances import divergence_abs, gamma, stored_product_rel
from torch import nn

from coordinator.aggregators import AggregationError, ClientInfo, ClientUpdate, available, create, get
from coordinator.aggregators.flexlora import lowrank_svd
from coordinator.aggregators.hetlora import sparsity_weights
from coordinator.aggregators.ranks import pad_updates
from coordinator.divergence import lora_divergence
from edge_client.local_round import LocalPlan, run_local_round
from edge_client.trainer import Batch, EagerTrainer, OptimizerConfig, StepBudget, TrainMetrics
from export.base_delta import applied_base_delta, base_delta_layers, base_version, dense_base_delta
from export.spec import AdapterSpec
from export.state import BASE_DELTA, BASE_DELTA_A, BASE_DELTA_B, LORA_A, LORA_B, State
from sim.config import SimConfig
from sim.run import run_experiment

pytestmark = pytest.mark.numerical  # compares floats across code paths: rerun under other CPU capabilities

LAYERS = {"l0.query": (40, 30), "l1.value": (40, 30)}  # prefix -> (d, k); two layers of one shape
RANK = 4
DENSE = "classifier.weight"
SPEC = AdapterSpec(rank=RANK, alpha=8.0)


def glob_state(gen: torch.Generator, scale_b: float = 0.1) -> State:
    state = {DENSE: torch.randn(3, 5, generator=gen)}
    for prefix, (d, k) in LAYERS.items():
        state[prefix + LORA_A] = torch.randn(RANK, k, generator=gen)
        state[prefix + LORA_B] = torch.randn(d, RANK, generator=gen) * scale_b
    return state


def uploads(ranks: list[int], seed: int = 0) -> tuple[State, list[ClientUpdate]]:
    """A global rank-RANK state and one upload per rank (the client's rank slice of a random pair)."""
    gen = torch.Generator().manual_seed(seed)
    glob = glob_state(gen)
    out = []
    for i, r in enumerate(ranks):
        state = {DENSE: glob[DENSE] + torch.randn(3, 5, generator=gen)}
        for prefix, (d, k) in LAYERS.items():
            state[prefix + LORA_A] = torch.randn(r, k, generator=gen)
            state[prefix + LORA_B] = torch.randn(d, r, generator=gen)
        out.append(ClientUpdate(f"c{i}", state, num_examples=2 + 3 * i, rank=r))
    return glob, out


def weights(updates: list[ClientUpdate]) -> torch.Tensor:
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return n / n.sum()


def exact(updates: list[ClientUpdate], prefix: str) -> torch.Tensor:
    p = weights(updates)
    return sum(
        w * u.state[prefix + LORA_B].double() @ u.state[prefix + LORA_A].double()
        for w, u in zip(p, updates, strict=True)
    )


# Rounding bounds (tests/tolerances.py) for these rounds: <= 5 clients, stacked rank <= 6 x RANK
# (FedEx-LoRA: the clients' products and the global's), d = 40.
STORED_REL = stored_product_rel(6 * RANK, RANK)
DIVERGENCE_FLOOR = STORED_REL + divergence_abs(6, RANK, 40)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 storage of the global state (methods compute in float64)."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want.double(), rtol=STORED_REL, atol=STORED_REL * scale)


def base_of(state: State, prefix: str) -> torch.Tensor:
    return dense_base_delta(tuple(t.double() for t in base_delta_layers(state)[prefix]))


# ---- FLoRA --------------------------------------------------------------------------------------


def test_flora_stacks_heterogeneous_ranks_exactly_into_the_base():
    glob, ups = uploads([1, 2, 4], seed=1)
    agg = create("flora", SPEC, device="cpu")
    out = agg.aggregate(glob, ups)
    for prefix in LAYERS:
        assert out[prefix + BASE_DELTA_B].shape[1] == 1 + 2 + 4  # stacked rank = sum r_k
        close(base_of(out, prefix), SPEC.scaling * exact(ups, prefix))
        assert not out[prefix + LORA_B].any()  # a fresh adapter: B = 0, A random
        assert out[prefix + LORA_A].abs().max() <= 1 / LAYERS[prefix][1] ** 0.5
        assert agg.metrics[f"divergence/{prefix}"] < DIVERGENCE_FLOOR
    assert base_version(out) == 1
    # The next round's merge accumulates; the fresh A changes with the base version.
    again = agg.aggregate(out, ups)
    prefix = next(iter(LAYERS))
    close(base_of(again, prefix), 2 * SPEC.scaling * exact(ups, prefix))
    assert base_version(again) == 2
    assert not torch.equal(again[prefix + LORA_A], out[prefix + LORA_A])


def test_flora_base_turns_dense_when_that_is_smaller_and_downloads_fit_the_rank():
    glob, ups = uploads([4, 4, 4, 4], seed=2)  # 16 (40 + 30) > 40 * 30 / ... after two merges
    agg = create("flora", SPEC, device="cpu")
    state = glob
    for _ in range(3):
        state = agg.aggregate(state, ups)
    prefix = next(iter(LAYERS))
    assert prefix + BASE_DELTA in state and prefix + BASE_DELTA_B not in state  # 48 * 70 >= 1200
    close(base_of(state, prefix), 3 * SPEC.scaling * exact(ups, prefix))
    low = agg.payload_for(ClientInfo("c9", rank=1), state)
    assert low[prefix + LORA_A].shape == (1, 30) and low[prefix + LORA_B].shape == (40, 1)
    assert torch.equal(low[prefix + BASE_DELTA], state[prefix + BASE_DELTA])  # the base travels


def test_heterogeneous_uploads_are_validated():
    glob, ups = uploads([2, 3], seed=3)
    ups[1].state["l0.query" + LORA_B] = torch.zeros(40, 2)  # rank 3 A with a rank 2 B
    for method in ("flora", "flexlora", "hetlora"):
        with pytest.raises(AggregationError, match="do not fit"):
            create(method, SPEC, device="cpu").aggregate(glob, ups)
    _, too_big = uploads([RANK + 1], seed=3)
    with pytest.raises(AggregationError, match="outside"):
        create("hetlora", SPEC, device="cpu").aggregate(glob, too_big)


# ---- FedEx-LoRA ---------------------------------------------------------------------------------


def test_fedex_effective_weight_is_the_exact_average_and_the_residual_rank_is_bounded():
    glob, ups = uploads([RANK] * 3, seed=4)
    agg = create("fedex_lora", SPEC, device="cpu")
    out = agg.aggregate(glob, ups)
    for prefix in LAYERS:
        adapter = out[prefix + LORA_B].double() @ out[prefix + LORA_A].double()
        # W0' + gamma B_bar A_bar = W0 + gamma sum_k p_k B_k A_k
        close(base_of(out, prefix) + SPEC.scaling * adapter, SPEC.scaling * exact(ups, prefix))
        assert out[prefix + BASE_DELTA_B].shape[1] == (len(ups) + 1) * RANK  # factored: 16 * 70 < 1200
        # float64 product of rank-16 factors: spurious singular values ~gamma_16(float64) times
        # ||(|B| |A|)||, which the factor 1e3 covers (sqrt(d k) = 35 for the spectral norm, the rest for
        # |B| |A| against sigma_max); the true ones are O(1), ~1e13 above.
        rank_tol = 1e3 * gamma(16, torch.float64)
        assert int(torch.linalg.matrix_rank(base_of(out, prefix), rtol=rank_tol)) <= (len(ups) + 1) * RANK
        assert agg.metrics[f"divergence/{prefix}"] < DIVERGENCE_FLOOR
    fedit = create("fedit", SPEC, device="cpu").aggregate(glob, ups)
    for key in fedit:  # the adapter itself is FedAvg
        torch.testing.assert_close(out[key], fedit[key])


# ---- FFA-LoRA and FedSA-LoRA --------------------------------------------------------------------


def test_ffa_is_exact_with_the_shared_frozen_a():
    assert get("ffa_lora").client_spec(SPEC).freeze_a
    glob, ups = uploads([RANK] * 4, seed=5)
    for u in ups:  # clients send B only; A is the frozen shared one in the global state
        for prefix in LAYERS:
            del u.state[prefix + LORA_A]
    agg = create("ffa_lora", SPEC, device="cpu")
    out = agg.aggregate(glob, ups)
    p = weights(ups)
    for prefix in LAYERS:
        a = glob[prefix + LORA_A].double()
        want = sum(w * u.state[prefix + LORA_B].double() @ a for w, u in zip(p, ups, strict=True))
        close(out[prefix + LORA_B].double() @ a, want)
        assert torch.equal(out[prefix + LORA_A], glob[prefix + LORA_A])
        assert agg.metrics[f"divergence/{prefix}"] < DIVERGENCE_FLOOR
    ups[0].state["l0.query" + LORA_A] = glob["l0.query" + LORA_A]
    with pytest.raises(AggregationError, match="never travels"):
        agg.aggregate(glob, ups)


def test_fedsa_sends_and_averages_a_only():
    glob, ups = uploads([RANK] * 3, seed=6)
    agg = create("fedsa_lora", SPEC, device="cpu")
    payload = agg.payload_for(ClientInfo("c0"), glob)
    assert not any(k.endswith(LORA_B) for k in payload) and all(p + LORA_A in payload for p in LAYERS)
    with pytest.raises(AggregationError, match="never travels"):
        agg.aggregate(glob, ups)
    for u in ups:
        for prefix in LAYERS:
            del u.state[prefix + LORA_B]
    out = agg.aggregate(glob, ups)
    p = weights(ups)
    for prefix in LAYERS:
        want = sum(w * u.state[prefix + LORA_A] for w, u in zip(p.float(), ups, strict=True))
        torch.testing.assert_close(out[prefix + LORA_A], want)
        assert torch.equal(out[prefix + LORA_B], glob[prefix + LORA_B])
    assert "divergence" not in agg.metrics


# ---- FlexLoRA, HetLoRA --------------------------------------------------------------------------


def test_flexlora_gives_each_rank_its_eckart_young_truncation():
    glob, ups = uploads([1, 2, 3], seed=7)
    agg = create("flexlora", SPEC, device="cpu")
    out = agg.aggregate(glob, ups)
    for prefix in LAYERS:
        target = exact(ups, prefix)
        s = torch.linalg.svdvals(target)
        for r in (1, 2, RANK):
            got = agg.payload_for(ClientInfo("c", rank=r if r < RANK else None), out)
            assert got[prefix + LORA_A].shape[0] == r
            err2 = (got[prefix + LORA_B].double() @ got[prefix + LORA_A].double() - target).square().sum()
            # The truncation stored in float32 is off by delta, ||delta|| <= STORED_REL ||T||: the
            # squared error moves by at most 2 ||tail|| ||delta|| + ||delta||^2.
            tail_norm, delta = float(s[r:].norm()), STORED_REL * float(s.norm())
            want2 = float(s[r:].square().sum())
            assert float(err2) == pytest.approx(want2, rel=0, abs=2 * tail_norm * delta + delta**2)
        tail = float((s[RANK:].square().sum() / s.square().sum()).sqrt())
        assert agg.metrics[f"divergence/{prefix}"] == pytest.approx(tail, rel=0, abs=DIVERGENCE_FLOOR)
    # exact when the ranks stacked (1 + 2 = 3) fit the global rank
    out = agg.aggregate(glob, ups[:2])
    for prefix in LAYERS:
        product = out[prefix + LORA_B].double() @ out[prefix + LORA_A].double()
        close(product, exact(ups[:2], prefix))
        assert agg.metrics[f"divergence/{prefix}"] < DIVERGENCE_FLOOR


def test_lowrank_svd_matches_the_dense_svd():
    gen = torch.Generator().manual_seed(8)
    b, a = (
        torch.randn(2, 40, 9, generator=gen, dtype=torch.float64),
        torch.randn(2, 9, 30, generator=gen, dtype=torch.float64),
    )
    u, s, vh = lowrank_svd(b, a)
    # float64 SVDs are backward stable: errors ~ n u sigma_max ~ 1e-13, inside assert_close's float64
    # defaults; the dense product's 21 spurious singular values are ~gamma_40(float64) sigma_max (1e3:
    # the same margin as in the FedEx-LoRA test above).
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, b @ a)
    dense = torch.linalg.svdvals(b @ a)
    torch.testing.assert_close(s, dense[:, :9])
    assert float(dense[:, 9:].max()) < 1e3 * gamma(40, torch.float64) * float(dense.max())


def test_hetlora_pads_weights_by_norm_and_truncates_downloads():
    glob, ups = uploads([1, 3, 4], seed=9)
    padded = pad_updates(glob, ups)
    for u, v in zip(ups, padded, strict=True):
        for prefix in LAYERS:
            assert v.state[prefix + LORA_A].shape == (RANK, 30)
            torch.testing.assert_close(  # zero-padding keeps the client's product (<= 4 roundings)
                v.state[prefix + LORA_B] @ v.state[prefix + LORA_A],
                u.state[prefix + LORA_B] @ u.state[prefix + LORA_A],
            )
    out = create("hetlora", SPEC, device="cpu").aggregate(glob, ups)
    prefix = next(iter(LAYERS))
    bs = torch.stack([v.state[prefix + LORA_B] for v in padded]).double()[None]
    as_ = torch.stack([v.state[prefix + LORA_A] for v in padded]).double()[None]
    w = sparsity_weights(bs, as_, weights(ups))[0]
    assert float(w.sum()) == pytest.approx(1.0)
    norms = torch.stack([(b @ a).norm() for b, a in zip(bs[0], as_[0], strict=True)])
    torch.testing.assert_close(w, norms / norms.sum())
    close(out[prefix + LORA_A], torch.einsum("u,urk->rk", w, as_[0]))
    zero = sparsity_weights(torch.zeros_like(bs), as_, weights(ups))[0]
    torch.testing.assert_close(zero, weights(ups))  # all products zero: data weights
    low = create("hetlora", SPEC, device="cpu").payload_for(ClientInfo("c", rank=2), out)
    torch.testing.assert_close(low[prefix + LORA_A], out[prefix + LORA_A][:2])
    torch.testing.assert_close(low[prefix + LORA_B], out[prefix + LORA_B][:, :2])


# ---- LoRA-FAIR, scaled averaging, Fed-SB ---------------------------------------------------------


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 1.0])
def test_lora_fair_never_diverges_more_than_fedit(ridge):
    glob, ups = uploads([RANK] * 5, seed=10)
    fedit = create("fedit", SPEC, device="cpu")
    fedit.aggregate(glob, ups)
    fair = create("lora_fair", SPEC, device="cpu", ridge=ridge)
    out = fair.aggregate(glob, ups)
    for prefix in LAYERS:
        assert (
            fair.metrics[f"divergence/{prefix}"]
            <= fedit.metrics[f"divergence/{prefix}"] + 2 * DIVERGENCE_FLOOR
        )
        assert fair.metrics[f"divergence/{prefix}"] < 0.99 * fedit.metrics[f"divergence/{prefix}"]
        bs = torch.stack([u.state[prefix + LORA_B] for u in ups])[None]
        as_ = torch.stack([u.state[prefix + LORA_A] for u in ups])[None]
        got = lora_divergence(out[prefix + LORA_B][None], out[prefix + LORA_A][None], bs, as_, weights(ups))
        # Same float32 global, two float64 trace forms: they differ by their cancellation error only.
        assert float(got) == pytest.approx(fair.metrics[f"divergence/{prefix}"], rel=0, abs=DIVERGENCE_FLOOR)


def test_fedexp_beta_follows_its_rule_and_task_arithmetic_scales_the_mean():
    glob, ups = uploads([RANK] * 4, seed=11)
    p = weights(ups)
    deltas = [
        torch.cat([(u.state[k] - glob[k]).flatten().double() for k in sorted(glob) if k != DENSE])
        for u in ups
    ]
    mean = sum(w * d for w, d in zip(p, deltas, strict=True))
    spread = sum(w * d.square().sum() for w, d in zip(p, deltas, strict=True))
    agg = create("fedexp", SPEC, device="cpu")
    out = agg.aggregate(glob, ups)
    beta = max(1.0, float(spread / (2 * mean.square().sum() + 1e-3)))
    assert agg.metrics["beta"] == pytest.approx(beta)
    ta = create("task_arithmetic", SPEC, device="cpu", beta=beta).aggregate(glob, ups)
    for key in out:
        torch.testing.assert_close(out[key], ta[key])
    key = "l0.query" + LORA_A
    want = glob[key].double() + 3.0 * sum(
        w * (u.state[key] - glob[key]).double() for w, u in zip(p, ups, strict=True)
    )
    got = create("task_arithmetic", SPEC, device="cpu", beta=3.0).aggregate(glob, ups)
    close(got[key], want)


def test_fed_sb_is_ravan_with_one_head():
    spec = get("fed_sb").client_spec(AdapterSpec(family="ravan", heads=4, rank=8))
    assert spec.heads == 1 and spec.family == "ravan"
    assert spec.ravan_head_rank(384, 384) == 78  # floor(sqrt(8 * 768)): a rank-8 LoRA's budget


# ---- the client side of a base change -----------------------------------------------------------


def test_base_delta_is_added_for_the_block_only():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(6, 5))
    x = torch.randn(3, 6)
    before = layer(x)
    b, a = torch.randn(5, 2), torch.randn(2, 6)
    for delta in ({"0" + BASE_DELTA_B: b, "0" + BASE_DELTA_A: a}, {"0" + BASE_DELTA: b @ a}):
        with applied_base_delta(layer, delta):
            torch.testing.assert_close(layer(x), before + x @ (b @ a).T)
        # Bit-exact by design: the hook is gone and the weights were never written.
        torch.testing.assert_close(layer(x), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="do not chain"):
        base_delta_layers({"0" + BASE_DELTA_B: b, "0" + BASE_DELTA_A: a.T})


class NoBaseDeltaTrainer:
    """A backend whose base is baked in (like the ExecuTorch program)."""

    def set_trainable(self, state: State) -> None: ...

    def select_heads(self, heads: list[int] | None) -> None: ...

    def train(self, batches: Iterable[Batch], budget: StepBudget) -> TrainMetrics:
        raise AssertionError("must not train on a stale base")

    def get_trainable(self) -> State:
        return {}


def test_local_round_keeps_local_tensors_and_refuses_a_base_it_cannot_apply():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    model = nn.Sequential(linear)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.net(input_ids)

    wrapped = Wrapped()
    trainer = EagerTrainer(wrapped, OptimizerConfig(name="sgd", lr=0.1))
    template = {k: v.detach().clone() for k, v in wrapped.named_parameters()}
    spec = AdapterSpec()
    batch = {
        "input_ids": torch.randn(8, 4),
        "attention_mask": torch.ones(8),
        "labels": torch.zeros(8, dtype=torch.long),
    }
    keep = {"net.0.bias": torch.zeros(3)}
    payload = {"net.0.weight": template["net.0.weight"], "net.0" + BASE_DELTA: torch.ones(3, 4)}
    upload, metrics = run_local_round(
        trainer, spec, payload, template, [batch], LocalPlan(1), keep_local=keep
    )
    assert metrics.steps == 1 and set(upload) == {"net.0.weight"}  # the kept bias is not uploaded
    assert not torch.equal(trainer.get_trainable()["net.0.bias"], keep["net.0.bias"])  # it trained
    x = batch["input_ids"]
    plain = nn.functional.linear(x, linear.weight, linear.bias)
    # Bit-exact by design: the hook is removed and the base weights were never written.
    assert torch.equal(wrapped(x, batch["attention_mask"]), plain)  # the base delta was removed
    with pytest.raises(TypeError, match="base delta"):
        run_local_round(NoBaseDeltaTrainer(), spec, payload, template, [batch], LocalPlan(1), keep_local=keep)


# ---- the simulator -------------------------------------------------------------------------------

TINY: dict[str, Any] = dict(
    model="tiny-bert",
    dataset="trec6",
    clients=4,
    clients_per_round=4,
    rounds=2,
    max_len=16,
    layers=(1,),
    max_steps=2,
    lr=0.01,
    eval_examples=100,
)


def test_every_method_runs_in_the_simulator(tmp_path):
    config = SimConfig(methods=tuple(available()), out=str(tmp_path / "all"), **TINY)
    records = [r for r in run_experiment(config, quiet=True) if r["kind"] == "round"]
    summary = (tmp_path / "all" / "summary.md").read_text()
    for method in available():
        rs = [r for r in records if r["method"] == method]
        assert len(rs) == TINY["rounds"] and f"| {method} |" in summary
        assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rs)
    by = {(r["method"], r["round"]): r for r in records}
    # FedEx-LoRA's second download carries the first round's residual; FFA and FedSA send one factor.
    assert by["fedex_lora", 2]["bytes_down"] > by["fedit", 2]["bytes_down"]
    assert by["flora", 2]["bytes_down"] > by["flora", 1]["bytes_down"]
    assert by["ffa_lora", 1]["bytes_down"] < by["fedit", 1]["bytes_down"]
    assert by["fedsa_lora", 2]["val_accuracy_local"] is not None and "test_acc_local" in summary
    assert by["fedit", 2]["val_accuracy_local"] is None


def test_heterogeneous_ranks_from_a_right_skewed_mix(tmp_path):
    methods = ("flora", "flexlora", "hetlora", "ravan")
    config = SimConfig(
        methods=methods, device_mix="right_skewed", out=str(tmp_path / "het"), **{**TINY, "clients": 8}
    )
    records = [r for r in run_experiment(config, quiet=True) if r["kind"] == "round"]
    for method in methods[:3]:
        ranks = [rank for r in records if r["method"] == method for rank in r["ranks"]]
        assert len(set(ranks)) > 1 and max(ranks) <= config.rank
    fedit_like = [r for r in records if r["method"] == "hetlora"]
    assert all(len(r["ranks"]) == r["participants"] for r in fedit_like)
    assert all(r["heads"] for r in records if r["method"] == "ravan")
