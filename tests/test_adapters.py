"""Adapters on a tiny BERT (and the real MiniLM): injection, Ravan invariants V2-V4,
state round trips, merging, PEFT folders, heterogeneous ranks and head subsets."""

from __future__ import annotations

import pytest
import torch
from tolerances import TINY_BERT_FORWARD_TOL, gamma

from export.adapters import (
    attach,
    lora_pad,
    lora_rank_slice,
    merge,
    ravan_download,
    ravan_upload,
    save_peft_adapter,
    target_module_names,
    train_heads,
)
from export.models import build_model
from export.ravan import RavanLinear, make_bases, ravan_layers
from export.spec import AdapterSpec, SpecError, head_rank_for_budget
from export.state import StateError, layout, load_trainable_state, num_scalars, trainable_state

pytestmark = pytest.mark.numerical  # compares floats across code paths: rerun under other CPU capabilities


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def fresh(spec: AdapterSpec) -> torch.nn.Module:
    model, _ = build_model("tiny-bert", 3, seed=0)
    return attach(model, spec)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", ["lora", "ravan"])
def test_fresh_adapter_leaves_the_function_unchanged(family: str, batch: dict) -> None:
    base, _ = build_model("tiny-bert", 3, seed=0)
    with torch.no_grad():
        expected = base(batch["input_ids"], batch["attention_mask"])
    model = fresh(AdapterSpec(family=family, rank=4))
    with torch.no_grad():
        got = model(batch["input_ids"], batch["attention_mask"])
    # Bit-exact by design: a fresh adapter adds exact zeros (B = 0, H = 0) to the same base kernels' output.
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["lora", "ravan"])
def test_only_adapter_and_head_train(family: str) -> None:
    model = fresh(AdapterSpec(family=family, rank=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names
    for n in names:
        assert ("lora_" in n) or ("ravan_" in n) or ("classifier" in n), n
    lay = layout(trainable_state(model))
    assert len(lay.lora if family == "lora" else lay.ravan) == 4  # query + value in 2 layers


def test_layers_restrict_targets() -> None:
    model, _ = build_model("tiny-bert", 3)
    names = target_module_names(model, AdapterSpec(layers=(1,)))
    assert names == [
        "encoder.encoder.layer.1.attention.self.query",
        "encoder.encoder.layer.1.attention.self.value",
    ]
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        target_module_names(model, AdapterSpec(target_modules=("nonexistent",)))


@pytest.mark.parametrize("family", ["lora", "ravan"])
def test_same_spec_gives_bit_identical_adapters(family: str) -> None:
    spec = AdapterSpec(family=family, rank=4, seed=7)
    a, b = trainable_state(fresh(spec)), trainable_state(fresh(spec))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if family == "ravan":  # V3: the frozen bases too
        la, lb = ravan_layers(fresh(spec)), ravan_layers(fresh(spec))
        for name in la:
            assert torch.equal(la[name].ravan_A, lb[name].ravan_A)
            assert torch.equal(la[name].ravan_B, lb[name].ravan_B)
    other = trainable_state(fresh(spec.with_(seed=8)))
    if family == "lora":
        assert any(not torch.equal(a[k], other[k]) for k in a if "lora_A" in k)


def test_gram_schmidt_bases_are_orthonormal_and_rank_bounded() -> None:
    b, a = make_bases(40, 30, heads=3, head_rank=5, seed=1, init="gram_schmidt")
    b_cat = b.transpose(0, 1).reshape(40, 15)
    a_cat = a.reshape(15, 30)
    # float64 QR rounded to float32 (u per entry), Gram entries summed in float32 over 40 (30) terms of
    # unit columns: gamma_(40 + 2) by Cauchy-Schwarz.
    ortho_tol = gamma(40 + 2, torch.float32)
    torch.testing.assert_close(b_cat.T @ b_cat, torch.eye(15), atol=ortho_tol, rtol=0)
    torch.testing.assert_close(a_cat @ a_cat.T, torch.eye(15), atol=ortho_tol, rtol=0)
    layer = RavanLinear(torch.nn.Linear(30, 40), 3, 5, seed=1, init="gram_schmidt", dtype=torch.float32)
    with torch.no_grad():
        layer.ravan_H.copy_(torch.randn(3, 5, 5))
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 15  # V2: rank <= h r_h
    with pytest.raises(ValueError, match="do not fit"):
        make_bases(10, 10, heads=3, head_rank=5, seed=1, init="gram_schmidt")


def test_ravan_forward_matches_dense_sum_of_heads() -> None:
    layer = RavanLinear(torch.nn.Linear(16, 12), 3, 2, seed=3, init="normal", dtype=torch.float32)
    with torch.no_grad():
        layer.ravan_H.copy_(torch.randn(3, 2, 2))
        layer.ravan_s.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(5, 7, 16)
    delta = layer.delta_weight().detach()
    expected = layer.base(x) + x @ delta.T
    # Both sides sum 16 inputs times (W + the heads' 3 x 2 x 2 basis products) in float32, in different
    # orders: each off by gamma_(16 + 12 + 2) sum|terms| (tests/tolerances.py).
    w = layer.base.weight.detach().abs()
    b, a = layer.ravan_B.detach().abs(), layer.ravan_A.detach().abs()
    heads = layer.ravan_s.detach().abs().view(-1, 1, 1) * layer.ravan_H.detach().abs()
    terms = x.abs() @ (w + b @ torch.block_diag(*heads) @ a).T + layer.base.bias.detach().abs()
    got = layer(x).detach()
    assert bool(((got - expected).abs() <= 2 * gamma(16 + 12 + 2, torch.float32) * terms).all())


def test_head_rank_matches_lora_budget() -> None:
    # METHODS.md 2.1 example: d = k = 768, r = 8, h = 4 -> r_h = 55
    assert head_rank_for_budget(8, 768, 768, 4) == 55
    spec = AdapterSpec(family="ravan", rank=8, heads=4)
    r_h = spec.ravan_head_rank(384, 384)
    assert 4 * r_h * r_h <= 8 * (384 + 384) < 4 * (r_h + 1) ** 2


def test_training_a_subset_of_heads_changes_only_those(batch: dict) -> None:
    model = fresh(AdapterSpec(family="ravan", rank=4, heads=4))
    train_heads(model, [1, 3])
    before = trainable_state(model)
    loss = torch.nn.functional.cross_entropy(
        model(batch["input_ids"], batch["attention_mask"]), batch["labels"]
    )
    loss.backward()
    for name, layer in ravan_layers(model).items():
        g = layer.ravan_H.grad
        assert g is not None and g.abs()[[1, 3]].sum() > 0, name
        assert torch.count_nonzero(g[[0, 2]]) == 0, name
    with pytest.raises(ValueError, match="out of range"):
        train_heads(model, [9])
    up = ravan_upload(before, heads=[3, 1])
    h_keys = [k for k in up if k.endswith("ravan_H")]
    assert all(up[k].shape[0] == 2 for k in h_keys)
    assert all(torch.equal(up[k.replace("ravan_H", "ravan_heads")], torch.tensor([1, 3])) for k in h_keys)
    # V3: uploaded scalars = K_c r_h^2 per layer (plus the dense head)
    r_h = ravan_layers(model)["encoder.encoder.layer.0.attention.self.query"].head_rank
    assert sum(up[k].numel() for k in h_keys) == len(h_keys) * 2 * r_h * r_h


def test_ravan_upload_folds_scales_and_download_resets_them() -> None:
    model = fresh(AdapterSpec(family="ravan", rank=4, heads=2))
    perturb(model)
    state = trainable_state(model)
    up = ravan_upload(state)
    for key in [k for k in state if k.endswith("ravan_H")]:
        s = state[key.replace("ravan_H", "ravan_s")]
        torch.testing.assert_close(up[key], s.view(-1, 1, 1) * state[key])
    assert not any(k.endswith("ravan_s") for k in up)
    down = ravan_download({k: v for k, v in up.items()})
    assert all(torch.equal(down[k], torch.ones(2)) for k in down if k.endswith("ravan_s"))


@pytest.mark.parametrize("family", ["lora", "ravan"])
def test_state_round_trip_and_strict_checks(family: str) -> None:
    src = fresh(AdapterSpec(family=family, rank=4))
    perturb(src)
    state = trainable_state(src)
    dst = fresh(AdapterSpec(family=family, rank=4))
    load_trainable_state(dst, state)
    for k, v in trainable_state(dst).items():
        assert torch.equal(v, state[k])
    key = next(iter(state))
    with pytest.raises(StateError, match="lacks"):
        load_trainable_state(dst, {k: v for k, v in state.items() if k != key})
    with pytest.raises(StateError, match="does not train"):
        load_trainable_state(dst, {**state, "bogus.weight": torch.zeros(1)})
    with pytest.raises(StateError, match="shape"):
        load_trainable_state(dst, {**state, key: torch.zeros(99)})
    # nothing was written by the failed loads
    for k, v in trainable_state(dst).items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("family", ["lora", "ravan"])
def test_merge_gives_the_same_function(family: str, batch: dict) -> None:
    model = fresh(AdapterSpec(family=family, rank=4))
    perturb(model)
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
        merged = merge(model)
        got = merged(batch["input_ids"], batch["attention_mask"])
    # Merging changes the summation order of every adapted layer: tiny-bert's forward rounding bound.
    torch.testing.assert_close(got, expected, atol=TINY_BERT_FORWARD_TOL, rtol=0)
    assert not any("lora_" in n or "ravan_" in n for n, _ in merged.named_parameters())


def test_peft_folder_loads_with_peft(tmp_path, batch: dict) -> None:
    from peft import PeftModel

    model = fresh(AdapterSpec(rank=4))
    perturb(model)
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
    folder = save_peft_adapter(model, tmp_path / "adapter")
    base, _ = build_model("tiny-bert", 3, seed=0)
    loaded = PeftModel.from_pretrained(base, str(folder))
    with torch.no_grad():
        got = loaded(batch["input_ids"], batch["attention_mask"])
    # peft's forward may order the adapter's sums differently: tiny-bert's forward rounding bound.
    torch.testing.assert_close(got, expected, atol=TINY_BERT_FORWARD_TOL, rtol=0)


def test_lower_rank_is_exact_after_padding(batch: dict) -> None:
    model = fresh(AdapterSpec(rank=4))
    perturb(model)
    full = trainable_state(model)
    low = lora_rank_slice(full, 2)
    assert all(low[a].shape[0] == 2 and low[b].shape[1] == 2 for a, b in layout(low).lora.values())
    padded = lora_pad(low, full)
    load_trainable_state(model, padded)
    loss = torch.nn.functional.cross_entropy(
        model(batch["input_ids"], batch["attention_mask"]), batch["labels"]
    )
    loss.backward()
    for name, p in model.named_parameters():  # the padding gets no gradient: a true rank-2 LoRA
        if name.endswith("lora_A.default.weight"):
            assert torch.count_nonzero(p.grad[2:]) == 0
        if name.endswith("lora_B.default.weight"):
            assert torch.count_nonzero(p.grad[:, 2:]) == 0


def test_ffa_lora_freezes_a() -> None:
    model = fresh(AdapterSpec(rank=4, freeze_a=True))
    state = trainable_state(model)
    assert not any("lora_A" in k for k in state)
    assert len(layout(state).lora) == 4


def test_spec_json_round_trip_and_validation() -> None:
    spec = AdapterSpec(family="ravan", target_modules=("query",), layers=(4, 5), heads=3, seed=9)
    assert AdapterSpec.from_json(spec.to_json()) == spec
    assert spec.digest() == AdapterSpec.from_json(spec.to_json()).digest()
    assert spec.digest() != spec.with_(seed=10).digest()
    for bad in (
        {"family": "dora"},
        {"rank": 0},
        {"alpha": float("nan")},
        {"dtype": "int8"},
        {"target_modules": ()},
    ):
        with pytest.raises(SpecError):
            AdapterSpec(**bad)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="unknown"):
        AdapterSpec.from_dict({"rank": 4, "bogus": 1})
    with pytest.raises(SpecError, match="JSON"):
        AdapterSpec.from_json("{not json")


def test_minilm_lora_and_ravan_at_the_same_budget() -> None:
    counts = {}
    for family in ("lora", "ravan"):
        model, _ = build_model("minilm", 8)
        model = attach(model, AdapterSpec(family=family, rank=8, heads=4, trainable_extra=()))
        state = trainable_state(model)
        counts[family] = num_scalars(ravan_upload(state) if family == "ravan" else state)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        assert frozen > 22_000_000
    # LoRA r=8 on query+value of 6 layers: 12 * 8 * (384 + 384) scalars
    assert counts["lora"] == 12 * 8 * 768
    assert 0.9 * counts["lora"] <= counts["ravan"] <= counts["lora"]
