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


def exact_fro2(bs: torch.Tensor, as_: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``||sum_u p_u bs[u] @ as_[u]||_F^2`` for ``bs`` (L, U, d, r), ``as_`` (L, U, r, k), ``p`` (U,).

    Uses the Gram form while ``U r (d + k) < d k`` and the dense product otherwise.
    """
    n_layers, n_clients, d, r = bs.shape
    k = as_.shape[-1]
    m = n_clients * r
    b_cat = bs.double().permute(0, 2, 1, 3).reshape(n_layers, d, m)  # [B_1 .. B_U]
    a_cat = (as_.double() * p.double().view(1, -1, 1, 1)).reshape(n_layers, m, k)  # [p_1 A_1; ..]
    if m * (d + k) < d * k:
        return lowrank_fro2(b_cat, a_cat)
    return torch.stack([(b_cat[i] @ a_cat[i]).square().sum() for i in range(n_layers)])


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
    b64, a64 = b_hat.double(), a_hat.double()
    t2 = exact_fro2(bs, as_, p) if target_fro2 is None else target_fro2
    hat2 = lowrank_fro2(b64, a64)
    bb = b64.unsqueeze(1).transpose(-1, -2) @ bs.double()  # (L, U, r', r): B_hat^T B_u
    aa = as_.double() @ a64.unsqueeze(1).transpose(-1, -2)  # (L, U, r, r'): A_u A_hat^T
    cross = torch.einsum("luij,luji,u->l", bb, aa, p.double())
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
