"""The native client (native/, C++): the envelope's test vectors, training parity with the Python
``ExecuTorchTrainer``, the aarch64 build under qemu, and what ``fleetlora flash --runtime native`` writes.

The fleets over a real mosquitto are in tests/test_native_fleet.py. Every test here skips, saying what
is missing, where the compiler or the libraries are absent (.ci/run installs them).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from deploy_helpers import BATCH, spec_for
from native_helpers import HOST, binary, flash_native, needs_native, random_batches, run_native, tiny_bundle

from devices import native
from edge_client.executorch_trainer import ExecuTorchTrainer
from edge_client.plan_table import PlanRow
from edge_client.trainer import OptimizerConfig
from export.spec import AdapterSpec
from export.state import BASE_VERSION
from protocol.wire import decode_update
from protocol.wire_vectors import FOLDER, INDEX

pytestmark = [needs_native, pytest.mark.executorch]
pytest.importorskip("executorch.extension.training", reason="executorch is not installed")

STEPS = 10
OPT = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01)


@dataclass(frozen=True)
class _Steps:
    local_steps: int


def test_the_native_client_reaches_every_envelope_vector_verdict() -> None:
    done = run_native(["check-vectors", str(FOLDER)])
    cases = json.loads((FOLDER / INDEX).read_text())["cases"]
    assert f"vectors: {len(cases)} checked, 0 mismatched" in done.stdout, done.stdout


def test_python_verifies_a_native_signed_update_whatever_its_float_printing(tmp_path: Path) -> None:
    """nlohmann prints compute_s with 17 digits where Python prints 16: schema 2 does not care."""
    out = tmp_path / "update.env"
    run_native(["sign-update", "--vectors", str(FOLDER), "--out", str(out)])
    index = json.loads((FOLDER / INDEX).read_text())
    receiver = index["receiver"]
    got = decode_update(
        out.read_bytes(), expected_run=receiver["run"], expected_client=receiver["client"],
        rounds=set(receiver["rounds"]), spec=AdapterSpec.from_dict(index["spec_json"]),
        template={k: tuple(v) for k, v in index["template"].items()},
        key=bytes.fromhex(index["keys"]["device"]),
    )  # fmt: skip
    assert got.header.signed and got.header.compute_s == 151.70637073051861
    assert b'"compute_s":151.70637073051861' in out.read_bytes()  # not Python's 151.7063707305186


# -- training parity --------------------------------------------------------------------------------

RAVAN = AdapterSpec(family="ravan", target_modules=("query", "value"), rank=4, heads=2, seed=0)
PARITY = {
    # name: (spec, bundle options, Ravan heads trained, with a base delta)
    "lora-portable": (spec_for("fedit"), {}, None, False),
    "lora-xnnpack": (spec_for("fedit"), {"xnnpack": True}, None, False),
    "ravan-one-head": (RAVAN, {}, [1], False),
    "lora-base-delta": (spec_for("fedit"), {"base_delta": True}, None, True),
}


@pytest.mark.parametrize("case", PARITY)
def test_native_training_matches_the_python_executorch_trainer(case: str, tmp_path: Path) -> None:
    """Same bundle, start adapter and batches; 10 SGD steps (momentum 0.9, weight decay 0.01).

    Tolerance 1e-6: both sides run the same program on the same kernel libraries (the wheel's .so
    files) with the same inputs, so forward and backward are the same float32 operations in the same
    order; only the SGD update is code of its own (native/src/trainer.cpp), written to round as the
    runtime's optimizer does (each op evaluated in double, rounded once to float32). Were it to round
    differently, an update would differ by at most one float32 rounding, eps/2 = 6e-8 relative to a
    parameter (|p| < 1 for these adapters), so 10 steps stay within 10 x 6e-8 = 6e-7 < 1e-6, and the
    losses move by the same order through the next forward passes. (Measured here: bit-identical.)
    """
    spec, options, heads, with_delta = PARITY[case]
    opt = OPT if heads is None else dataclasses.replace(OPT, weight_decay=0.0)
    bundle = tiny_bundle(spec, **options)
    batches = random_batches(tmp_path / "batches.safetensors", STEPS)
    trainer = ExecuTorchTrainer.from_bundle(bundle, opt)
    g = torch.Generator().manual_seed(1)
    start = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in trainer.get_trainable().items()}
    safetensors.torch.save_file(start, tmp_path / "start.safetensors")
    trainer.set_trainable(start)
    args = ["train-check", "--bundle", str(bundle.path), "--batches", str(tmp_path / "batches.safetensors")]
    args += ["--start", str(tmp_path / "start.safetensors"), "--out", str(tmp_path / "out.safetensors")]
    args += ["--lr", str(opt.lr), "--momentum", str(opt.momentum), "--weight-decay", str(opt.weight_decay)]
    if heads is not None:
        trainer.select_heads(heads)
        args += ["--heads", ",".join(map(str, heads))]
    if with_delta:
        layers = {name: (d, k) for name, (d, k) in bundle.info.base_delta.items()}
        assert layers, "the bundle was exported without base-delta inputs"
        dense = {name: 0.01 * torch.randn(shape, generator=g) for name, shape in layers.items()}
        safetensors.torch.save_file(dense, tmp_path / "delta.safetensors")
        args += ["--base-delta", str(tmp_path / "delta.safetensors")]
        delta = {f"{name}.base_delta": t for name, t in dense.items()}
        with trainer.base_delta({**delta, BASE_VERSION: torch.tensor(1)}):
            metrics = trainer.train(batches, _Steps(STEPS))
    else:
        metrics = trainer.train(batches, _Steps(STEPS))
    run_native(args)
    got = safetensors.torch.load_file(tmp_path / "out.safetensors")
    want = trainer.get_trainable()
    assert torch.allclose(got.pop("losses"), torch.tensor(metrics.losses), rtol=0, atol=1e-6)
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.allclose(got[name], t, rtol=0, atol=1e-6), name
    moved = max(float((want[k] - start[k]).abs().max()) for k in want)
    assert moved > 1e-3, "training did not move the adapter: the comparison would prove nothing"
    if heads is not None:  # without weight decay the masked head never moves, on both sides
        h_key = next(k for k in want if k.endswith(".ravan_H"))
        assert torch.equal(got[h_key][0], start[h_key][0]) and not torch.equal(got[h_key][1], start[h_key][1])


# -- aarch64 ----------------------------------------------------------------------------------------

QEMU = shutil.which("qemu-aarch64")
AARCH64 = native.status("aarch64")


@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (apt-get install qemu-user)")
@pytest.mark.skipif(not AARCH64.available, reason=AARCH64.reason())
def test_the_aarch64_build_trains_one_step_under_qemu(tmp_path: Path) -> None:
    """Cross-compiled against the aarch64 executorch wheel; one step matches the x86-64 Python trainer.

    Other kernels (NEON, not AVX) sum in another order: a float32 sum of K terms may differ by up to
    K x eps x sum|terms|, K <= 4 x hidden = 512 for tiny-BERT, i.e. ~6e-5 relative at worst. After one
    step of lr 0.05 the adapter differs by at most lr x that x |gradient| (<< 1e-5); the bounds checked
    are 1e-4 relative on the loss and 1e-5 on the adapter.
    """
    try:
        folder = native.build("aarch64", log=lambda _: None)
    except native.NativeError as e:
        pytest.skip(f"no aarch64 build here: {e}")
    bundle = tiny_bundle()
    batches = random_batches(tmp_path / "batches.safetensors", 1)
    trainer = ExecuTorchTrainer.from_bundle(bundle, OPT)
    start = trainer.get_trainable()
    metrics = trainer.train(batches, _Steps(1))
    sysroot = "/usr/aarch64-linux-gnu"  # the cross toolchain's C library, which qemu runs the binary with
    out = tmp_path / "out.safetensors"
    args = ["train-check", "--bundle", str(bundle.path), "--batches", str(tmp_path / "batches.safetensors")]
    args += [
        "--out",
        str(out),
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--weight-decay",
        "0.01",
        "--threads",
        "1",
    ]
    done = run_native(args, exe=folder / native.BINARY, prefix=[str(QEMU), "-L", sysroot])
    assert "trained 1 steps" in done.stdout
    got = safetensors.torch.load_file(out)
    assert abs(float(got.pop("losses")[0]) - metrics.losses[0]) <= 1e-4 * abs(metrics.losses[0])
    want = trainer.get_trainable()
    for name, t in want.items():
        assert torch.allclose(got[name], t, rtol=0, atol=1e-5), name
    assert any(not torch.equal(want[k], start[k]) for k in want)


# -- flash ------------------------------------------------------------------------------------------


def test_flash_native_writes_a_folder_that_needs_no_python(tmp_path: Path) -> None:
    bundle = tiny_bundle()
    binary()  # built (or reused) before flash looks for it
    folder = flash_native(bundle, tmp_path / "dev", "dev0", "mqtt://127.0.0.1:1883", "0/3")
    script = (folder / "run-client.sh").read_text()
    assert "exec ./bin/fleetlora-client run --config client.toml" in script
    assert "python3" not in script and "-m fleetlora" not in script
    names = {p.name for p in (folder / "bin").iterdir()}
    assert {native.BINARY, "libexecutorch.so", "libexecutorch_kernels_optimized.so"} <= names
    assert {"libexecutorch_threadpool.so", "libexecutorch_backend_xnnpack.so", "libmosquitto.so.1"} <= names
    readelf = subprocess.run(
        ["readelf", "-d", str(folder / "bin" / native.BINARY)], capture_output=True, text=True
    )
    assert "[$ORIGIN]" in readelf.stdout
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["device"] == "pixel_8" and plan["spec"] == bundle.spec.digest() and plan["rows"]
    data = safetensors.torch.load_file(folder / "data.safetensors")
    assert data["input_ids"].shape == (24, bundle.info.seq_len) and int(data["labels"].max()) < 6
    toml = (folder / "client.toml").read_text()
    assert 'state_file = "state/progress.json"' in toml and 'id = "dev0"' in toml


def test_flash_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetlora.cli import main as cli_main

    bundle = tiny_bundle()
    dest = tmp_path / "dev"
    argv = [
        "flash",
        "--profile",
        "pixel_8",
        "--run",
        "demo",
        "--client-id",
        "dev0",
        "--dataset",
        "trec6",
        "--bundle",
        str(bundle.path),
        "--target",
        f"local:{dest}",
        "--dry-run",
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert (
        f"runtime: native, {HOST}" in out and "would copy" in out and "plan.json" in out and not dest.exists()
    )
    adb = ["flash", "--profile", "pixel_8", "--run", "demo", "--client-id", "dev0", "--dataset", "trec6"]
    adb += ["--bundle", str(bundle.path), "--target", "adb:/data/local/tmp/fl"]
    assert cli_main([*adb, "--runtime", "native", "--dry-run"]) == 2
    assert "Android build is not made here" in capsys.readouterr().err


def test_a_tampered_bundle_is_refused_with_the_file_named_and_nothing_runs(tmp_path: Path) -> None:
    bundle = tiny_bundle()
    binary()
    folder = flash_native(bundle, tmp_path / "dev", "dev0", "mqtt://127.0.0.1:9", "0/3")
    pte = folder / "bundle" / "train.pte"
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pte.write_bytes(bytes(data))
    done = subprocess.run([str(folder / "run-client.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "train.pte does not match its sha256 in the manifest (altered?)" in done.stderr, done.stderr
    assert not (folder / "state" / "progress.json").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"batch_size": BATCH * 4}, "exceeds the bundle program's largest batch"),
        ({"local_steps": -1}, "local_steps must be >= 0"),
        ({"unknown_key": 1}, "unknown_key: unknown key"),
    ],
)
def test_a_bad_client_toml_is_refused_with_the_key_named(edit: dict, message: str, tmp_path: Path) -> None:
    bundle = tiny_bundle()
    binary()
    folder = flash_native(bundle, tmp_path / "dev", "dev0", "mqtt://127.0.0.1:9", "0/3")
    toml = folder / "client.toml"
    kept = [line for line in toml.read_text().splitlines(keepends=True) if line.split(" =")[0] not in edit]
    toml.write_text("".join(kept) + "".join(f"{k} = {v}\n" for k, v in edit.items()))
    done = subprocess.run([str(folder / "run-client.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and message in done.stderr, done.stderr


def test_the_native_plan_is_the_python_rule(tmp_path: Path) -> None:
    """The native client's plan for a round (table lookup, SHA-256 head draw) is what Python computes."""
    from edge_client.budget import DeviceProfile
    from edge_client.plan_table import lookup, plan_table
    from edge_client.planner import draw_heads, model_cost
    from export.adapters import attach
    from export.models import build_model

    bundle = tiny_bundle(RAVAN)
    model, _ = build_model("tiny-bert", 6)
    cost = model_cost(attach(model, RAVAN), RAVAN, bundle.info.seq_len)
    cost = dataclasses.replace(cost, train_flops_per_example=cost.train_flops_per_example * 300)
    # A device whose uplink limits its heads: steps, batch and heads all change over the first seconds.
    slow = DeviceProfile("slow-uplink", "sbc", train_gflops=100.0, train_memory_mb=4096.0, uplink_mbps=0.05,
                         downlink_mbps=10.0, availability=1.0, dropout=0.0)  # fmt: skip
    table = plan_table(slow, cost, RAVAN, local_steps=0, max_batch=BATCH)
    (tmp_path / "plan.json").write_text(json.dumps(table))
    rows = [PlanRow(**r) for r in table["rows"]]
    assert len({r.heads for r in rows}) > 1, "a table where the heads never change would test little"
    for left in [0.5, *(r.min_round_s + 0.01 for r in rows)]:
        for client, round in (("dev0", 1), ("pi-7", 12)):
            args = ["plan", "--plan", str(tmp_path / "plan.json"), "--bundle", str(bundle.path)]
            args += ["--client", client, "--round", str(round), "--time-left", str(left)]
            got = json.loads(run_native(args).stdout)
            row = lookup(rows, left)
            heads = (
                list(draw_heads(client, round, RAVAN.heads, row.heads)) if row.heads < RAVAN.heads else None
            )
            assert got == {"local_steps": row.local_steps, "batch_size": row.batch_size, "heads": heads}
