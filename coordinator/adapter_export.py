"""Take a trained global out of a coordinator's state folder as an adapter folder (export.adapter_folder).

The state folder keeps every round's global (``global-N.safetensors`` is what round N trained from,
i.e. the result of N - 1 rounds) and records the task in ``state.json``: model, labels, sequence length,
model seed, adapter spec. The global is turned into the adapter a newly joining device would train
from (the aggregator's payload at full rank), loaded into the task's model and saved with PEFT.

Refused, with the reason: a Ravan adapter (not a PEFT adapter), a method that changes the frozen base
(FLoRA, FedEx-LoRA: PEFT cannot carry that change) or that leaves a factor on each device
(FedSA-LoRA: the global has no trained B), and a folder that does not record its task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator import aggregators
from coordinator.store import STATE_FILE, RoundState, RoundStore, StoreError
from export.adapter_folder import INFER_PTE, AdapterInfo, write_adapter_folder
from export.adapters import attach, start_state
from export.base_delta import split_base_delta
from export.models import build_model
from export.spec import AdapterSpec
from export.state import BASE_VERSION, State, load_trainable_state, trainable_state


class ExportError(ValueError):
    """A state folder (or a round of it) that cannot be exported; the message says why."""


@dataclass(frozen=True)
class Exported:
    folder: Path
    round: int  # rounds aggregated into the exported global
    rounds_kept: tuple[int, ...]  # the rounds whose global the state folder holds


def _open(state_dir: Path) -> tuple[RoundStore, RoundState]:
    if not (state_dir / STATE_FILE).is_file():
        raise ExportError(f"{state_dir} is not a coordinator state folder (no {STATE_FILE})")
    store = RoundStore(state_dir, sync=False)
    try:
        loaded = store.load()
    except StoreError as e:
        raise ExportError(str(e)) from e
    assert loaded is not None
    state = loaded[0]
    if not state.task.get("model") or not state.task.get("labels"):
        raise ExportError(
            f"{state_dir}/{STATE_FILE} does not record the model and label names (a coordinator run "
            "without --bundle, or an older one): serve with --bundle to export"
        )
    return store, state


def exportable_global(state: RoundState, spec: AdapterSpec, global_state: State) -> State:
    """The adapter a device joining now trains from; refuses what PEFT cannot carry."""
    if spec.family != "lora":
        raise ExportError(f"a {spec.family} adapter is not a PEFT (LoRA) adapter; only LoRA runs export")
    agg = aggregators.create(state.method, spec, device="cpu")
    if agg.local_suffixes:
        raise ExportError(
            f"{state.method} keeps part of the adapter on each device: the global alone is not a model"
        )
    payload = agg.announced(global_state)
    adapter, delta = split_base_delta(payload)
    if any(k != BASE_VERSION for k in delta):
        raise ExportError(f"{state.method} changed the frozen base; a PEFT adapter cannot carry that change")
    return {k: v.detach().to("cpu") for k, v in adapter.items()}


def export_adapter(
    state_dir: str | Path,
    out: str | Path,
    *,
    round: int | None = None,
    infer_pte: bool = False,
    log: Callable[[str], None] | None = None,
) -> Exported:
    """Write the global after ``round`` rounds (default: the latest kept) of ``state_dir`` to ``out``."""
    from safetensors.torch import load_file

    store, state = _open(Path(state_dir))
    kept = {n - 1: path for n, path in store.globals().items()}  # rounds aggregated -> file
    chosen = max(kept) if round is None else round
    if chosen not in kept:
        raise ExportError(f"{state_dir} keeps the global after rounds {sorted(kept)}, not after {chosen}")
    task = state.task
    spec = AdapterSpec.from_dict(task["spec"])
    adapter = exportable_global(state, spec, dict(load_file(kept[chosen])))
    base, _ = build_model(task["model"], int(task["num_classes"]), seed=int(task["model_seed"]))
    model = attach(base, spec)
    load_trainable_state(model, start_state(spec, adapter, trainable_state(model)))
    info = AdapterInfo(
        model=task["model"], labels=tuple(task["labels"]), seq_len=int(task["seq_len"]),
        model_seed=int(task["model_seed"]), spec=spec.to_dict(),
        source={"run": state.run, "method": state.method, "round": chosen, "state": str(state_dir)},
    )  # fmt: skip
    folder = write_adapter_folder(model, info, out)
    if log is not None:
        log(f"wrote {folder}: the global after round {chosen} of run {state.run!r} ({state.method})")
    if infer_pte:
        from export.build import BuildReport, build_inference_program

        program = build_inference_program(
            model, int(task["seq_len"]), (2, 64), xnnpack=False, report=BuildReport()
        )
        (folder / INFER_PTE).write_bytes(program)
        if log is not None:
            log(f"wrote {folder / INFER_PTE} ({len(program):,d} bytes): the model with the adapter merged")
    return Exported(folder, chosen, tuple(sorted(kept)))
