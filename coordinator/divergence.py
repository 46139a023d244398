"""How far a global adapter is from the exact average of the clients' products.

``divergence = ||B_hat A_hat - sum_u p_u B_u A_u||_F / ||sum_u p_u B_u A_u||_F`` per adapted layer,
computed from the factors with Gram matrices so no ``d x k`` matrix is ever built:
``||X Y||_F^2 = <X^T X, Y Y^T>`` for ``X = [B_hat, B_1..B_U]`` and ``Y = [A_hat; -p_1 A_1; ..]``.
"""

from __future__ import annotations

import torch


def lowrank_fro2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x @ y||_F^2`` for ``x`` (..., d, m) and ``y`` (..., m, k); batched.

    Through the ``m x m`` Gram matrices when they are smaller than the ``d x k`` product, else
    through the product: with ``m = U r`` (all clients' ranks) the Gram matrices of 2,000 clients
    would take gigabytes, while the product stays ``d x k``.
    """
    x64, y64 = x.double(), y.double()
    d, m, k = x.shape[-2], x.shape[-1], y.shape[-1]
    if d * k <= m * m:
        return (x64 @ y64).square().sum(dim=(-1, -2))
    gx = x64.transpose(-1, -2) @ x64
    gy = y64 @ y64.transpose(-1, -2)
    return (gx * gy).sum(dim=(-1, -2)).clamp_min(0)


def lora_divergence(
    b_hat: torch.Tensor, a_hat: torch.Tensor, bs: torch.Tensor, as_: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """Relative divergence of ``b_hat @ a_hat`` from ``sum_u p_u bs[u] @ as_[u]``.

    Shapes: ``b_hat`` (d, r'), ``a_hat`` (r', k), ``bs`` (U, d, r), ``as_`` (U, r, k), ``p`` (U,).
    A leading layer axis on all five batches the computation over same-shaped layers.
    """
    u_axis = bs.dim() - 3
    d, r = bs.shape[-2], bs.shape[-1]
    k = as_.shape[-1]
    lead = bs.shape[:u_axis]
    # [B_1 .. B_U] as (.., d, U r) and [p_1 A_1; ..; p_U A_U] as (.., U r, k)
    b_cat = bs.movedim(u_axis, -2).reshape(*lead, d, -1) if r else bs
    pa = as_ * p.to(as_.dtype).reshape(*([1] * len(lead)), -1, 1, 1)
    a_cat = pa.reshape(*lead, -1, k)
    target = lowrank_fro2(b_cat, a_cat)
    err = lowrank_fro2(torch.cat([b_hat, b_cat], -1), torch.cat([a_hat, -a_cat], -2))
    return (err / target.clamp_min(1e-30)).sqrt()
