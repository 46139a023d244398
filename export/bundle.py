"""The bundle: everything a device needs to train, built once, verified on load.

A bundle is a folder::

    train.pte          training program, frozen base inside (inputs: input_ids, attention_mask, labels,
                       and one dense base delta per layer of ``base_delta`` when exported with one)
    adapter.ptd        the initial trainable tensors, keyed like export.state.trainable_state(model)
    infer.pte          forward-only program with the adapter merged (inputs: input_ids, attention_mask)
    adapter_spec.json  AdapterSpec.to_json()
    bundle.json        model name, classes, sequence length, batch range, label names, tokenizer settings
                       (fingerprint, max length, padding, truncation), trainable keys/shapes
    manifest.json      sha256 and size of every other file

This module only reads and writes folders (no torch, no executorch); building the programs is
:mod:`export.build`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.spec import AdapterSpec, SpecError

FORMAT = 1
TRAIN_PTE = "train.pte"
ADAPTER_PTD = "adapter.ptd"
INFER_PTE = "infer.pte"
SPEC_JSON = "adapter_spec.json"
BUNDLE_JSON = "bundle.json"
MANIFEST_JSON = "manifest.json"
REQUIRED = (TRAIN_PTE, ADAPTER_PTD, INFER_PTE, SPEC_JSON, BUNDLE_JSON)


class BundleError(ValueError):
    """A bundle folder that is missing a file, altered, or inconsistent."""


@dataclass(frozen=True)
class BundleInfo:
    """The contents of ``bundle.json``."""

    model: str
    num_classes: int
    seq_len: int
    batch_min: int
    batch_max: int
    trainable: dict[str, list[int]]
    labels: tuple[str, ...] = ()
    xnnpack: bool = False
    model_seed: int = 0
    # adapted layer -> [d, k]: the training program's base-delta inputs, in this order (FLoRA, FedEx-LoRA)
    base_delta: dict[str, list[int]] = field(default_factory=dict)
    # How examples are tokenized for this program (export.data.tokenizer_settings): a device checks
    # that its tokenizer is the same before it trains ({} in bundles made before this was recorded).
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "num_classes": self.num_classes,
            "seq_len": self.seq_len,
            "batch_min": self.batch_min,
            "batch_max": self.batch_max,
            "labels": list(self.labels),
            "xnnpack": self.xnnpack,
            "model_seed": self.model_seed,
            "train_inputs": [
                "input_ids",
                "attention_mask",
                "labels",
                *(f"{n}.base_delta" for n in self.base_delta),
            ],
            "train_outputs": ["loss", "logits"],
            "infer_inputs": ["input_ids", "attention_mask"],
            "trainable": self.trainable,
            "base_delta": self.base_delta,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BundleInfo:
        if d.get("format") != FORMAT:
            raise BundleError(f"bundle.json format {d.get('format')!r} is not the supported {FORMAT}")
        try:
            info = cls(
                model=str(d["model"]),
                num_classes=int(d["num_classes"]),
                seq_len=int(d["seq_len"]),
                batch_min=int(d["batch_min"]),
                batch_max=int(d["batch_max"]),
                trainable={str(k): [int(n) for n in v] for k, v in d["trainable"].items()},
                labels=tuple(str(x) for x in d.get("labels", [])),
                xnnpack=bool(d.get("xnnpack", False)),
                model_seed=int(d.get("model_seed", 0)),
                base_delta={str(k): [int(n) for n in v] for k, v in d.get("base_delta", {}).items()},
                tokenizer=dict(d.get("tokenizer", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"bundle.json is malformed: {e!r}") from e
        if any(len(shape) != 2 for shape in info.base_delta.values()):
            raise BundleError("bundle.json: every base_delta entry must be [d, k]")
        if info.labels and len(info.labels) != info.num_classes:
            raise BundleError(f"bundle.json has {len(info.labels)} labels for {info.num_classes} classes")
        return info


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder."""

    path: Path
    info: BundleInfo
    spec: AdapterSpec

    def read(self, name: str) -> bytes:
        """The bytes of one of the bundle's files (``TRAIN_PTE``, ``ADAPTER_PTD``, ...)."""
        return (self.path / name).read_bytes()

    @property
    def batch_range(self) -> tuple[int, int]:
        return self.info.batch_min, self.info.batch_max


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict[str, Any]:
    """Hash every file of ``folder`` (but the manifest) into ``manifest.json``; returns the manifest."""
    files = {
        p.name: {"sha256": _sha256(p), "size": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_JSON
    }
    manifest = {"format": FORMAT, "files": files}
    (folder / MANIFEST_JSON).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def write_bundle(
    folder: str | Path,
    *,
    train_pte: bytes,
    adapter_ptd: bytes,
    infer_pte: bytes,
    spec: AdapterSpec,
    info: BundleInfo,
) -> Bundle:
    """Write a bundle folder (created if needed; existing bundle files are replaced) and its manifest."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_PTE).write_bytes(train_pte)
    (out / ADAPTER_PTD).write_bytes(adapter_ptd)
    (out / INFER_PTE).write_bytes(infer_pte)
    (out / SPEC_JSON).write_text(spec.to_json() + "\n")
    (out / BUNDLE_JSON).write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")
    write_manifest(out)
    return load_bundle(out)


def verify_manifest(folder: Path) -> dict[str, Any]:
    """Check every file the manifest lists against its size and sha256; raise :class:`BundleError`."""
    manifest_path = folder / MANIFEST_JSON
    if not manifest_path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST_JSON} (not a bundle folder?)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{manifest_path} is malformed: {e!r}") from e
    unlisted = [name for name in REQUIRED if name not in files]
    if unlisted:
        raise BundleError(f"{manifest_path} does not list {unlisted}")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder}: {name} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise BundleError(f"{folder}: {name} has {size} bytes, the manifest says {entry.get('size')}")
        if _sha256(path) != entry.get("sha256"):
            raise BundleError(f"{folder}: {name} does not match its sha256 in the manifest (altered?)")
    return dict(files)


def load_bundle(folder: str | Path) -> Bundle:
    """Open a bundle folder after verifying every file against the manifest."""
    path = Path(folder)
    if not path.is_dir():
        raise BundleError(f"bundle folder not found: {path}")
    verify_manifest(path)
    try:
        info = BundleInfo.from_dict(json.loads((path / BUNDLE_JSON).read_text()))
        spec = AdapterSpec.from_json((path / SPEC_JSON).read_text())
    except (ValueError, SpecError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{path}: {e}") from e
    return Bundle(path=path, info=info, spec=spec)
