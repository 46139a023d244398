"""Attach an adapter to a frozen model, move its trainable state in and out, and merge it.

LoRA goes through peft; Ravan through :mod:`export.ravan`. Both select target layers with the same
rule (peft's: a module name equal to a target or ending in ``.<target>``, optionally restricted to
some transformer blocks), so a spec means the same layers for both families.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from export.base_delta import split_base_delta
from export.ravan import attach_ravan, merge_ravan, set_trainable_heads
from export.spec import AdapterSpec
from export.state import LORA_A, LORA_B, RAVAN_H, RAVAN_HEADS, RAVAN_S, State, layout

_BLOCK = re.compile(r"\.layer\.(\d+)\.")


def target_module_names(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Fully-qualified names of the ``nn.Linear`` layers the spec adapts (error if none)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not any(name == t or name.endswith("." + t) for t in spec.target_modules):
            continue
        if spec.layers:
            m = _BLOCK.search(name)
            if m is None or int(m.group(1)) not in spec.layers:
                continue
        names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear matches target_modules={spec.target_modules} layers={spec.layers}")
    return names


def attach(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Freeze ``model`` and attach the spec's adapter; returns the adapted model.

    Every random tensor of the adapter (LoRA's A, Ravan's bases) comes from ``spec.seed``, so two
    processes attaching the same spec to the same base get bit-identical adapters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = target_module_names(model, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.family == "lora":
            model = _attach_lora(model, spec, targets)
        else:
            model = attach_ravan(model, spec, targets)
            _train_extra(model, spec)
    return model


def _attach_lora(model: nn.Module, spec: AdapterSpec, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=cast(Any, spec.alpha),  # peft annotates int; a float scale is valid
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        modules_to_save=list(spec.trainable_extra) or None,
    )
    peft_model = get_peft_model(model, config)
    dtype = getattr(torch, spec.dtype)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
            if spec.freeze_a and name.endswith(LORA_A):
                p.requires_grad_(False)  # FFA-LoRA: A is shared, frozen and never sent
    return peft_model


def _train_extra(model: nn.Module, spec: AdapterSpec) -> None:
    for extra in spec.trainable_extra:
        try:
            module = model.get_submodule(extra)
        except AttributeError as e:
            raise ValueError(f"trainable_extra module {extra!r} not found in the model") from e
        for p in module.parameters():
            p.requires_grad_(True)


def merge(model: nn.Module) -> nn.Module:
    """The base model with the adapter folded into its weights (for inference export)."""
    if hasattr(model, "merge_and_unload"):
        return cast(Any, model).merge_and_unload()
    return merge_ravan(model)


def save_peft_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Save a LoRA model's adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        raise TypeError("only a peft LoRA model can be saved as a PEFT adapter folder")
    folder = Path(folder)
    cast(Any, model).save_pretrained(str(folder))
    return folder


# -- what a client downloads and uploads -------------------------------------------------------------


def lora_rank_slice(state: State, rank: int) -> State:
    """The first ``rank`` components of every LoRA pair (what a rank-``rank`` client uploads)."""
    out = dict(state)
    for a_key, b_key in layout(state).lora.values():
        if a_key in state:
            out[a_key] = state[a_key][:rank].contiguous()
        out[b_key] = state[b_key][:, :rank].contiguous()
    return out


def rank_view(global_state: State, rank: int | None) -> State:
    """The part of the global adapter a rank-``rank`` client trains from: the first ``rank``
    components of every LoRA pair (HetLoRA's slice, FlexLoRA's truncation); the whole global for
    ``None`` or a rank no pair exceeds."""
    if rank is None:
        return global_state
    if rank < 1:
        raise ValueError(f"a client's LoRA rank must be >= 1, got {rank}")
    ranks = {global_state[a].shape[0] for a, _ in layout(global_state).lora.values() if a in global_state}
    if all(rank >= r for r in ranks):
        return global_state
    return lora_rank_slice(global_state, rank)


def lora_pad(state: State, template: State) -> State:
    """Zero-pad lower-rank LoRA factors to the template's rank.

    A padded rank-``r_k`` pair with zero extra rows of A and zero extra columns of B is exactly a
    rank-``r_k`` LoRA: the padding gets zero gradients and stays zero during local training.
    """
    out = dict(state)
    for key, t in state.items():
        full = template[key]
        if t.shape == full.shape:
            continue
        padded = torch.zeros_like(full)
        padded[tuple(slice(0, n) for n in t.shape)] = t
        out[key] = padded
    return out


def ravan_upload(state: State, heads: list[int] | None = None) -> State:
    """Fold ``s_i`` into ``H_i`` and keep only the trained heads (METHODS.md 2.1, 2.3)."""
    out: State = {}
    for key, t in state.items():
        if key.endswith(RAVAN_S):
            continue
        if key.endswith(RAVAN_H):
            s = state[key[: -len(RAVAN_H)] + RAVAN_S]
            sh = s.view(-1, 1, 1) * t
            if heads is not None:
                idx = torch.tensor(sorted(heads), dtype=torch.int64)
                sh = sh[idx]
                out[key[: -len(RAVAN_H)] + RAVAN_HEADS] = idx
            out[key] = sh.contiguous()
        else:
            out[key] = t
    return out


def ravan_download(global_state: State) -> State:
    """A client's starting state from the global one: the global ``H_i``, every ``s_i = 1``."""
    out = dict(global_state)
    for key, t in global_state.items():
        if key.endswith(RAVAN_H):
            out[key[: -len(RAVAN_H)] + RAVAN_S] = torch.ones(t.shape[0], dtype=t.dtype)
    return out


def start_state(spec: AdapterSpec, payload: State, template: State) -> State:
    """The trainer's state at the start of a round, from the downloaded payload (base delta left out)."""
    adapter, _ = split_base_delta(payload)
    state = ravan_download(adapter) if spec.family == "ravan" else lora_pad(adapter, template)
    missing = set(template) - set(state)
    if missing:  # e.g. a payload that omits tensors this client keeps locally (FedSA-LoRA's B)
        raise KeyError(f"payload lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:2]}")
    return state


def train_heads(model: nn.Module, heads: list[int] | None) -> None:
    """Ravan: train only these head indices in every layer (``None``: all)."""
    set_trainable_heads(model, heads)


__all__ = [
    "LORA_B",
    "attach",
    "lora_pad",
    "lora_rank_slice",
    "merge",
    "ravan_download",
    "ravan_upload",
    "save_peft_adapter",
    "start_state",
    "target_module_names",
    "train_heads",
]
