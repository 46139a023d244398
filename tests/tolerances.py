"""Numerical tolerances for the tests, each derived from the computation it checks (never from the
figure one machine printed: another CPU sums in another order, fuses multiply-adds, vectorises exp).

``u`` is the dtype's unit roundoff (``finfo.eps / 2``: 2^-24 for float32, 2^-53 for float64). Two
models of rounding error, both independent of the order in which a CPU code path sums:

* worst case (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and
  eq. 3.5): a sum or dot product of ``n`` terms, in any order, blocked or fused, is off by at most
  ``gamma_n * sum |terms|`` with ``gamma_n = n u / (1 - n u)``. Used for single reductions.
* probabilistic (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019, Thm. 2.4): with independent
  rounding errors the same error is at most ``lambda sqrt(n) u * sum |terms|`` except with
  probability ``2 n exp(-lambda^2 / 2)``. Used for whole networks, where the worst case of every
  reduction lining up is orders of magnitude pessimistic; ``lambda = 6`` makes a miss a ~1e-7 event.

``torch.testing.assert_close``'s defaults (float32: rtol 1.3e-6 ~ 22 u, atol 1e-5; float64: rtol 1e-7,
atol 1e-7) are used only where the computation is a handful of roundings of O(1) values, well inside
them (float32's default rtol is ~22 roundings); a test says so where it relies on them.
"""

from __future__ import annotations

import math

import torch

# The probabilistic bound's lambda: a reduction exceeds lambda sqrt(n) u sum|terms| with probability
# below 2 n exp(-18) ~ 3e-8 n.
LAMBDA = 6.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative error of one correctly rounded operation in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_n``: worst-case relative error (to ``sum |terms|``) of ``n`` accumulated terms."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"gamma_{n} undefined in {dtype}"
    return nu / (1 - nu)


def sum_tol(n: int, dtype: torch.dtype, magnitude: float = 1.0) -> float:
    """Worst-case error of a sum or dot product of ``n`` terms whose absolute values sum to ``magnitude``."""
    return gamma(n, dtype) * magnitude


def network_tol(
    width: int, reductions: int, dtype: torch.dtype = torch.float32, magnitude: float = 1.0
) -> float:
    """Error of ``reductions`` chained, well-conditioned (layer-normalised) reductions of at most
    ``width`` terms each, terms' absolute values summing to ``magnitude``: the probabilistic bound
    per reduction (``LAMBDA sqrt(width) u``), adding to first order along the chain."""
    return reductions * LAMBDA * math.sqrt(width) * unit_roundoff(dtype) * magnitude


# tiny-bert (export/models.py): hidden 32, intermediate 64, 2 layers, sequence <= 16. One layer chains
# 8 reductions (q/k/v, scores, softmax, scores @ v, output, layer norm, FFN up, FFN down; the second
# layer norm folds into the next layer's), so 2 x 8 + mean-pool + classifier = 18 in the forward pass;
# the backward pass mirrors it (x2), widest reduction 64. Logits and losses are O(1) (layer-normalised
# hidden states, weights of std 0.02), so magnitude 1.
TINY_BERT_FORWARD_TOL = network_tol(64, 18)
TINY_BERT_TRAIN_TOL = network_tol(64, 2 * 18)


def stored_product_rel(terms: int, rank: int) -> float:
    """Relative error of a low-rank product whose factors a method computed in float64 and stored in
    float32: u per stored entry, so ``gamma_(2 + terms)`` of ``sum |B_ir A_rj|`` per entry over
    ``terms`` stacked rank-1 terms; ``sum |terms|`` stays within ``rank`` times ``|product|`` (in
    Frobenius norm) for the tests' Gaussian factors."""
    return rank * gamma(2 + terms, torch.float32)


def divergence_abs(clients: int, rank: int, dim: int) -> float:
    """Absolute error of a float64 divergence ``sqrt((||X||^2 - 2 <X, T> + ||T||^2) / ||T||^2)``
    (coordinator/divergence.py) near 0: three terms of size ``||T||^2`` that cancel, each a sum of at
    most ``(clients rank)^2`` Gram products of ``dim``-term dot products, so the numerator is off by
    ``4 gamma_n ||T||^2`` and the divergence by its square root."""
    return math.sqrt(4 * gamma((clients * rank) ** 2 * dim, torch.float64))
