"""Helpers for the native client's tests: its binary (built once per run), bundles, batches, flashing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from deploy_helpers import BATCH, MAX_LEN, MODEL, NUM_CLASSES, spec_for

from devices import native
from export.bundle import Bundle
from export.spec import AdapterSpec
from fleetlora.cli import main as cli_main

HOST = native.host_arch()
STATUS = native.status(HOST)
# Tests needing the compiler and libraries: skipped (with what is missing) where they are absent.
needs_native = pytest.mark.skipif(not STATUS.available, reason=STATUS.reason())
RUN = "t"


def binary() -> Path:
    """The host's fleetlora-client, built once (scripts/setup.sh builds it; then this is a no-op)."""
    folder = native.build(HOST, log=lambda _: None)
    return folder / native.BINARY


def tiny_bundle(spec: AdapterSpec | None = None, **kw: Any) -> Bundle:
    """A tiny-BERT bundle, built once per key and cached (shared with the other deployment tests)."""
    from export.build import cached_bundle

    return cached_bundle(
        MODEL,
        spec or spec_for("fedit"),
        num_classes=NUM_CLASSES,
        seq_len=MAX_LEN,
        batch_range=(2, BATCH),
        **kw,
    )


def random_batches(path: Path, steps: int, n: int = BATCH, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of random tokens (half the examples padded), written for ``train-check``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (steps, n, MAX_LEN), generator=g)
    mask = torch.ones(steps, n, MAX_LEN, dtype=torch.long)
    mask[:, : n // 2, MAX_LEN // 2 :] = 0
    labels = torch.randint(0, NUM_CLASSES, (steps, n), generator=g)
    safetensors.torch.save_file({"input_ids": ids, "attention_mask": mask, "labels": labels}, path)
    return [{"input_ids": ids[s], "attention_mask": mask[s], "labels": labels[s]} for s in range(steps)]


def run_native(args: list[str], *, exe: Path | None = None, prefix: list[str] = (), **kw: Any) -> Any:  # type: ignore[assignment]
    done = subprocess.run(
        [*prefix, str(exe or binary()), *args], capture_output=True, text=True, timeout=600, **kw
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def flash_native(
    bundle: Bundle, folder: Path, client: str, broker: str, shard: str, *extra: str, examples: int = 24
) -> Path:
    """``fleetlora flash --runtime native`` of ``bundle`` for ``client`` into ``folder`` (a local: target)."""
    argv = [
        "flash", "--profile", "pixel_8", "--bundle", str(bundle.path), "--target", f"local:{folder}",
        "--broker", broker, "--run-id", RUN, "--client-id", client, "--runtime", "native",
        "--dataset", "trec6", "--shard", shard, "--max-examples", str(examples), "--batch-size", str(BATCH),
        *extra,
    ]  # fmt: skip
    assert cli_main(argv) == 0
    return folder


def pythonless_path(tmp: Path) -> str:
    """A PATH holding only what run-client.sh calls besides the shell's builtins (no Python on it)."""
    folder = tmp / "pythonless-bin"
    folder.mkdir(exist_ok=True)
    for tool in ("dirname",):
        found = shutil.which(tool)
        assert found is not None
        target = folder / tool
        if not target.exists():
            os.symlink(found, target)
    path = str(folder)
    assert shutil.which("python3", path=path) is None and shutil.which("python", path=path) is None
    return path
