"""Every registered aggregation method against the shared invariants, then each method's own (METHODS.md 6).

The shared matrix runs over ``available()``, so a method registered later is covered automatically;
states are built for the method's adapter family, and uploads hold only what its clients send (no A
when the method's client spec freezes it, nothing the method keeps on the client); a tensor a client
does not send is the global one. Products (not factors) are compared, because FLoRA-NA's factors are
only defined up to the gauge ``(c p, q / c)``; a base change a method makes (FLoRA, FedEx-LoRA) is
part of the product.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import divergence_abs, gamma, stored_product_rel, sum_tol, unit_roundoff

from coordinator.aggregators import AggregationError, ClientUpdate, available, create, get
from coordinator.divergence import exact_fro2, lora_divergence
from coordinator.flora_na_solver import p_system, q_system, solve_als, solve_dense
from export.base_delta import base_delta_layers, dense_base_delta
from export.ravan import layer_seed, make_bases
from export.spec import AdapterSpec
from export.state import LORA_A, LORA_B, RAVAN_H, RAVAN_HEADS, RAVAN_S

pytestmark = pytest.mark.numerical  # compares floats across code paths: rerun under other CPU capabilities

LORA_LAYERS = {"l0.query": (24, 16), "l0.value": (24, 16), "l1.query": (20, 12)}  # prefix -> (d, k)
RANK = 3
RAVAN_LAYERS = ("l0.query", "l1.value")
HEADS, HEAD_RANK = 4, 3
DENSE = "classifier.weight"

# METHODS.md 6 G3: a single client returns its update for FedRPCA only with beta = 1 (or S = 0);
# Task Arithmetic is FedRPCA with L = 0 (R5), so it returns X + beta * Delta and needs beta = 1 for G1/G3.
SINGLE_CLIENT_PARAMS = {"fedrpca": {"beta": 1.0}, "task_arithmetic": {"beta": 1.0}}
IDENTICAL_CLIENT_PARAMS = {"task_arithmetic": {"beta": 1.0}}
# METHODS.md 5 ("exact? n/a (B local)") and 6 G1 ("FedSA (the A-part)"): no global product to measure.
NO_DIVERGENCE = {"fedsa_lora"}


def spec_for(family: str, **kw) -> AdapterSpec:
    return AdapterSpec(family=family, rank=RANK, heads=HEADS, head_rank=HEAD_RANK, **kw)


def lora_global(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {DENSE: torch.randn(2, 5, generator=gen)}
    for prefix, (d, k) in LORA_LAYERS.items():
        state[prefix + LORA_A] = torch.randn(RANK, k, generator=gen)
        state[prefix + LORA_B] = torch.randn(d, RANK, generator=gen) * 0.1
    return state


def ravan_global(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {DENSE: torch.randn(2, 5, generator=gen)}
    for prefix in RAVAN_LAYERS:
        state[prefix + RAVAN_H] = torch.randn(HEADS, HEAD_RANK, HEAD_RANK, generator=gen)
        state[prefix + RAVAN_S] = torch.ones(HEADS)
    return state


def client_state(family: str, global_state, gen: torch.Generator, flat: bool = False):
    """A client's upload: global + a delta (``flat``: +-c entries, METHODS.md R3's S = 0 case)."""
    out = {}
    for key, value in global_state.items():
        if key.endswith(RAVAN_S):
            continue
        noise = torch.randn(value.shape, generator=gen)
        delta = 0.3 * torch.sign(noise) if flat else noise
        out[key] = value + delta
    return out


def never_sent(method: str | None) -> tuple[str, ...]:
    """Key suffixes a client of ``method`` does not upload (frozen or kept locally)."""
    if method is None:
        return ()
    cls = get(method)
    frozen = (LORA_A,) if cls.client_spec(spec_for(cls.family)).freeze_a else ()
    return frozen + cls.local_suffixes


def make_round(
    family: str,
    n_clients: int,
    seed: int = 0,
    identical: bool = False,
    flat: bool = False,
    method: str | None = None,
):
    gen = torch.Generator().manual_seed(seed)
    glob = lora_global(gen) if family == "lora" else ravan_global(gen)
    first = client_state(family, glob, gen, flat)
    drop = never_sent(method)
    updates = []
    for i in range(n_clients):
        state = first if identical else client_state(family, glob, gen, flat)
        sent = {k: v.clone() for k, v in state.items() if not (drop and k.endswith(drop))}
        updates.append(ClientUpdate(f"c{i}", sent, num_examples=3 + 5 * i))
    return glob, updates


def lora_factor(state, shared, key: str) -> torch.Tensor:
    """A factor of ``state``, or the shared (global) one its client never sends."""
    return (state[key] if key in state else shared[key]).double()


def products(family: str, state, shared=None) -> dict[str, torch.Tensor]:
    """What each layer contributes: ``B A`` (plus any base change, in adapter units) for LoRA, the
    heads ``s_i H_i`` for Ravan."""
    if family == "lora":
        return {p: dense_delta(family, state, p, shared) for p in LORA_LAYERS}
    return {p: state[p + RAVAN_H].double() for p in RAVAN_LAYERS}


def aggregator(name: str, family: str, **params):
    return create(name, spec_for(family), device="cpu", **params)


def magnitudes(family: str, state, shared=None) -> dict[str, torch.Tensor]:
    """``sum |terms|`` of each entry of :func:`products`: ``|B| |A|`` (plus the base change's), ``|H|``."""
    if family != "lora":
        return {p: state[p + RAVAN_H].double().abs() for p in RAVAN_LAYERS}
    out = {}
    for p in LORA_LAYERS:
        m = lora_factor(state, shared, p + LORA_B).abs() @ lora_factor(state, shared, p + LORA_A).abs()
        base = base_delta_layers({k: v for k, v in state.items() if k.startswith(p + ".base_delta")})
        if p in base:
            m = m + dense_base_delta(tuple(t.double().abs() for t in base[p])) / spec_for("lora").scaling
        out[p] = m
    return out


# The methods compute in float64 and store the global factors in float32: each stored entry is off by
# u, so a product entry sums (rank) terms each off by 2u, plus the float32 storage of the uploads
# the other side was built from: a bound of gamma_(2 + terms) per side, relative to sum|terms|, with
# at most 6 clients x RANK stacked terms (FLoRA's base change). FedRPCA's PCP also stops at a relative
# residual of 1e-7 (coordinator/rpca.py, in float64), i.e. 1e-7 of the stacked deltas' norm.
PRODUCT_TERMS = 2 + 6 * RANK
PCP_TOL = 1e-7
U32 = unit_roundoff(torch.float32)
# The divergence metric near 0 (tests/tolerances.py): U <= 6 clients, d <= 24; GRAM_TERMS bounds the
# objective's trace-form sums alike.
GRAM_TERMS = (6 * RANK) ** 2 * 24
DIVERGENCE_ABS = divergence_abs(6, RANK, 24)
# A global stored in float32 moves its divergence by up to this much.
STORED_DIVERGENCE = stored_product_rel(6 * RANK, RANK)


def assert_products_close(family, got, want, shared=None):
    g, w = products(family, got, shared), products(family, want, shared)
    mg, mw = magnitudes(family, got, shared), magnitudes(family, want, shared)
    for prefix in g:
        bound = sum_tol(PRODUCT_TERMS, torch.float32) * (mg[prefix] + mw[prefix])
        bound = bound + PCP_TOL * (mg[prefix] + mw[prefix]).norm()
        excess = ((g[prefix] - w[prefix]).abs() - bound).max()
        assert float(excess) <= 0, f"{prefix}: products differ by {excess:.3g} beyond their rounding bound"


# ---- the shared invariant matrix ------------------------------------------------------------------


@pytest.fixture(params=available())
def method(request) -> str:
    return request.param


def test_updates_are_never_written_into(method):
    """The coordinator aggregates read-only views of the payloads it received
    (:func:`protocol.wire_tensors.load_checked`): a method writing into an update would corrupt them."""
    family = get(method).family
    glob, updates = make_round(family, 4, method=method)
    originals = []
    for u in updates:
        for key, t in list(u.state.items()):
            u.state[key] = torch.frombuffer(t.numpy().tobytes(), dtype=t.dtype).view(t.shape)
            originals.append((u.state[key], t))
    aggregator(method, family).aggregate(glob, updates)
    for view, original in originals:
        assert torch.equal(view, original)


def test_identical_clients_return_their_update(method):
    """G1; FedRPCA's deltas are flat, the case where PCP returns S = 0 (METHODS.md R3)."""
    family = get(method).family
    glob, updates = make_round(family, 5, identical=True, flat=True, method=method)
    agg = aggregator(method, family, **IDENTICAL_CLIENT_PARAMS.get(method, {}))
    out = agg.aggregate(glob, updates)
    assert_products_close(family, out, updates[0].state, shared=glob)
    torch.testing.assert_close(out[DENSE], updates[0].state[DENSE])
    if method not in NO_DIVERGENCE:
        assert agg.metrics["divergence"] < STORED_DIVERGENCE + DIVERGENCE_ABS + PCP_TOL


def test_client_order_does_not_change_the_result(method):
    family = get(method).family
    glob, updates = make_round(family, 6, seed=1, method=method)
    first = aggregator(method, family).aggregate(glob, updates)
    second = aggregator(method, family).aggregate(glob, updates[::-1])
    assert_products_close(family, first, second, shared=glob)
    torch.testing.assert_close(first[DENSE], second[DENSE])


def test_single_client_returns_its_update(method):
    family = get(method).family
    glob, updates = make_round(family, 1, seed=2, method=method)
    out = aggregator(method, family, **SINGLE_CLIENT_PARAMS.get(method, {})).aggregate(glob, updates)
    assert_products_close(family, out, updates[0].state, shared=glob)


def test_dense_keys_are_fedavg_with_example_weights(method):
    family = get(method).family
    glob, updates = make_round(family, 4, seed=3, method=method)
    out = aggregator(method, family).aggregate(glob, updates)
    n = torch.tensor([float(u.num_examples) for u in updates])
    want = sum(w * u.state[DENSE] for w, u in zip(n / n.sum(), updates, strict=True))
    torch.testing.assert_close(out[DENSE], want)
    uniform = aggregator(method, family, weighting="uniform").aggregate(glob, updates)
    torch.testing.assert_close(uniform[DENSE], sum(u.state[DENSE] for u in updates) / 4)


def dense_delta(family: str, state, prefix: str, shared=None) -> torch.Tensor:
    """The layer's dense ``Delta W`` (LoRA: ``B A`` plus any base change over ``gamma``; Ravan:
    ``sum_i B_i H_i A_i`` with GS bases). Factors a client never sends come from ``shared``."""
    if family == "lora":
        product = lora_factor(state, shared, prefix + LORA_B) @ lora_factor(state, shared, prefix + LORA_A)
        base = base_delta_layers({k: v for k, v in state.items() if k.startswith(prefix + ".base_delta")})
        if prefix in base:
            product = product + dense_base_delta(base[prefix]).double() / spec_for("lora").scaling
        return product
    d, k = 16, 14
    b, a = make_bases(d, k, HEADS, HEAD_RANK, layer_seed(0, prefix), "gram_schmidt")
    return torch.einsum("idr,irs,isk->dk", b.double(), state[prefix + RAVAN_H].double(), a.double())


def test_divergence_metric_matches_the_dense_definition(method):
    """``||global - sum p_u client_u||_F / ||sum p_u client_u||_F`` per layer, and its mean."""
    family = get(method).family
    if method in NO_DIVERGENCE:
        pytest.skip(f"{method} keeps a factor on each client: no global product to diverge from")
    glob, updates = make_round(family, 5, seed=4, method=method)
    agg = aggregator(method, family)
    out = agg.aggregate(glob, updates)
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    p = n / n.sum()
    prefixes = LORA_LAYERS if family == "lora" else RAVAN_LAYERS
    for prefix in prefixes:
        target = sum(w * dense_delta(family, u.state, prefix, glob) for w, u in zip(p, updates, strict=True))
        want = float((dense_delta(family, out, prefix, glob) - target).norm() / target.norm())
        assert agg.metrics[f"divergence/{prefix}"] == pytest.approx(want, rel=0, abs=DIVERGENCE_ABS)
    mean = sum(agg.metrics[f"divergence/{prefix}"] for prefix in prefixes) / len(prefixes)
    assert agg.metrics["divergence"] == pytest.approx(mean)


def test_mismatched_uploads_are_refused(method):
    family = get(method).family
    glob, updates = make_round(family, 3, seed=5, method=method)
    key = next(k for k in updates[1].state if k != DENSE)
    updates[1].state[key] = torch.zeros(7, 7)
    with pytest.raises(AggregationError):
        aggregator(method, family).aggregate(glob, updates)


def test_small_batches_give_the_same_result(method):
    """Batching same-shaped layers is an implementation detail: one layer per batch must agree."""
    family = get(method).family
    glob, updates = make_round(family, 4, seed=6, method=method)
    big = aggregator(method, family).aggregate(glob, updates)
    small = aggregator(method, family, chunk_bytes=1).aggregate(glob, updates)
    assert_products_close(family, big, small, shared=glob)


# ---- Ravan (V1-V4) ----------------------------------------------------------------------------------


def partial_upload(state, heads: list[int]) -> dict[str, torch.Tensor]:
    out = {DENSE: state[DENSE]}
    for prefix in RAVAN_LAYERS:
        out[prefix + RAVAN_H] = state[prefix + RAVAN_H][heads]
        out[prefix + RAVAN_HEADS] = torch.tensor(heads, dtype=torch.int64)
    return out


def test_ravan_exact_when_all_heads_are_trained():
    """V1: sum_i B_i (sum_c p_c H_i^c) A_i equals sum_c p_c sum_i B_i H_i^c A_i, so divergence 0."""
    glob, updates = make_round("ravan", 5, seed=7)
    agg = aggregator("ravan", "ravan")
    out = agg.aggregate(glob, updates)
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    for prefix in RAVAN_LAYERS:
        exact = sum(
            w * dense_delta("ravan", u.state, prefix) for w, u in zip(n / n.sum(), updates, strict=True)
        )
        # float64 throughout, O(1) entries: a few roundings, inside assert_close's float64 defaults,
        # except the float32 storage of the global heads: u of each |B_i| |H_i| |A_i| term.
        b, a = make_bases(16, 14, HEADS, HEAD_RANK, layer_seed(0, prefix), "gram_schmidt")
        h = out[prefix + RAVAN_H].double().abs()
        stored = U32 * torch.einsum("idr,irs,isk->dk", b.double().abs(), h, a.double().abs())
        torch.testing.assert_close(
            dense_delta("ravan", out, prefix), exact, atol=float(stored.max()) + 1e-7, rtol=1e-7
        )
        # Heads in orthonormal bases: the divergence is ||H - T|| / ||T|| with H = T rounded to
        # float32 (u per entry), computed directly (no cancellation).
        assert agg.metrics[f"divergence/{prefix}"] <= U32 * (1 + gamma(HEADS * HEAD_RANK**2, torch.float64))
        torch.testing.assert_close(out[prefix + RAVAN_S], torch.ones(HEADS))


def test_ravan_bases_rank_and_orthonormality():
    """V2 and V3: rank(Delta W) <= h r_h, GS bases orthonormal, same seed gives identical bases."""
    b, a = make_bases(30, 20, HEADS, HEAD_RANK, seed=11, init="gram_schmidt")
    # float64 QR (orthonormal to gamma_30(float64)) rounded to float32 (u per entry): with unit columns
    # each Gram entry is off by at most 2u + u^2 (Cauchy-Schwarz), then summed exactly enough in float64.
    ortho_tol = gamma(2, torch.float32) + gamma(30, torch.float64)
    b_cat = b.transpose(0, 1).reshape(30, -1).double()
    torch.testing.assert_close(
        b_cat.T @ b_cat, torch.eye(HEADS * HEAD_RANK, dtype=torch.float64), atol=ortho_tol, rtol=0
    )
    a_cat = a.reshape(-1, 20).double()
    torch.testing.assert_close(
        a_cat @ a_cat.T, torch.eye(HEADS * HEAD_RANK, dtype=torch.float64), atol=ortho_tol, rtol=0
    )
    b2, a2 = make_bases(30, 20, HEADS, HEAD_RANK, seed=11, init="gram_schmidt")
    assert torch.equal(b, b2) and torch.equal(a, a2)
    delta = torch.einsum("idr,irs,isk->dk", b, torch.randn(HEADS, HEAD_RANK, HEAD_RANK), a)
    assert int(torch.linalg.matrix_rank(delta)) <= HEADS * HEAD_RANK


def test_ravan_partial_heads():
    """V3/V4: a K_c-head upload is K_c r_h^2 scalars per layer; untrained heads keep their value;
    a head trained by some clients is their renormalised weighted mean."""
    glob, full = make_round("ravan", 3, seed=8)
    heads_of = [[0, 1], [1], [0, 1]]  # head 2 and 3 trained by nobody, head 0 by clients 0 and 2
    updates = [
        ClientUpdate(u.client_id, partial_upload(u.state, h), u.num_examples)
        for u, h in zip(full, heads_of, strict=True)
    ]
    assert updates[1].state[RAVAN_LAYERS[0] + RAVAN_H].numel() == 1 * HEAD_RANK**2
    agg = aggregator("ravan", "ravan")
    out = agg.aggregate(glob, updates)
    n = [float(u.num_examples) for u in updates]
    for prefix in RAVAN_LAYERS:
        key = prefix + RAVAN_H
        # Defaults: a weighted mean of <= 3 float32 heads is a handful of roundings (<= 8 u) on each
        # side, well inside float32's default rtol (~22 u).
        torch.testing.assert_close(out[key][2:], glob[key][2:])
        head0 = (n[0] * full[0].state[key][0] + n[2] * full[2].state[key][0]) / (n[0] + n[2])
        torch.testing.assert_close(out[key][0], head0)
        head1 = sum(w * u.state[key][1] for w, u in zip(n, full, strict=True)) / sum(n)
        torch.testing.assert_close(out[key][1], head1)
        assert agg.metrics[f"divergence/{prefix}"] > 1e-3  # head 0 missed client 1's (old) value


def test_ravan_zero_heads_give_zero_update():
    """V4: with H = 0 (and s = 1) the adapter adds nothing; aggregating zeros keeps zeros."""
    glob = {prefix + RAVAN_H: torch.zeros(HEADS, HEAD_RANK, HEAD_RANK) for prefix in RAVAN_LAYERS}
    updates = [ClientUpdate(f"c{i}", {k: v.clone() for k, v in glob.items()}, 1) for i in range(3)]
    out = aggregator("ravan", "ravan").aggregate(glob, updates)
    for prefix in RAVAN_LAYERS:
        assert not dense_delta("ravan", out, prefix).any()


def test_ravan_normal_bases_divergence_uses_their_grams():
    spec = spec_for("ravan", basis_init="normal")
    dims = {prefix: (10, 14) for prefix in RAVAN_LAYERS}
    with pytest.raises(ValueError, match="layer_dims"):
        create("ravan", spec, device="cpu")
    glob, full = make_round("ravan", 3, seed=9)
    updates = [ClientUpdate(u.client_id, partial_upload(u.state, [0, 2]), u.num_examples) for u in full[:2]]
    updates.append(full[2])
    agg = create("ravan", spec, device="cpu", layer_dims=dims)
    out = agg.aggregate(glob, updates)
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    p = n / n.sum()
    for prefix in RAVAN_LAYERS:
        b, a = make_bases(10, 14, HEADS, HEAD_RANK, layer_seed(0, prefix), "normal")

        def delta(h, b=b, a=a):
            return torch.einsum("idr,irs,isk->dk", b.double(), h.double(), a.double())

        key = prefix + RAVAN_H
        client_heads = [full[0].state[key].clone(), full[1].state[key].clone(), full[2].state[key]]
        for h in client_heads[:2]:
            h[[1, 3]] = glob[key][[1, 3]]  # what clients 0 and 1 did not train stays global
        target = sum(w * delta(h) for w, h in zip(p, client_heads, strict=True))
        want = float((delta(out[key]) - target).norm() / target.norm())
        # Computed on differences (no cancellation) in float64: relative error ~gamma_(h^2 r^4) ~ 1e-13,
        # far inside this bound (which tests the definition, not the rounding).
        assert agg.metrics[f"divergence/{prefix}"] == pytest.approx(want, rel=1e-6)


def test_ravan_rejects_bad_head_indices():
    glob, full = make_round("ravan", 2, seed=10)
    bad = partial_upload(full[0].state, [0, 1])
    bad[RAVAN_LAYERS[0] + RAVAN_HEADS] = torch.tensor([0, 9])
    with pytest.raises(AggregationError, match="outside"):
        aggregator("ravan", "ravan").aggregate(glob, [ClientUpdate("c0", bad, 1), full[1]])


# ---- FedRPCA (R2, R3, R5) ---------------------------------------------------------------------------


def test_fedrpca_beta_one_is_fedit():
    """R2: with beta = 1, L + S = M, so FedRPCA is FedAvg on the factors."""
    glob, updates = make_round("lora", 6, seed=12)
    rpca = aggregator("fedrpca", "lora", beta=1.0).aggregate(glob, updates)
    fedit = aggregator("fedit", "lora").aggregate(glob, updates)
    for key in rpca:
        # L + S = M up to PCP's stopping residual (1e-7 of the stacked deltas' norm); each side stored
        # in float32 (u).
        deltas = torch.stack([u.state[key] - glob[key] for u in updates]).double()
        torch.testing.assert_close(rpca[key], fedit[key], atol=PCP_TOL * float(deltas.norm()), rtol=2 * U32)


def test_fedrpca_small_lambda_is_task_arithmetic():
    """R5: when PCP puts everything in S (L = 0, tiny lambda) FedRPCA is X + beta * mean(delta)."""
    glob, updates = make_round("lora", 5, seed=13)
    out = aggregator("fedrpca", "lora", lam=1e-4, beta=3.0, weighting="uniform").aggregate(glob, updates)
    for prefix in LORA_LAYERS:
        for key in (prefix + LORA_A, prefix + LORA_B):
            mean_delta = sum(u.state[key] - glob[key] for u in updates) / len(updates)
            # PCP leaves L ~ 0 up to its stopping residual (scaled by beta = 3); the test's float32 mean
            # of 5 deltas and the method's float32 storage: <= 10 roundings of |glob| + 3 mean|delta|.
            deltas = torch.stack([u.state[key] - glob[key] for u in updates])
            bound = gamma(10, torch.float32) * (glob[key].abs() + 3.0 * deltas.abs().mean(0))
            bound = bound + 3.0 * PCP_TOL * deltas.double().norm()
            assert bool(((out[key] - glob[key] - 3.0 * mean_delta).abs() <= bound).all()), key


def test_fedrpca_identical_spiky_clients_keep_a_sparse_part():
    """R3 (negative result): identical clients with a spiky delta and few clients give S != 0, so
    with beta != 1 FedRPCA does not return their update."""
    glob, updates = make_round("lora", 3, seed=14, identical=True)
    for u in updates:  # one large entry per factor: ||v||_inf / ||v||_2 > lambda sqrt(K)
        for key in u.state:
            if key != DENSE:
                u.state[key] = glob[key].clone()
                u.state[key].view(-1)[0] += 10.0
    out = aggregator("fedrpca", "lora", beta=4.0).aggregate(glob, updates)
    a_key = next(iter(LORA_LAYERS)) + LORA_A
    assert (out[a_key] - updates[0].state[a_key]).abs().max() > 1.0


def test_fedrpca_adaptive_and_scheduled_beta():
    glob, updates = make_round("lora", 4, seed=15)
    agg = aggregator("fedrpca", "lora", beta="adaptive")
    agg.aggregate(glob, updates)
    assert agg.metrics["rpca/beta"] >= 1.0 and agg.metrics["rpca/iterations"] > 1
    assert 1 <= agg.metrics["rpca/rank"] <= len(updates)  # L of a D x K problem has rank <= K
    assert 0 <= agg.metrics["rpca/sparse_share"] <= 1
    seen = []
    scheduled = aggregator("fedrpca", "lora", beta=lambda t: seen.append(t) or 1.0 + t)
    scheduled.aggregate(glob, updates)
    scheduled.aggregate(glob, updates)
    assert seen[0] == 0 and seen[-1] == 1 and scheduled.metrics["rpca/beta"] == 2.0


# ---- FLoRA-NA (N1-N4) and its solvers -------------------------------------------------------------------


def solver_inputs(n_clients: int = 6, seed: int = 16, d: int = 20, k: int = 15, r: int = 3):
    gen = torch.Generator().manual_seed(seed)
    bs = torch.randn(2, n_clients, d, r, generator=gen, dtype=torch.float64)
    as_ = torch.randn(2, n_clients, r, k, generator=gen, dtype=torch.float64)
    pi = torch.rand(n_clients, generator=gen, dtype=torch.float64) + 0.2
    return bs, as_, pi / pi.sum()


def dense_objective(bs, as_, pi, p, q):
    target = torch.einsum("u,ludr,lurk->ldk", pi, bs, as_)
    got = torch.einsum("lu,ludr->ldr", p, bs) @ torch.einsum("lu,lurk->lrk", q, as_)
    return (got - target).square().sum(dim=(1, 2))


def test_trace_form_systems_match_the_dense_normal_equations():
    bs, as_, pi = solver_inputs()
    target = torch.einsum("u,ludr,lurk->ldk", pi, bs, as_)
    a_hat = torch.einsum("u,lurk->lrk", pi.flip(0), as_)
    gram, rhs = p_system(bs, as_, pi, a_hat)
    # float64 sums of <= d k r terms of O(1..100) values: error ~1e-11, inside assert_close's float64
    # defaults (rtol 1e-7, atol 1e-7) by orders of magnitude.
    feats = (bs @ a_hat.unsqueeze(1)).flatten(2)  # vec(B_u A_hat), built densely
    torch.testing.assert_close(gram, feats @ feats.transpose(1, 2))
    torch.testing.assert_close(rhs, torch.einsum("lun,ln->lu", feats, target.flatten(1)))
    b_hat = torch.einsum("u,ludr->ldr", pi.flip(0), bs)
    gram, rhs = q_system(bs, as_, pi, b_hat)
    feats = (b_hat.unsqueeze(1) @ as_).flatten(2)
    torch.testing.assert_close(gram, feats @ feats.transpose(1, 2))
    torch.testing.assert_close(rhs, torch.einsum("lun,ln->lu", feats, target.flatten(1)))


def test_als_starts_at_fedit_is_monotone_and_beats_it():
    """N1 (the objective at p = q = pi is FedIT's rho^2) and N2 (monotone, never above FedIT)."""
    bs, as_, pi = solver_inputs()
    t2 = exact_fro2(bs, as_, pi)
    result = solve_als(bs, as_, pi, t2, sweeps=15)
    fedit = lora_divergence(
        torch.einsum("u,ludr->ldr", pi, bs), torch.einsum("u,lurk->lrk", pi, as_), bs, as_, pi
    )
    torch.testing.assert_close(result.history[0], fedit.square() * t2)
    # Exact by construction: a step's objective is kept only when it is <= the best so far.
    assert (result.history[1:] <= result.history[:-1]).all()
    assert (result.objective < 0.95 * result.history[0]).all()
    torch.testing.assert_close(result.objective, dense_objective(bs, as_, pi, result.p, result.q))


def test_als_is_no_worse_than_the_dense_reference():
    bs, as_, pi = solver_inputs(seed=17)
    als = solve_als(bs, as_, pi, exact_fro2(bs, as_, pi), sweeps=20)
    dense = solve_dense(bs, as_, pi, steps=400)
    assert (dense.objective <= dense.history[0]).all()  # the reference never leaves FedIT's level either
    # ALS stops once a sweep gains less than its ``tol`` (1e-6, relative): it may sit that far above
    # the optimum Adam approaches; each objective is also a trace-form cancellation, off by at most
    # 4 gamma_n ||T||^2 (GRAM_TERMS).
    slack = 8 * gamma(GRAM_TERMS, torch.float64) * exact_fro2(bs, as_, pi)
    assert (als.objective <= dense.objective * (1 + 1e-6) + slack).all()


def test_flora_na_identical_clients_have_zero_divergence_at_init():
    """N3."""
    bs, as_, pi = solver_inputs()
    bs, as_ = bs[:, :1].expand_as(bs).contiguous(), as_[:, :1].expand_as(as_).contiguous()
    t2 = exact_fro2(bs, as_, pi)
    result = solve_als(bs, as_, pi, t2)
    # At FedIT's point the objective x^T G x - 2 b^T x + ||T||^2 is three terms of size ||T||^2 that
    # cancel exactly in exact arithmetic; each is a float64 sum of at most U^2 Gram entries of d r^2
    # terms (U = 6, d = 20, r = 3), so round-off leaves at most 4 gamma_n ||T||^2.
    n = 6**2 * 20 * 3**2
    assert (result.history[0] <= 4 * gamma(n, torch.float64) * t2).all()


@pytest.mark.parametrize("solver", ["als", "dense"])
def test_flora_na_gauges_share_the_product_and_beat_fedit(solver):
    """N4: gauges change the factors, never the product; N2 for the aggregator."""
    glob, updates = make_round("lora", 5, seed=18)
    fedit = aggregator("fedit", "lora")
    fedit.aggregate(glob, updates)
    results = {}
    for gauge in ("sum_q", "balanced", "none"):
        agg = aggregator("flora_na", "lora", solver=solver, gauge=gauge, dense_steps=100)
        results[gauge] = agg.aggregate(glob, updates)
        for prefix in LORA_LAYERS:
            key = f"divergence/{prefix}"
            # Both globals are stored in float32, each divergence moves by up to STORED_DIVERGENCE.
            assert agg.metrics[key] <= fedit.metrics[key] + 2 * STORED_DIVERGENCE + 2 * DIVERGENCE_ABS
    assert_products_close("lora", results["sum_q"], results["balanced"])
    assert_products_close("lora", results["sum_q"], results["none"])
    a_key = next(iter(LORA_LAYERS)) + LORA_A
    assert not torch.allclose(results["sum_q"][a_key], results["balanced"][a_key])


def test_method_options_are_one_dataclass_per_method_and_bad_ones_are_named() -> None:
    from coordinator.aggregators import OptionsError, method_options
    from coordinator.aggregators.fedrpca import FedRPCAOptions

    agg = aggregator("fedrpca", "lora", beta=4.0, max_iter=50)
    assert (
        agg.options
        == FedRPCAOptions(beta=4.0, max_iter=50)
        == method_options("fedrpca", {"beta": 4.0, "max_iter": 50})
    )
    with pytest.raises(
        OptionsError, match=r"method 'fedrpca' has no option 'betta' \(its options: lam, beta, tol"
    ):
        aggregator("fedrpca", "lora", betta=4.0)
    with pytest.raises(OptionsError, match=r"method 'fedit' has no option 'beta' \(its options: none\)"):
        method_options("fedit", {"beta": 1.0})
    with pytest.raises(
        OptionsError, match="method 'fedrpca': beta must be a number, a callable or 'adaptive'"
    ):
        method_options("fedrpca", {"beta": "big"})
    with pytest.raises(OptionsError, match="method 'flora_na': "):  # a value of the wrong type, not a crash
        method_options("flora_na", {"sweeps": "ten"})
