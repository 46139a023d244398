"""Norm clipping of client updates against outsized (buggy or hostile) contributions.

An update's *delta* is what the client changed: each uploaded tensor minus the part of the global
adapter it was trained from (the same tensor; the heads it trained, for a Ravan head subset; the
leading slice, for a lower LoRA rank). Its norm is the L2 norm over every float tensor, computed in
float64 so that values near the float32 maximum cannot overflow it to infinity.

With a limit ``X`` (``ServiceConfig.clip_norm``, ``--clip-norm X``) an update whose delta norm exceeds
``X`` is either scaled back to norm ``X`` (``clip_mode="scale"``: the client still counts, with its
direction kept) or refused with reason ``outsized`` (``clip_mode="reject"``). Without a limit every
finite update is aggregated as sent: a client can move the global adapter as far as its weight in the
average allows (see RELIABILITY.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from export.state import RAVAN_H, RAVAN_HEADS, RAVAN_S, State

ClipMode = Literal["scale", "reject"]
CLIP_MODES: tuple[ClipMode, ...] = ("scale", "reject")


def _reference(key: str, update: torch.Tensor, global_state: Mapping[str, torch.Tensor],
               heads: Sequence[int] | None) -> torch.Tensor:  # fmt: skip
    """The part of the global tensor ``key`` that ``update`` replaces (zeros when there is none)."""
    g = global_state.get(key)
    if g is None:
        return torch.zeros_like(update)
    g = g.detach().to("cpu")
    if heads is not None and (key.endswith(RAVAN_H) or key.endswith(RAVAN_S)) and g.shape != update.shape:
        g = g.index_select(0, torch.tensor(list(heads), dtype=torch.int64))
    elif g.shape != update.shape and g.dim() == update.dim():
        g = g[tuple(slice(0, n) for n in update.shape)]
    return g if g.shape == update.shape else torch.zeros_like(update)


def _float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, t in state.items() if t.is_floating_point() and not k.endswith(RAVAN_HEADS)]


def delta_norm(
    update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], heads: Sequence[int] | None
) -> float:
    """The L2 norm (float64) of ``update`` minus the global adapter it was trained from."""
    total = 0.0
    for key in _float_keys(update):
        u = update[key].detach().to("cpu")
        d = u.double().numpy() - _reference(key, u, global_state, heads).double().numpy()
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def scale_delta(
    update: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    heads: Sequence[int] | None,
    factor: float,
) -> State:
    """``global + factor * (update - global)`` for every float tensor; the rest passes unchanged."""
    out: State = dict(update)
    for key in _float_keys(update):
        u = update[key].detach().to("cpu")
        g = _reference(key, u, global_state, heads).to(torch.float64)
        out[key] = (g + factor * (u.to(torch.float64) - g)).to(u.dtype)
    return out
