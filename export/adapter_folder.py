"""A trained adapter as a folder any PyTorch user can load: PEFT's files plus what the task needs.

Layout::

    adapter_config.json         PEFT's LoRA config (target modules, rank, alpha; the head in
    adapter_model.safetensors   modules_to_save), and the trained tensors, head included
    fleetlora.json              model name, label names, sequence length, model seed, adapter spec,
                                and where it came from (run, method, round)
    infer.pte                   optional: an ExecuTorch inference program with the adapter merged
                                (inputs input_ids, attention_mask of shape (batch, seq_len), batch >= 2)

``PeftModel.from_pretrained(build_model(model, len(labels), seed)[0], folder)`` rebuilds the trained
classifier (the base model's own head is replaced by the saved one); :func:`load_adapter_folder`
does exactly that, and :func:`predict` turns texts into label names and probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.adapters import save_peft_adapter
from export.spec import AdapterSpec

FORMAT = 1
INFO_JSON = "fleetlora.json"
INFER_PTE = "infer.pte"


class AdapterFolderError(ValueError):
    """A folder that is not an exported adapter, or one this installation cannot load."""


@dataclass(frozen=True)
class AdapterInfo:
    """The contents of ``fleetlora.json``."""

    model: str
    labels: tuple[str, ...]
    seq_len: int
    model_seed: int
    spec: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # run, method, round, state folder

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "labels": list(self.labels)}

    @classmethod
    def read(cls, folder: Path) -> AdapterInfo:
        path = folder / INFO_JSON
        if not path.is_file():
            raise AdapterFolderError(f"{folder} is not an exported adapter: no {INFO_JSON}")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise AdapterFolderError(f"{path}: format {d.get('format')!r}, this version reads {FORMAT}")
            return cls(
                str(d["model"]), tuple(str(x) for x in d["labels"]), int(d["seq_len"]), int(d["model_seed"]),
                dict(d["spec"]), dict(d.get("source", {})),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, AdapterFolderError):
                raise
            raise AdapterFolderError(f"{path} is malformed: {e!r}") from e


def write_adapter_folder(model: nn.Module, info: AdapterInfo, out: str | Path) -> Path:
    """Save a LoRA model (adapter and head) with PEFT, and ``fleetlora.json`` beside it."""
    folder = save_peft_adapter(model, out)
    (folder / INFO_JSON).write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")
    return folder


def load_adapter_folder(folder: str | Path) -> tuple[nn.Module, Any, AdapterInfo]:
    """``(model, tokenizer, info)``: the base model of ``fleetlora.json`` with the PEFT adapter loaded."""
    from peft import PeftModel

    from export.models import ModelError, build_model

    path = Path(folder)
    info = AdapterInfo.read(path)
    AdapterSpec.from_dict(info.spec)  # a spec this version understands
    try:
        base, tokenizer = build_model(info.model, len(info.labels), seed=info.model_seed)
    except ModelError as e:
        raise AdapterFolderError(f"{path}: {e}") from e
    model = PeftModel.from_pretrained(base, str(path))
    model.eval()
    return model, tokenizer, info


@torch.no_grad()
def predict(
    model: nn.Module, tokenizer: Any, info: AdapterInfo, texts: Sequence[str], batch_size: int = 64
) -> list[tuple[str, float]]:
    """The most probable label of each text and its probability (``batch_size`` texts at a time)."""
    out: list[tuple[str, float]] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]), max_length=info.seq_len, truncation=True,
            padding="max_length", return_tensors="pt",
        )  # fmt: skip
        probs = model(batch["input_ids"], batch["attention_mask"]).softmax(-1)
        best = probs.argmax(-1)
        out += [(info.labels[int(i)], float(probs[n, i])) for n, i in enumerate(best)]
    return out
