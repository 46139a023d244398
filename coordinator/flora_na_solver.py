"""FLoRA-NA's server problem: coefficients ``p, q`` with ``(sum p_u B_u)(sum q_u A_u) ~ T`` (METHODS.md 4).

``T = sum_u pi_u B_u A_u`` is the exact weighted average. Two solvers, both batched over a leading
layer axis (``bs`` (L, U, d, r), ``as_`` (L, U, r, k), float64):

* :func:`solve_als`, the production solver [ours]: alternating least squares in trace form. With
  ``A_hat`` fixed the best ``p`` solves ``G p = b`` with ``G_uv = tr(B_u^T B_v A_hat A_hat^T)``
  and ``b_u = <B_u, T A_hat^T>``; written as ``G = F F^T`` with ``F_u = B_u C^{1/2}``
  (``C = A_hat A_hat^T``, r x r) this costs ``O(U^2 r d + U r^2 d)`` and never forms a ``d x k``
  matrix. The ``q`` step is the mirror image. Each step is an exact block minimisation, so the
  objective never increases (a step that would, through round-off or the ridge, is rejected).
* :func:`solve_dense`, the reference: Adam on ``(p, q)`` against the dense ``d x k`` residual,
  keeping the best iterate ("paper-like", METHODS.md 4.3). Used to cross-check the ALS solver.

Both start at the FedIT point ``p = q = pi``, so neither can end above FedIT's divergence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Coefficients:
    """A solver's answer: ``p``, ``q`` (L, U), ``objective`` (L,) = ``||B_hat A_hat - T||_F^2`` and
    ``history`` (steps + 1, L), the objective after each accepted-or-rejected step, starting at FedIT's.
    """

    p: torch.Tensor
    q: torch.Tensor
    objective: torch.Tensor
    history: torch.Tensor


def _psd_sqrt_factor(c: torch.Tensor) -> torch.Tensor:
    """``X`` (L, r, r) with ``X X^T = c`` for a batch of symmetric PSD ``c``."""
    evals, evecs = torch.linalg.eigh(c)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def p_system(bs: torch.Tensor, as_: torch.Tensor, pi: torch.Tensor, a_hat: torch.Tensor):
    """Normal equations ``(G, b)`` of the ``p`` step for a fixed ``A_hat`` (L, r, k): (L, U, U), (L, U)."""
    root = _psd_sqrt_factor(a_hat @ a_hat.transpose(1, 2))  # (L, r, r)
    f = (bs @ root.unsqueeze(1)).flatten(2)  # (L, U, d r): B_u C^{1/2}
    gram = f @ f.transpose(1, 2)
    t_a = torch.einsum("lwdr,lwrs,w->lds", bs, as_ @ a_hat.unsqueeze(1).transpose(-1, -2), pi)  # T A_hat^T
    return gram, torch.einsum("ludr,ldr->lu", bs, t_a)


def q_system(bs: torch.Tensor, as_: torch.Tensor, pi: torch.Tensor, b_hat: torch.Tensor):
    """Normal equations ``(G', b')`` of the ``q`` step for a fixed ``B_hat`` (L, d, r)."""
    root = _psd_sqrt_factor(b_hat.transpose(1, 2) @ b_hat).transpose(1, 2)  # X^T X = B_hat^T B_hat
    f = (root.unsqueeze(1) @ as_).flatten(2)  # (L, U, r k)
    gram = f @ f.transpose(1, 2)
    bt_b = b_hat.unsqueeze(1).transpose(-1, -2) @ bs  # (L, U, r, r): B_hat^T B_w
    b_t = torch.einsum("lwrs,lwsk,w->lrk", bt_b, as_, pi)  # B_hat^T T
    return gram, torch.einsum("lurk,lrk->lu", as_, b_t)


def _solve_ridge(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + ridge * mean(diag G) I)^{-1} b``; the ridge keeps singular ``G`` (similar clients) solvable."""
    n = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + (ridge * scale)[:, None, None] * eye, rhs.unsqueeze(-1)).squeeze(-1)


def _quadratic(gram: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """``x^T G x - 2 b^T x + ||T||^2``: the objective in the step's coordinates."""
    return (torch.einsum("lu,luv,lv->l", x, gram, x) - 2 * (rhs * x).sum(-1) + t2).clamp_min(0)


def solve_als(
    bs: torch.Tensor,
    as_: torch.Tensor,
    pi: torch.Tensor,
    target_fro2: torch.Tensor,
    *,
    sweeps: int = 10,
    tol: float = 1e-6,
    ridge: float = 1e-10,
) -> Coefficients:
    """Alternating least squares in trace form from the FedIT point; see the module docstring.

    ``target_fro2`` is ``||T||_F^2`` per layer (:func:`coordinator.divergence.exact_fro2`). Stops after
    ``sweeps`` (p, q) sweeps or when no layer's objective fell by more than ``tol`` (relative) in a sweep.
    """
    n_layers = bs.shape[0]
    p = pi.expand(n_layers, -1).clone()
    q = p.clone()
    a_hat = torch.einsum("lu,lurk->lrk", q, as_)
    gram, rhs = p_system(bs, as_, pi, a_hat)
    best = _quadratic(gram, rhs, p, target_fro2)
    history = [best]
    active = torch.ones_like(best, dtype=torch.bool)  # a converged layer stops, as if solved alone
    for _ in range(sweeps):
        start = best
        p_new = _solve_ridge(gram, rhs, ridge)
        value = _quadratic(gram, rhs, p_new, target_fro2)
        better = active & (value <= best)
        p, best = torch.where(better[:, None], p_new, p), torch.where(better, value, best)
        history.append(best)

        gram, rhs = q_system(bs, as_, pi, torch.einsum("lu,ludr->ldr", p, bs))
        q_new = _solve_ridge(gram, rhs, ridge)
        value = _quadratic(gram, rhs, q_new, target_fro2)
        better = active & (value <= best)
        q, best = torch.where(better[:, None], q_new, q), torch.where(better, value, best)
        history.append(best)

        active &= (start - best) > tol * start
        if not bool(active.any()):
            break
        gram, rhs = p_system(bs, as_, pi, torch.einsum("lu,lurk->lrk", q, as_))
    return Coefficients(p=p, q=q, objective=best, history=torch.stack(history))


def solve_dense(
    bs: torch.Tensor, as_: torch.Tensor, pi: torch.Tensor, *, steps: int = 300, lr: float = 1e-2
) -> Coefficients:
    """Adam on ``(p, q)`` against the dense residual ``B_hat A_hat - T`` (L x d x k), best iterate kept.

    The step size is ``lr * max(pi)`` so it is relative to the coefficients' scale [ours].
    """
    n_layers, n_clients, d, r = bs.shape
    k = as_.shape[-1]
    b_cat = bs.permute(0, 2, 1, 3).reshape(n_layers, d, n_clients * r)
    target = b_cat @ (as_ * pi.view(1, -1, 1, 1)).reshape(n_layers, n_clients * r, k)
    params = torch.stack([pi.expand(n_layers, -1), pi.expand(n_layers, -1)]).clone()  # (2, L, U)
    moment1, moment2 = torch.zeros_like(params), torch.zeros_like(params)
    step_size = lr * float(pi.max())
    best_params, best = (
        params.clone(),
        torch.full((n_layers,), float("inf"), dtype=bs.dtype, device=bs.device),
    )
    history = []
    for step in range(steps + 1):
        b_hat = torch.einsum("lu,ludr->ldr", params[0], bs)
        a_hat = torch.einsum("lu,lurk->lrk", params[1], as_)
        residual = b_hat @ a_hat - target
        loss = residual.square().sum(dim=(1, 2))
        improved = loss < best
        best = torch.where(improved, loss, best)
        best_params = torch.where(improved[None, :, None], params, best_params)
        history.append(best)
        if step == steps:
            break
        grad = torch.stack(
            [
                2 * torch.einsum("ludr,ldr->lu", bs, residual @ a_hat.transpose(1, 2)),
                2 * torch.einsum("lurk,lrk->lu", as_, b_hat.transpose(1, 2) @ residual),
            ]
        )
        moment1.mul_(0.9).add_(grad, alpha=0.1)
        moment2.mul_(0.999).addcmul_(grad, grad, value=0.001)
        m_hat = moment1 / (1 - 0.9 ** (step + 1))
        v_hat = moment2 / (1 - 0.999 ** (step + 1))
        params = params - step_size * m_hat / (v_hat.sqrt() + 1e-12 * v_hat.amax().sqrt() + 1e-300)
    return Coefficients(p=best_params[0], q=best_params[1], objective=best, history=torch.stack(history))
