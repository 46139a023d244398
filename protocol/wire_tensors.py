"""The tensor half of an envelope: a safetensors blob checked against a template before it is loaded.

The safetensors header is parsed here first, with every size and offset bounded, so a hostile header
cannot make the receiver allocate huge memory; names, dtypes and shapes are then checked against the
template (the full-rank shapes of the global adapter), and only then are the tensors made and the
values checked (finite floats, valid Ravan head indices). The tensors are made from the checked
offsets directly (``torch.frombuffer``): as copies, or as read-only views of the payload where the
receiver never writes into them (the coordinator's updates), which costs no allocation at all.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import safetensors.torch
import torch

from export.state import BASE_VERSION, LORA_A, LORA_B, RAVAN_H, RAVAN_HEADS, RAVAN_S, State
from protocol.wire_base_delta import base_delta_names, check_base_delta
from protocol.wire_errors import EnvelopeError, Reason

Template = dict[str, tuple[int, ...]]

# Update tensors are views of the received payload by design (see load_checked); torch warns, once,
# that it cannot mark such a tensor read-only. safetensors stores little-endian, as are the hosts
# fleetlora targets (x86-64, ARM64), so the views read the bytes as they are.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# safetensors dtype code -> (torch dtype, bytes per element)
FLOAT_DTYPES = {"F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2)}
INDEX_DTYPE = ("I64", torch.int64, 8)

MAX_TENSOR_HEADER = 1 << 20  # bytes of safetensors JSON header; ~200 bytes per tensor
MAX_NAME = 512
MAX_DIMS = 4


@dataclass(frozen=True)
class Entry:
    """One tensor as the safetensors header declares it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class TemplateLayers:
    """A template's keys grouped by role: LoRA layers, Ravan layers and dense tensors."""

    lora: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)  # prefix -> {A/B key: shape}
    ravan: dict[str, tuple[int, ...]] = field(default_factory=dict)  # H key -> (h, r_h, r_h)
    ravan_s: dict[str, str] = field(default_factory=dict)  # s key -> its H key
    dense: dict[str, tuple[int, ...]] = field(default_factory=dict)


def template_of(state: Mapping[str, torch.Tensor]) -> Template:
    """The template (name -> shape) of a full-rank trainable state."""
    return {k: tuple(v.shape) for k, v in state.items()}


def group_template(template: Template) -> TemplateLayers:
    out = TemplateLayers()
    for key, shape in template.items():
        if key.endswith(LORA_A) or key.endswith(LORA_B):
            prefix = key[: -len(LORA_A)] if key.endswith(LORA_A) else key[: -len(LORA_B)]
            out.lora.setdefault(prefix, {})[key] = shape
        elif key.endswith(RAVAN_H):
            out.ravan[key] = shape
        elif key.endswith(RAVAN_S) and key[: -len(RAVAN_S)] + RAVAN_H in template:
            out.ravan_s[key] = key[: -len(RAVAN_S)] + RAVAN_H
        else:
            out.dense[key] = shape
    return out


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def strict_json(text: bytes | memoryview) -> object:
    """JSON without duplicate keys or NaN/Infinity; ``ValueError`` (also for deep nesting) otherwise."""
    try:
        return json.loads(
            str(text, "utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _data_start(blob: bytes | memoryview) -> int:
    """Where the tensor data begins: after the 8-byte length and the JSON header."""
    (n,) = struct.unpack_from("<Q", blob)
    return 8 + int(n)


def parse_tensor_header(blob: bytes | memoryview) -> dict[str, Entry]:
    """The tensors a safetensors blob declares, with every size and offset checked against the blob."""
    if len(blob) < 8:
        raise EnvelopeError(Reason.BAD_TENSORS, f"safetensors blob of {len(blob)} bytes has no header")
    n = _data_start(blob) - 8
    if n > MAX_TENSOR_HEADER or 8 + n > len(blob):
        raise EnvelopeError(Reason.BAD_TENSORS, f"safetensors header length {n} exceeds the blob or limit")
    try:
        raw = strict_json(blob[8 : 8 + n])
    except ValueError as e:
        raise EnvelopeError(Reason.BAD_TENSORS, f"safetensors header is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise EnvelopeError(Reason.BAD_TENSORS, "safetensors header is not a JSON object")
    entries: dict[str, Entry] = {}
    for name, info in raw.items():
        if not name or len(name) > MAX_NAME or name == "__metadata__":
            raise EnvelopeError(Reason.BAD_TENSORS, f"tensor name {name[:40]!r} not allowed")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise EnvelopeError(Reason.BAD_TENSORS, f"{name}: entry must have dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
            raise EnvelopeError(Reason.BAD_TENSORS, f"{name}: malformed entry")
        if len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
            raise EnvelopeError(Reason.BAD_TENSORS, f"{name}: shape {shape} is not <= {MAX_DIMS} sizes")
        if len(offsets) != 2 or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise EnvelopeError(Reason.BAD_TENSORS, f"{name}: bad data_offsets {offsets}")
        entries[name] = Entry(dtype, tuple(shape), offsets[0], offsets[1])
    # The data must be exactly the tensors, back to back (what safetensors itself writes and requires).
    pos = 0
    for entry in sorted(entries.values(), key=lambda x: (x.begin, x.end)):
        if entry.begin != pos:
            raise EnvelopeError(Reason.BAD_TENSORS, "tensor data overlaps or leaves gaps")
        pos = entry.end
    if pos != len(blob) - 8 - n:
        raise EnvelopeError(Reason.BAD_TENSORS, f"tensor data covers {pos} of {len(blob) - 8 - n} bytes")
    return entries


def check_dtypes(entries: dict[str, Entry]) -> None:
    """Float tensors in the allow-list; int64 only (and always) for Ravan head indices and the base
    delta's version; sizes match."""
    for name, e in entries.items():
        if name.endswith(RAVAN_HEADS) or name == BASE_VERSION:
            if e.dtype != INDEX_DTYPE[0]:
                raise EnvelopeError(Reason.DTYPE, f"{name}: must be I64, got {e.dtype}")
            itemsize = INDEX_DTYPE[2]
        elif e.dtype in FLOAT_DTYPES:
            itemsize = FLOAT_DTYPES[e.dtype][1]
        else:
            raise EnvelopeError(Reason.DTYPE, f"{name}: dtype {e.dtype[:10]!r} not in {sorted(FLOAT_DTYPES)}")
        if math.prod(e.shape) * itemsize != e.end - e.begin:
            raise EnvelopeError(Reason.BAD_TENSORS, f"{name}: {e.end - e.begin} bytes for shape {e.shape}")


def _heads_key(h_key: str) -> str:
    return h_key[: -len(RAVAN_H)] + RAVAN_HEADS


def _check_names(names: set[str], template: Template, groups: TemplateLayers, with_heads: bool) -> None:
    """Every name known to the template, every required one present (``*.ravan_s`` is optional)."""
    index_keys = {_heads_key(h) for h in groups.ravan} if with_heads else set()
    unknown = sorted(names - set(template) - index_keys)
    if unknown:
        hint = " (head indices need heads in the header)" if unknown[0].endswith(RAVAN_HEADS) else ""
        raise EnvelopeError(
            Reason.UNKNOWN_KEY, f"{len(unknown)} tensors not in the template, e.g. {unknown[:3]}{hint}"
        )
    missing = sorted((set(template) - set(groups.ravan_s) | index_keys) - names)
    if missing:
        raise EnvelopeError(Reason.MISSING_KEY, f"{len(missing)} required tensors absent, e.g. {missing[:3]}")


def check_against_template(
    entries: dict[str, Entry],
    template: Template,
    rank: int | None,
    heads: Sequence[int] | None,
    *,
    base_delta: bool = False,
) -> None:
    """Names and shapes of the declared tensors against the template, the header's rank and heads.

    LoRA: ``A`` (r, k) and ``B`` (d, r) with the header's ``r`` <= the template's rank; a layer whose
    template has only ``B`` (FFA-LoRA) or only ``A`` uploads only that. Ravan: ``H`` (K, r_h, r_h) with
    ``K`` = the number of heads in the header (all ``h`` when it has none) and, when heads are given,
    ``*.ravan_heads`` (K,); ``*.ravan_s`` is optional with shape (K,). Dense tensors: exact shape.
    ``base_delta``: the coordinator's change of the base may come along (a global; see
    :mod:`protocol.wire_base_delta`).
    """
    groups = group_template(template)
    delta_names = base_delta_names(set(entries))
    if delta_names and not base_delta:
        raise EnvelopeError(
            Reason.UNKNOWN_KEY, f"only a global carries a base delta, got {sorted(delta_names)[:3]}"
        )
    if delta_names:
        check_base_delta(entries, delta_names, groups.lora)
    _check_names(set(entries) - delta_names, template, groups, heads is not None)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise EnvelopeError(Reason.SHAPE, message)

    if groups.lora:
        need(rank is not None, "the adapter has LoRA layers but the header gives no rank")
    else:
        need(rank is None, f"header gives rank {rank} but the template has no LoRA layers")
    for layer in groups.lora.values():
        for key, t in layer.items():
            full = t[0] if key.endswith(LORA_A) else t[1]
            need(rank is None or rank <= full, f"{key}: rank {rank} above the global rank {full}")
            got = entries[key].shape
            need(len(got) == 2, f"{key}: shape {got} is not 2-D")
            if key.endswith(LORA_A):
                need(
                    got == (rank, t[1]) and rank is not None and rank <= t[0],
                    f"{key}: {got}, want ({rank}, {t[1]}) with rank <= {t[0]}",
                )
            else:
                need(
                    got == (t[0], rank) and rank is not None and rank <= t[1],
                    f"{key}: {got}, want ({t[0]}, {rank}) with rank <= {t[1]}",
                )
    if not groups.ravan:
        need(heads is None, "header names heads but the template has no Ravan layers")
    for h_key, t in groups.ravan.items():
        if heads is not None and not all(0 <= i < t[0] for i in heads):
            raise EnvelopeError(
                Reason.HEADS, f"{h_key}: header heads {list(heads)[:8]} not all in [0, {t[0]})"
            )
        k = t[0] if heads is None else len(heads)
        need(entries[h_key].shape == (k, *t[1:]), f"{h_key}: {entries[h_key].shape}, want {(k, *t[1:])}")
        need(k <= t[0], f"{h_key}: {k} heads but the layer has {t[0]}")
        idx_key = _heads_key(h_key)
        if idx_key in entries:
            need(entries[idx_key].shape == (k,), f"{idx_key}: {entries[idx_key].shape}, want ({k},)")
    for s_key, h_key in groups.ravan_s.items():
        if s_key in entries:
            k = groups.ravan[h_key][0] if heads is None else len(heads)
            need(entries[s_key].shape == (k,), f"{s_key}: {entries[s_key].shape}, want ({k},)")
    for key, t in groups.dense.items():
        need(entries[key].shape == t, f"{key}: {entries[key].shape}, want {t}")


def load_checked(
    blob: bytes | memoryview, entries: dict[str, Entry], heads: Sequence[int] | None, *, copy: bool = True
) -> State:
    """The tensors of a checked blob, then their values: finite floats, head indices = header's.

    ``copy=False`` returns views of ``blob``'s memory (which must be immutable and outlive nothing: the
    tensors keep it alive); they must not be written into.
    """
    start = _data_start(blob)
    state: State = {}
    for name, e in entries.items():  # offsets already proven back to back inside the blob
        dtype = INDEX_DTYPE[1] if e.dtype == INDEX_DTYPE[0] else FLOAT_DTYPES[e.dtype][0]
        count = math.prod(e.shape)
        if count == 0:
            state[name] = torch.empty(e.shape, dtype=dtype)
            continue
        t = torch.frombuffer(blob, dtype=dtype, count=count, offset=start + e.begin).view(e.shape)
        state[name] = t.clone() if copy else t
    for name, t in state.items():
        if name.endswith(RAVAN_HEADS):
            if heads is None or t.tolist() != list(heads):
                raise EnvelopeError(Reason.HEADS, f"{name}: indices {t.tolist()[:8]} != header's {heads}")
        elif name == BASE_VERSION:
            if int(t) < 0:
                raise EnvelopeError(Reason.SHAPE, f"{name}: {int(t)} is negative")
        elif not _all_finite(t):
            raise EnvelopeError(Reason.NON_FINITE, f"{name}: contains NaN or infinity")
    return state


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``. numpy, not ``torch.isfinite``: torch's multi-threaded kernel took
    ~100 ms per MB on a loaded 2-core machine (threads spinning), numpy's takes ~0.2 ms."""
    values = t if t.dtype == torch.float32 else t.float()  # bfloat16 has no numpy dtype
    return bool(np.isfinite(values.numpy()).all())


def ravan_slice(state: Mapping[str, torch.Tensor], heads: Sequence[int]) -> State:
    """The upload of a client that trained only ``heads``: ``H`` (and ``s``) sliced, plus the indices.

    Every other tensor is passed through unchanged.
    """
    index = torch.tensor(list(heads), dtype=torch.int64)
    out: State = {}
    for key, t in state.items():
        if key.endswith(RAVAN_H):
            out[key] = t.index_select(0, index)
            out[key[: -len(RAVAN_H)] + RAVAN_HEADS] = index.clone()
        elif key.endswith(RAVAN_S) and key[: -len(RAVAN_S)] + RAVAN_H in state:
            out[key] = t.index_select(0, index)
        else:
            out[key] = t
    return out


def encode_tensors(state: Mapping[str, torch.Tensor]) -> bytes:
    """A trainable state as safetensors bytes (CPU, contiguous)."""
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()})
