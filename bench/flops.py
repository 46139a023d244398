"""Floating-point operations of a BERT classifier with adapters, counted from its shapes, and this
machine's measured matrix-product peak.

A multiply-add counts 2 FLOPs. Per sequence of ``L`` positions (padding included: the model computes
it) a block of width ``d`` and feed-forward width ``f`` does ``2 L (4 d^2 + 2 d f)`` in its six
frozen products and ``4 L^2 d`` in attention (scores and the weighted sum); each adapted linear adds
its LoRA factors, ``2 L r (d_in + d_out)``. Training runs the forward pass of every block from the
lowest adapted one up, then the backward pass through the same blocks: input gradients of every
product (the frozen weights get none), twice the attention's products, and the LoRA factors' input
and weight gradients; the lowest adapted block needs no gradient for its own input (its query, key
and value products' input gradients are not computed). The blocks below the lowest adapted one are
frozen and identical for every client: useful work computes them once per example, not per step,
so they are left out (what a run spends on them is overhead, not work).
``tests/test_bench_sim_train.py`` checks the count against torch's FLOP counter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BertShape:
    hidden: int
    intermediate: int
    layers: int
    num_classes: int

    @classmethod
    def of(cls, model: Any, num_classes: int) -> BertShape:
        """The shape of a :class:`export.models.MeanPoolClassifier` (or a peft model around one)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.encoder.config
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, num_classes)


def example_flops(
    shape: BertShape, seq_len: int, first_block: int, adapted_blocks: int, lora_rank: int, lora_linears: int
) -> tuple[float, float]:
    """(training, evaluation) FLOPs of one example from ``first_block`` up; ``lora_linears`` adapted
    ``d x d`` linears in each of ``adapted_blocks`` blocks."""
    d, f, n = shape.hidden, shape.intermediate, seq_len
    blocks = shape.layers - first_block
    products = 2 * n * (4 * d * d + 2 * d * f)  # q, k, v, attention output, feed-forward up and down
    attention = 4 * n * n * d  # scores and the weighted sum
    lora = adapted_blocks * lora_linears * 2 * n * lora_rank * 2 * d  # x A^T, then (x A^T) B^T
    head = n * d + 2 * d * shape.num_classes  # mean pooling and the classifier
    forward = blocks * (products + attention) + lora + head
    # Input gradients of every product and twice the attention's; the LoRA factors' input and weight
    # gradients (2 x their forward); none for the lowest block's input: neither its q, k and v
    # products' nor its LoRA A factors' (the lowest computed block is the lowest adapted one).
    lowest = 2 * n * 3 * d * d + lora_linears * 2 * n * lora_rank * d
    backward = blocks * (products + 2 * attention) - lowest + 2 * lora + 2 * head
    return forward + backward, forward


def gemm_peak_gflops(threads: int, size: int = 1024, seconds: float = 1.0) -> float:
    """The best float32 matrix-product rate (GFLOP/s) over about ``seconds``, with ``threads`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm up
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)
