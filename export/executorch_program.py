"""ExecuTorch programs: a training program (frozen base inside, trainable adapter outside) and a
forward-only inference program with the adapter merged.

Each stage is a function that can be called and tested alone (NOTES.md, "ExecuTorch training
programs", is the recipe and the list of pitfalls this follows):

1. :func:`capture` -- ``torch.export`` of :class:`TrainWrap` (loss first) with a dynamic batch, then
   the joint forward/backward graph; parameter names lose the wrapper's prefix so they equal
   :func:`export.state.trainable_state`'s.
2. :func:`export.passes.rewrite_addmm` -- ``addmm`` -> ``mm + add`` (the runtime's ``addmm`` is slow).
3. :func:`to_edge_program` -- the Edge dialect, optionally with XNNPACK partitioning.
4. :func:`to_training_program` -- ``(.pte bytes, .ptd bytes)``: the program with the frozen base and
   the trainable tensors as external mutable weights.

:func:`capture_inference` and :func:`to_inference_program` build the forward-only ``.pte``.
executorch is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from export.passes import strip_state_prefix
from export.state import State

WRAP_PREFIX = "model."
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BFLOAT16": torch.bfloat16}
PTD_KEY = "_default_external_constant"


class TrainWrap(nn.Module):
    """``(input_ids, attention_mask, labels, *base_deltas) -> (loss, logits)``: the loss must be output 0.

    ``delta_layers`` names adapted layers whose frozen base a coordinator may change (FLoRA,
    FedEx-LoRA): the program then takes one dense ``(d, k)`` input per layer, added to the layer's
    output as ``x @ delta^T`` (what :func:`export.base_delta.applied_base_delta` does in eager torch).
    A zero input adds exact zeros, so such a program computes what the plain one does.
    """

    def __init__(self, model: nn.Module, delta_layers: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.delta_layers = tuple(delta_layers)
        self._deltas: tuple[torch.Tensor, ...] = ()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *deltas: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._deltas = deltas  # read by the hooks of delta_hooks() while the model runs
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return nn.functional.cross_entropy(logits, labels), logits.detach()


@contextlib.contextmanager
def delta_hooks(wrap: TrainWrap) -> Iterator[None]:
    """Hooks adding ``x @ delta_i^T`` to the output of each of ``wrap.delta_layers``, for tracing."""
    handles = []

    def hook(index: int) -> Any:
        return lambda module, args, output: output + args[0] @ wrap._deltas[index].t()

    try:
        for i, name in enumerate(wrap.delta_layers):
            handles.append(wrap.model.get_submodule(name).register_forward_hook(hook(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class InferWrap(nn.Module):
    """``(input_ids, attention_mask) -> logits`` with positional inputs (the runtime has no kwargs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """The MATH sdpa kernel: the fused CPU kernels' backward ops are outside the Core ATen opset."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def example_inputs(batch: int, seq_len: int, num_classes: int, vocab: int = 1000) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: token ids, an attention mask with some padding, labels."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[0, seq_len // 2 :] = 0  # padding, so no mask-dependent branch specialises on "no padding"
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return ids, mask, labels


def _batch_dim(batch_range: tuple[int, int]) -> Any:
    lo, hi = batch_range
    if not 2 <= lo <= hi:
        raise ValueError(f"batch range must satisfy 2 <= min <= max, got {batch_range}")
    return Dim("batch", min=lo, max=hi)


def capture(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    batch_range: tuple[int, int],
    base_delta: Mapping[str, tuple[int, int]] | None = None,
) -> ExportedProgram:
    """The joint forward/backward program of ``TrainWrap(model)`` with a dynamic batch dimension.

    ``inputs`` are ``(input_ids, attention_mask, labels)``; the sequence length stays static.
    Gradients are produced only for parameters with ``requires_grad`` (the adapter). ``base_delta``:
    adapted layer name -> ``(d, k)``, the layers that take a base-delta input (see :class:`TrainWrap`).
    """
    from torch.export.experimental import _export_forward_backward

    batch = _batch_dim(batch_range)
    deltas = {name: torch.zeros(shape) for name, shape in (base_delta or {}).items()}
    shapes: tuple[Any, ...] = tuple({0: batch} for _ in inputs)
    if deltas:  # TrainWrap's *deltas: one entry of their own in dynamic_shapes (all static)
        shapes = (*shapes, tuple(None for _ in deltas))
    wrap = TrainWrap(model, list(deltas))
    with _math_attention(), delta_hooks(wrap):
        ep = torch.export.export(wrap, (*inputs, *deltas.values()), dynamic_shapes=shapes, strict=True)
        ep = strip_state_prefix(ep, WRAP_PREFIX)
        return _export_forward_backward(ep)


def capture_inference(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], batch_range: tuple[int, int]
) -> ExportedProgram:
    """The forward-only program of ``InferWrap(model)`` (inputs ``(input_ids, attention_mask)``)."""
    batch = _batch_dim(batch_range)
    with _math_attention(), torch.no_grad():
        shapes = tuple({0: batch} for _ in inputs)
        return torch.export.export(InferWrap(model), inputs, dynamic_shapes=shapes, strict=True)


def _xnnpack_partitioner() -> Any:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    # Without this option XNNPACK leaves every matmul against a frozen weight outside the delegate
    # in a training graph (NOTES.md: 1520 vs 707 ms per MiniLM step).
    return XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)


def to_edge_program(ep: ExportedProgram, xnnpack: bool = False) -> Any:
    """The Edge dialect program (``EdgeProgramManager``), XNNPACK-partitioned when asked."""
    from executorch.exir import to_edge, to_edge_transform_and_lower

    if xnnpack:
        return to_edge_transform_and_lower(ep, partitioner=[_xnnpack_partitioner()])
    return to_edge(ep)


def to_training_program(edge: Any) -> tuple[bytes, bytes]:
    """``(.pte, .ptd)``: the program with the frozen base, and the trainable tensors by name."""
    from executorch.exir import ExecutorchBackendConfig

    # View copies are removed (memory planning aliases them): 70 ms of a MiniLM step otherwise. A view
    # taken straight from a trainable parameter would fail here (RavanLinear takes none).
    et = edge.to_executorch(ExecutorchBackendConfig(external_mutable_weights=True, remove_view_copy=True))
    if PTD_KEY not in et._tensor_data:
        raise RuntimeError("the training program has no external trainable tensors (nothing requires grad?)")
    return bytes(et.buffer), bytes(et._tensor_data[PTD_KEY])


def to_inference_program(edge: Any) -> bytes:
    """The forward-only ``.pte`` (every weight inside)."""
    return bytes(edge.to_executorch().buffer)


def write_adapter_ptd(template: bytes, state: State) -> bytes:
    """A ``.ptd`` holding ``state``, with the tensor layouts of ``template`` (a program's ``.ptd``).

    One buffer per key: the compiler's ``.ptd`` de-duplicates tensors with equal values (LoRA's zero
    ``B``, Ravan's ``s = 1``), and refilling shared slots would corrupt them (NOTES.md).
    """
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.exir.scalar_type import ScalarType
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    serializer = FlatTensorSerializer()
    layouts = serializer.deserialize(template).named_data
    if set(layouts) != set(state):
        missing, extra = sorted(set(layouts) - set(state)), sorted(set(state) - set(layouts))
        raise ValueError(f"state keys differ from the program's: missing {missing[:3]}, extra {extra[:3]}")
    buffers: list[bytes] = []
    entries = {}
    for key in sorted(state):
        layout = layouts[key].tensor_layout
        t = state[key].detach().contiguous()
        if layout is None or list(layout.sizes) != list(t.shape):
            raise ValueError(f"{key}: shape {tuple(t.shape)} does not match the program's tensor")
        if _TORCH_DTYPES.get(ScalarType(layout.scalar_type).name) != t.dtype:
            raise ValueError(f"{key}: dtype {t.dtype} does not match the program's {layout.scalar_type}")
        entries[key] = DataEntry(buffer_index=len(buffers), alignment=16, tensor_layout=layout)
        buffers.append(t.cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return bytes(serializer.serialize(DataPayload(buffers=buffers, named_data=entries)))


def read_adapter_ptd(ptd: bytes) -> State:
    """The tensors of a ``.ptd``, by key (copies; the dtypes the program declares)."""
    from executorch.exir._serialize._cord import Cord
    from executorch.exir.scalar_type import ScalarType
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    payload = FlatTensorSerializer().deserialize(Cord(ptd))
    out: State = {}
    for key, entry in payload.named_data.items():
        layout = entry.tensor_layout
        if layout is None:
            raise ValueError(f"{key} is not a tensor")
        dtype = _TORCH_DTYPES.get(ScalarType(layout.scalar_type).name)
        if dtype is None:
            raise ValueError(f"{key}: unsupported dtype {layout.scalar_type}")
        raw = bytearray(bytes(payload.buffers[entry.buffer_index]))
        n = math.prod(layout.sizes)
        flat = torch.frombuffer(raw, dtype=dtype, count=n) if n else torch.empty(0, dtype=dtype)
        out[key] = flat.reshape(list(layout.sizes)).clone()
    return out
