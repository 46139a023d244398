"""Build a bundle: model -> adapter -> training program + inference program -> folder.

:func:`build_bundle` runs the stages of :mod:`export.executorch_program` in order and reports how
long each took and how big each output is (``fleetlora export`` prints that report).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from export import executorch_program as prog
from export.adapters import attach, merge
from export.bundle import Bundle, BundleError, BundleInfo, load_bundle, write_bundle
from export.data import default_cache_dir, tokenizer_settings
from export.models import build_model
from export.passes import ADDMM, count_op, decompose_erf, drop_safe_softmax_guard, rewrite_addmm
from export.ravan import set_trainable_heads
from export.spec import AdapterSpec
from export.state import State, layout, trainable_state


@dataclass
class BuildReport:
    """Seconds per stage (in order), file sizes in bytes and the ``addmm`` and ``erf`` rewritten."""

    stages: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    addmm_rewritten: int = 0
    erf_decomposed: int = 0
    softmax_guards_dropped: int = 0

    @contextmanager
    def stage(self, name: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.stages[name] = time.perf_counter() - start
        if log is not None:
            log(f"{name:<22s} {self.stages[name]:8.2f} s")


def lora_layer_shapes(state: State) -> dict[str, tuple[int, int]]:
    """Each LoRA layer's ``(d, k)`` (``B`` is ``d x r``, ``A`` is ``r x k``), in the state's order."""
    return {
        prefix: (state[b_key].shape[0], state[a_key].shape[1])
        for prefix, (a_key, b_key) in layout(state).lora.items()
    }


def build_training_program(
    model: nn.Module,
    seq_len: int,
    batch_range: tuple[int, int],
    num_classes: int,
    *,
    xnnpack: bool,
    report: BuildReport,
    log: Callable[[str], None] | None = None,
    base_delta: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[bytes, bytes]:
    """``(train.pte, adapter.ptd)`` of an adapted model; the ``.ptd`` has one buffer per trainable key.

    ``base_delta``: layer -> ``(d, k)`` of the base-delta inputs the program takes (see
    :class:`export.executorch_program.TrainWrap`).
    """
    inputs = prog.example_inputs(batch_range[0], seq_len, num_classes)
    with report.stage("capture (joint graph)", log):
        ep = prog.capture(model, inputs, batch_range, base_delta)
    with report.stage("rewrite addmm", log):
        before = count_op(ep, ADDMM)
        report.addmm_rewritten = rewrite_addmm(ep)
        if count_op(ep, ADDMM) != before - report.addmm_rewritten:
            raise RuntimeError("addmm rewrite left an inconsistent graph")
    with report.stage("decompose erf, drop softmax guard", log):
        report.erf_decomposed = decompose_erf(ep)
        report.softmax_guards_dropped = drop_safe_softmax_guard(ep)
    with report.stage("to_edge" + (" + xnnpack" if xnnpack else ""), log):
        edge = prog.to_edge_program(ep, xnnpack)
    with report.stage("to_executorch (train)", log):
        pte, template_ptd = prog.to_training_program(edge)
        ptd = prog.write_adapter_ptd(template_ptd, trainable_state(model))
    return pte, ptd


def build_inference_program(
    model: nn.Module,
    seq_len: int,
    batch_range: tuple[int, int],
    *,
    xnnpack: bool,
    report: BuildReport,
    log: Callable[[str], None] | None = None,
) -> bytes:
    """``infer.pte``: a merged copy of the adapted model, forward only (``model`` is left intact)."""
    with report.stage("infer: merge + capture", log):
        merged = merge(copy.deepcopy(model))
        ids, mask, _ = prog.example_inputs(batch_range[0], seq_len, 2)
        ep = prog.capture_inference(merged, (ids, mask), batch_range)
    with report.stage("infer: to_executorch", log):
        return prog.to_inference_program(prog.to_edge_program(ep, xnnpack))


def build_bundle(
    model_name: str,
    spec: AdapterSpec,
    *,
    num_classes: int,
    seq_len: int,
    out: str | Path,
    batch_range: tuple[int, int] = (2, 64),
    labels: tuple[str, ...] = (),
    xnnpack: bool = False,
    model_seed: int = 0,
    base_delta: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[Bundle, BuildReport]:
    """Build the registered ``model_name`` with ``spec``'s adapter and write a bundle to ``out``.

    The training program trains every Ravan head; a client training a subset of heads zeroes the
    other heads' gradients at run time (see ``edge_client.executorch_trainer``). ``base_delta``: the
    program also takes a dense base delta per LoRA layer, so its devices can follow methods that
    change the frozen base (FLoRA, FedEx-LoRA); it costs one ``d x k`` product per layer and step.
    """
    if labels and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for {num_classes} classes")
    if base_delta and spec.family != "lora":
        raise ValueError(f"a base delta needs a LoRA adapter, not {spec.family}")
    report = BuildReport()
    with report.stage("build model + adapter", log):
        model, tokenizer = build_model(model_name, num_classes, model_seed)
        model = attach(model, spec)
        set_trainable_heads(model, None)
    state = trainable_state(model)
    deltas = lora_layer_shapes(state) if base_delta else {}
    pte, ptd = build_training_program(
        model, seq_len, batch_range, num_classes, xnnpack=xnnpack, report=report, log=log, base_delta=deltas
    )
    infer = build_inference_program(model, seq_len, batch_range, xnnpack=xnnpack, report=report, log=log)
    info = BundleInfo(
        model=model_name,
        num_classes=num_classes,
        seq_len=seq_len,
        batch_min=batch_range[0],
        batch_max=batch_range[1],
        trainable={k: list(v.shape) for k, v in state.items()},
        labels=tuple(labels),
        xnnpack=xnnpack,
        model_seed=model_seed,
        base_delta={name: list(shape) for name, shape in deltas.items()},
        tokenizer=tokenizer_settings(tokenizer, seq_len),
    )
    with report.stage("write bundle", log):
        bundle = write_bundle(out, train_pte=pte, adapter_ptd=ptd, infer_pte=infer, spec=spec, info=info)
    report.sizes = {p.name: p.stat().st_size for p in sorted(bundle.path.iterdir()) if p.is_file()}
    return bundle, report


def cached_bundle(
    model_name: str,
    spec: AdapterSpec,
    *,
    num_classes: int,
    seq_len: int,
    batch_range: tuple[int, int] = (2, 64),
    model_seed: int = 0,
    base_delta: bool = False,
    xnnpack: bool = False,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Bundle:
    """The bundle :func:`build_bundle` would make, built once per key and then read from a cache.

    The key is everything the programs depend on (model, spec, classes, sequence length, batch range,
    model seed, executorch version); a cached folder is verified against its manifest on every use
    and rebuilt when it fails. Concurrent builders each build into a private folder and the first
    to finish publishes it.
    """
    from importlib.metadata import version

    key = {
        "model": model_name, "spec": spec.to_dict(), "num_classes": num_classes, "seq_len": seq_len,
        "batch_range": list(batch_range), "model_seed": model_seed, "executorch": version("executorch"),
        **({"base_delta": True} if base_delta else {}),  # (absent otherwise: existing caches stay valid)
        **({"xnnpack": True} if xnnpack else {}),
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    root = (cache_dir or default_cache_dir()) / "bundles"
    folder = root / f"{model_name}-{spec.family}-{digest}"
    if folder.is_dir():
        try:
            return load_bundle(folder)
        except BundleError as e:
            if log is not None:
                log(f"rebuilding the cached bundle {folder}: {e}")
            shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        build_bundle(
            model_name, spec, num_classes=num_classes, seq_len=seq_len, out=private,
            batch_range=batch_range, model_seed=model_seed, base_delta=base_delta, xnnpack=xnnpack, log=log,
        )  # fmt: skip
        try:
            os.rename(private, folder)
        except OSError:  # another builder published it first: theirs is the same bundle
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return load_bundle(folder)
