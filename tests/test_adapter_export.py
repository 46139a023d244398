"""The trained model comes out: a coordinator state folder -> a PEFT adapter folder that
``PeftModel.from_pretrained`` loads, label names, an inference program, and ``fleetlora predict``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from deploy_helpers import NUM_CLASSES, adapted, make_service, spec_for

from coordinator.adapter_export import ExportError, export_adapter
from coordinator.service import RoundService
from coordinator.store import RoundStore
from export.adapter_folder import load_adapter_folder, predict
from export.models import build_model
from export.state import load_trainable_state
from fleetlora.cli import main as cli_main
from protocol.topics import up_topic
from protocol.wire import encode_update

LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TASK = {"model": "tiny-bert", "num_classes": NUM_CLASSES, "labels": LABELS, "seq_len": 16}
TEXTS = ["Who wrote Hamlet?", "How far is the moon?", "What does NASA stand for?"]


def run_rounds(service: RoundService, rounds: int) -> None:
    """``rounds`` rounds of one client whose update moves every tensor (by a round-dependent step)."""
    service.start()
    for r in range(1, rounds + 1):
        g = torch.Generator().manual_seed(r)
        state = {
            k: v.cpu() + 0.05 * torch.randn(v.shape, generator=g) for k, v in service.global_state.items()
        }
        update = encode_update(
            state, run="t", round=r, client="dev0", method=service.config.method, spec=service.spec,
            num_examples=10, local_steps=1, compute_s=0.1, rank=service.spec.rank,
        )  # fmt: skip
        assert service.receive([(up_topic("t", "dev0"), update)]) == 1
        assert service.tick() is not None


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    run_rounds(make_service("fedit", tmp_path / "state", ("dev0",), rounds=2, **TASK), 2)
    return tmp_path / "state"


def model_with(global_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = adapted(spec_for("fedit"))
    load_trainable_state(model, global_state)
    return model.eval()


def logits(model: torch.nn.Module, tokenizer: object, texts: list[str] = TEXTS) -> torch.Tensor:
    batch = tokenizer(texts, max_length=16, truncation=True, padding="max_length", return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def test_the_exported_folder_loads_with_peft_and_predicts_like_the_global(
    state_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    done = export_adapter(state_dir, tmp_path / "adapter")
    assert done.round == 2 and done.rounds_kept == (0, 1, 2)  # every round's global is kept
    base, tokenizer = build_model("tiny-bert", NUM_CLASSES, seed=0)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()  # as the README shows
    expected = model_with(load_file(state_dir / "global-000003.safetensors"))
    # Exact: one process, the same peft modules holding the same tensors, the same inputs: the same
    # kernels run on the same operands (no tolerance to derive; any CPU computes both alike).
    torch.testing.assert_close(logits(peft_model, tokenizer), logits(expected, tokenizer), rtol=0, atol=0)
    model, tokenizer, info = load_adapter_folder(tmp_path / "adapter")
    assert info.labels == LABELS and info.source["round"] == 2 and info.source["method"] == "fedit"
    labels = [LABELS[i] for i in logits(expected, tokenizer).argmax(-1)]
    assert [label for label, _ in predict(model, tokenizer, info, TEXTS)] == labels
    export_adapter(state_dir, tmp_path / "round1", round=1)
    first = model_with(load_file(state_dir / "global-000002.safetensors"))
    again, _, _ = load_adapter_folder(tmp_path / "round1")  # exact, as above
    torch.testing.assert_close(logits(again, tokenizer), logits(first, tokenizer), rtol=0, atol=0)
    with pytest.raises(ExportError, match=r"keeps the global after rounds \[0, 1, 2\], not after 7"):
        export_adapter(state_dir, tmp_path / "x", round=7)


def test_the_cli_exports_lists_and_predicts(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapter"
    assert cli_main(["export-adapter", "--state", str(state_dir), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == ["round 0: -", "round 1: -", "round 2: -"]
    assert cli_main(["export-adapter", "--state", str(state_dir), "--out", str(out)]) == 0
    assert "the global after round 2 of run 't' (fedit)" in capsys.readouterr().out
    assert cli_main(["predict", "--adapter", str(out), TEXTS[0], TEXTS[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in LABELS for line in lines)
    assert all(
        0 < float(line.split("\t")[1]) <= 1 and line.endswith(text)
        for line, text in zip(lines, TEXTS[:2], strict=True)
    )
    assert cli_main(["export-adapter", "--state", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "is not a coordinator state folder (no state.json)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "rounds", "task", "message"),
    [
        ("fedit", 0, {}, "does not record the model and label names"),
        ("ravan", 0, TASK, "a ravan adapter is not a PEFT (LoRA) adapter"),
        ("fedsa_lora", 0, TASK, "fedsa_lora keeps part of the adapter on each device"),
        ("flora", 1, TASK, "flora changed the frozen base; a PEFT adapter cannot carry that change"),
    ],
)
def test_what_peft_cannot_carry_is_refused_with_the_reason(
    tmp_path: Path, method: str, rounds: int, task: dict, message: str
) -> None:
    service = make_service(method, tmp_path / "state", ("dev0",), rounds=2, **task)
    if rounds:
        run_rounds(service, rounds)
    else:
        service.start()
    with pytest.raises(ExportError, match=re.escape(message)):
        export_adapter(tmp_path / "state", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_the_state_folder_keeps_the_last_n_globals_when_told(tmp_path: Path) -> None:
    service = make_service("fedit", tmp_path / "state", ("dev0",), rounds=3, **TASK)
    service.store = RoundStore(tmp_path / "state", sync=False, keep_globals=2)
    run_rounds(service, 3)
    assert sorted(service.store.globals()) == [3, 4]


@pytest.mark.executorch
def test_the_inference_program_has_the_adapter_merged(state_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("executorch.extension.pybindings.portable_lib")
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    export_adapter(state_dir, tmp_path / "adapter", infer_pte=True)
    model, tokenizer, _ = load_adapter_folder(tmp_path / "adapter")
    program = _load_for_executorch_from_buffer((tmp_path / "adapter" / "infer.pte").read_bytes())
    batch = tokenizer(TEXTS, max_length=16, truncation=True, padding="max_length", return_tensors="pt")  # type: ignore[operator]
    got = program.forward((batch["input_ids"], batch["attention_mask"]))[0]
    # Merged weights (W + s B A, rounded once) against the unmerged sum: float32 rounding of the sums.
    torch.testing.assert_close(got, logits(model, tokenizer), rtol=1e-5, atol=1e-5)
