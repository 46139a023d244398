"""How far a global adapter is from the exact average of the clients' products.

``divergence = ||B_hat A_hat - T||_F / ||T||_F`` with ``T = sum_u p_u B_u A_u``, per adapted layer.
Expanded as ``||B_hat A_hat||^2 - 2 <B_hat A_hat, T> + ||T||^2``: the first two terms cost
``O(U r^2 (d + k))`` from small Gram matrices. ``||T||^2`` needs every client pair: from the
``U r x U r`` Gram matrices of the stacked factors (``O((U r)^2 (d + k))``) while ``U r`` is small,
or from the dense ``d x k`` matrix, one layer at a time, when that is cheaper. So peak memory never
grows as ``U x d x k``. Everything is float64 and batched over a leading layer axis.
"""

from __future__ import annotations

import torch


def lowrank_inner(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """``<x1 @ y1, x2 @ y2>_F`` for ``x`` (..., d, m) and ``y`` (..., m, k) factors; batched.

    Through the ``m1 x m2`` cross-Gram matrices when they are smaller than the ``d x k`` product,
    else through the products one layer at a time: with ``m = U r`` (all clients' ranks stacked, as
    FLoRA and FedEx-LoRA have) the Gram matrices of 1,000 clients would take gigabytes, while the
    product stays ``d x k``.
    """
    x1, y1, x2, y2 = x1.double(), y1.double(), x2.double(), y2.double()
    d, k = x1.shape[-2], y1.shape[-1]
    if d * k <= x1.shape[-1] * x2.shape[-1]:
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (x1, y1, x2, y2)]
        per = [((flat[0][i] @ flat[1][i]) * (flat[2][i] @ flat[3][i])).sum() for i in range(len(flat[0]))]
        return torch.stack(per).reshape(x1.shape[:-2])
    gx = x1.transpose(-1, -2) @ x2  # (L, m1, m2)
    gy = y1 @ y2.transpose(-1, -2)  # (L, m1, m2)
    return (gx * gy).sum(dim=(-1, -2))


def lowrank_fro2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x @ y||_F^2`` for ``x`` (..., d, m) and ``y`` (..., m, k); see :func:`lowrank_inner`."""
    return lowrank_inner(x, y, x, y).clamp_min(0)


def stacked_factors(
    bs: torch.Tensor, as_: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B_1 .. B_U]`` (L, d, U r) and ``[p_1 A_1; ..; p_U A_U]`` (L, U r, k): their product is T."""
    n_layers, n_clients, d, r = bs.shape
    b_cat = bs.double().permute(0, 2, 1, 3).reshape(n_layers, d, n_clients * r)
    a_cat = (as_.double() * p.double().view(1, -1, 1, 1)).reshape(n_layers, n_clients * r, -1)
    return b_cat, a_cat


def exact_fro2(bs: torch.Tensor, as_: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``||sum_u p_u bs[u] @ as_[u]||_F^2`` for ``bs`` (L, U, d, r), ``as_`` (L, U, r, k), ``p`` (U,).

    Uses the Gram form while ``U r (d + k) < d k`` and the dense product otherwise.
    """
    return lowrank_fro2(*stacked_factors(bs, as_, p))


def lora_divergence(
    b_hat: torch.Tensor,
    a_hat: torch.Tensor,
    bs: torch.Tensor,
    as_: torch.Tensor,
    p: torch.Tensor,
    target_fro2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relative divergence of ``b_hat @ a_hat`` from ``sum_u p_u bs[u] @ as_[u]``, per layer.

    Shapes: ``b_hat`` (L, d, r'), ``a_hat`` (L, r', k), ``bs`` (L, U, d, r), ``as_`` (L, U, r, k),
    ``p`` (U,). ``target_fro2`` is :func:`exact_fro2` when the caller already has it.
    Returns (L,) float64; 0 where the target and the global product are both 0.
    """
    b_cat, a_cat = stacked_factors(bs, as_, p)
    t2 = lowrank_fro2(b_cat, a_cat) if target_fro2 is None else target_fro2
    hat2 = lowrank_fro2(b_hat, a_hat)
    cross = lowrank_inner(b_hat, a_hat, b_cat, a_cat)
    err2 = (hat2 - 2 * cross + t2).clamp_min(0)
    return (err2 / t2.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def ravan_divergence(
    h_global: torch.Tensor,
    h_exact: torch.Tensor,
    gram_b: torch.Tensor | None = None,
    gram_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||sum_i B_i (H_i - T_i) A_i||_F / ||sum_i B_i T_i A_i||_F`` per layer, in the head space.

    ``h_global`` and ``h_exact`` (the exact per-head average ``T_i``) are (L, h, r, r). The bases
    enter only through ``gram_b[l, i, j] = B_i^T B_j`` and ``gram_a[l, i, j] = A_i A_j^T``
    (L, h, h, r, r); ``None`` means orthonormal bases (Gram-Schmidt), where the norm is the plain
    Frobenius norm of the heads.
    """

    def fro2(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if gram_b is None or gram_a is None:
            return x.square().sum(dim=(1, 2, 3))
        return torch.einsum("liab,lijac,ljcd,ljidb->l", x, gram_b.double(), x, gram_a.double()).clamp_min(0)

    err2 = fro2(h_global.double() - h_exact.double())
    return (err2 / fro2(h_exact).clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
