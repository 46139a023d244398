"""The coordinator's versioned change of the frozen base (FLoRA's merges, FedEx-LoRA's residuals).

The change lives in the global state under the keys of :mod:`export.state`, in weight units:
factored ``base_delta_B (d x R) @ base_delta_A (R x k)`` while ``R (d + k) < d k``, dense
``base_delta (d x k)`` from then on, whichever is smaller to send. Each merge appends its factors
and bumps ``base_delta.version``. It is cumulative since round 0, so a client that keeps no copy of
its base (every virtual client, a reinstalled device) stays consistent from any one download.
"""

from __future__ import annotations

import torch

from export.base_delta import base_version
from export.state import BASE_DELTA, BASE_DELTA_A, BASE_DELTA_B, BASE_VERSION, State


def merge_into_base(state: State, prefix: str, b: torch.Tensor, a: torch.Tensor) -> None:
    """``state``'s base delta of ``prefix`` += ``b @ a`` (``b`` d x m, ``a`` m x k), in place.

    Only the entries of ``state`` are replaced, never the tensors in them, so a caller's copy
    ``dict(global_state)`` leaves the previous global untouched.
    """
    dense_key, b_key, a_key = prefix + BASE_DELTA, prefix + BASE_DELTA_B, prefix + BASE_DELTA_A
    b, a = b.double(), a.double()
    if dense_key in state:
        state[dense_key] = (state[dense_key].double() + b @ a).float()
        return
    if b_key in state:
        b = torch.cat([state[b_key].to(b), b], dim=1)
        a = torch.cat([state[a_key].to(a), a], dim=0)
    d, rank, k = b.shape[0], b.shape[1], a.shape[1]
    if rank * (d + k) >= d * k:
        state.pop(b_key, None)
        state.pop(a_key, None)
        state[dense_key] = (b @ a).float()
    else:
        state[b_key], state[a_key] = b.float().contiguous(), a.float().contiguous()


def bump_version(state: State, previous: State) -> int:
    """Set ``state``'s base version to ``previous``'s + 1 and return it."""
    version = base_version(previous) + 1
    state[BASE_VERSION] = torch.tensor(version, dtype=torch.int64)
    return version
