"""``fleetlora bench aggregate``: time every aggregation method on MiniLM- and 7B-shaped LoRA.

For K in {10, 100, 1000} clients it times each registered method on synthetic uploads, then, side by
side in the same run:

* FedRPCA's batched PCP against :func:`numpy_pcp`, the textbook per-matrix inexact ALM (same
  tolerance; the answers must agree within 1e-5);
* FLoRA-NA's trace-form ALS against its dense solver (and their divergences).

Where the uploads or the run time would not fit this machine, a configuration uses fewer layers
(always printed). The last line is ``aggregate: fedrpca_speedup=<x> flora_na_speedup=<y>`` at K = 100
on the largest shape where both sides were measured.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

import numpy as np
import torch

from coordinator.aggregators import Aggregator, ClientUpdate, available, create, get
from coordinator.rpca import pcp
from export.spec import AdapterSpec
from export.state import LORA_A, LORA_B, RAVAN_H, RAVAN_HEADS, RAVAN_S


def numpy_pcp(m: np.ndarray, lam: float | None = None, tol: float = 1e-7, max_iter: int = 1000):
    """The textbook inexact-ALM PCP of one matrix (Lin, Chen & Ma 2010), for comparison only."""

    def shrink(x: np.ndarray, tau: float | np.floating) -> np.ndarray:
        return np.sign(x) * np.maximum(np.abs(x) - tau, 0)

    rows, cols = m.shape
    lam = 1 / np.sqrt(max(rows, cols)) if lam is None else lam
    norm_two = np.linalg.norm(m, 2)
    y = m / max(norm_two, np.abs(m).max() / lam)
    mu, rho = 1.25 / norm_two, 1.5
    mu_bar = mu * 1e7
    m_fro = np.linalg.norm(m)
    low, sparse = np.zeros_like(m), np.zeros_like(m)
    for _ in range(max_iter):
        u, s, vt = np.linalg.svd(m - sparse + y / mu, full_matrices=False)
        low = u @ np.diag(shrink(s, 1 / mu)) @ vt
        sparse = shrink(m - low + y / mu, lam / mu)
        gap = m - low - sparse
        y = y + mu * gap
        mu = min(mu * rho, mu_bar)
        if np.linalg.norm(gap) / m_fro < tol:
            break
    return low, sparse


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int  # d = k
    rank: int
    layers: int  # adapted layers (q and v of each block)


MINILM = Shape("MiniLM", 384, 8, 12)
LLAMA7B = Shape("7B", 4096, 16, 64)


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def lora_round(shape: Shape, clients: int, layers: int, seed: int):
    """A global LoRA state and ``clients`` uploads: shared drift plus client-specific noise."""
    gen = torch.Generator().manual_seed(seed)
    d, r = shape.dim, shape.rank
    glob, updates = {}, []
    drift = {}
    for i in range(layers):
        prefix = f"layer.{i // 2}.{('query', 'value')[i % 2]}"
        glob[prefix + LORA_A] = torch.randn(r, d, generator=gen) / d**0.5
        glob[prefix + LORA_B] = torch.randn(d, r, generator=gen) * 0.01
        drift[prefix] = (torch.randn(r, d, generator=gen) * 1e-2, torch.randn(d, r, generator=gen) * 1e-2)
    for c in range(clients):
        state = {}
        for prefix, (da, db) in drift.items():
            state[prefix + LORA_A] = glob[prefix + LORA_A] + da + 3e-3 * torch.randn(r, d, generator=gen)
            state[prefix + LORA_B] = glob[prefix + LORA_B] + db + 3e-3 * torch.randn(d, r, generator=gen)
        updates.append(
            ClientUpdate(f"c{c}", state, num_examples=int(torch.randint(10, 100, (1,), generator=gen)))
        )
    return glob, updates


def ravan_round(spec: AdapterSpec, shape: Shape, clients: int, layers: int, seed: int):
    """A global Ravan state and uploads of a random subset of heads per client."""
    gen = torch.Generator().manual_seed(seed)
    r_h = spec.ravan_head_rank(shape.dim, shape.dim)
    glob = {}
    for i in range(layers):
        prefix = f"layer.{i // 2}.{('query', 'value')[i % 2]}"
        glob[prefix + RAVAN_H] = torch.randn(spec.heads, r_h, r_h, generator=gen) * 1e-2
        glob[prefix + RAVAN_S] = torch.ones(spec.heads)
    updates = []
    for c in range(clients):
        n_heads = int(torch.randint(1, spec.heads + 1, (1,), generator=gen))
        heads = torch.randperm(spec.heads, generator=gen)[:n_heads].sort().values
        state = {}
        for key in glob:
            if key.endswith(RAVAN_H):
                state[key] = glob[key][heads] + 1e-3 * torch.randn(n_heads, r_h, r_h, generator=gen)
                state[key[: -len(RAVAN_H)] + RAVAN_HEADS] = heads.clone()
        updates.append(
            ClientUpdate(f"c{c}", state, num_examples=int(torch.randint(10, 100, (1,), generator=gen)))
        )
    return glob, updates


def as_uploaded(agg: Aggregator, spec: AdapterSpec, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The uploads as this method's clients send them: no frozen A (FFA-LoRA), no local B (FedSA)."""
    dropped = tuple(agg.local_suffixes) + ((LORA_A,) if agg.client_spec(spec).freeze_a else ())
    if not dropped:
        return updates
    return [replace(u, state={k: v for k, v in u.state.items() if not k.endswith(dropped)}) for u in updates]


def layers_for(shape: Shape, clients: int, budget_bytes: float) -> int:
    """Adapted layers whose uploads (float32) fit ``budget_bytes``: at least 2 (one q, one v)."""
    per_layer = clients * 2 * shape.dim * shape.rank * 4
    return max(2, min(shape.layers, int(budget_bytes // per_layer) // 2 * 2))


def compare_rpca(glob, updates, layers: int) -> tuple[float, float, float]:
    """(numpy seconds, torch seconds, max relative difference) on the A and B problems of ``layers``."""
    prefixes = sorted({k[: -len(LORA_A)] for k in glob if k.endswith(LORA_A)})[:layers]
    problems = []
    for prefix in prefixes:
        for key in (prefix + LORA_A, prefix + LORA_B):
            problems.append(torch.stack([(u.state[key] - glob[key]).flatten() for u in updates], 1).double())
    t_numpy, ref = timed(lambda: [numpy_pcp(m.numpy()) for m in problems])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the aggregators' "auto"
    pcp(problems[0][:64, :8].to(device))  # a coordinator is warm: no CUDA start-up in the timing
    t_torch, res = timed(lambda: pcp(torch.stack(problems).to(device)))  # the copy is timed too
    diffs = [0.0]
    for i, (low, sparse) in enumerate(ref):
        scale = float(np.linalg.norm(problems[i].numpy()))
        diffs.append(float(np.linalg.norm(res.low_rank[i].cpu().numpy() - low)) / scale)
        diffs.append(float(np.linalg.norm(res.sparse[i].cpu().numpy() - sparse)) / scale)
    return t_numpy, t_torch, max(diffs)


def plan(
    shape: Shape, clients: int, quick: bool, budget_bytes: float, gpu: bool = False
) -> tuple[int, set[str], str]:
    """(layers, methods to skip, note) for one configuration.

    Memory bounds the uploads; time bounds FedRPCA (``O(D K^2)`` per PCP iteration, an ``eigh`` of
    ``K x K``) and the dense FLoRA-NA reference (``d x k`` products per Adam step) on 2 CPU cores.
    A GPU runs the dense reference on 7B-shaped layers too (seconds there, tens of minutes on 2 cores),
    and ``--quick`` there measures 7B at K = 100 as well, without the textbook PCP.
    """
    layers = layers_for(shape, clients, budget_bytes)
    skip: set[str] = set()
    if quick:
        layers = 2
        if clients >= 1000:
            skip.add("fedrpca")
        if shape is LLAMA7B:
            skip.add("flora_na/dense")
            if clients == 100:  # only a GPU gets here; the textbook alone would take ~20 s
                skip.add("pcp/numpy")
    elif shape is LLAMA7B or clients >= 1000:
        layers = min(layers, 2)
        if shape is LLAMA7B:  # Adam on dense 4096 x 4096 products: longer than the rest together
            skip.add("flora_na/dense")
        if shape is LLAMA7B and clients >= 1000:
            skip.add("fedrpca")
    if clients >= 1000:
        skip.add("flora_na/dense")
    if gpu and clients < 1000:
        skip.discard("flora_na/dense")
    note = "" if layers == shape.layers else f"{layers} of {shape.layers} layers"
    if skip:
        note += f"; skipped (time): {','.join(sorted(skip))}"
    return layers, skip, note


def run_config(
    shape: Shape, clients: int, layers: int, skip: set[str], note: str, seed: int, ratios: dict[str, float]
) -> None:
    """Time every method on one (shape, K) configuration and the side-by-side comparisons at K = 100."""
    lora_spec = AdapterSpec(rank=shape.rank, heads=4)
    ravan_spec = AdapterSpec(family="ravan", rank=shape.rank, heads=4)
    glob, updates = lora_round(shape, clients, layers, seed)

    def row(method: str, seconds: float, divergence: float, text: str, n: int = layers) -> None:
        line = f"{shape.name:7} {clients:5} {n:6} {method:14} {seconds:9.3f} {divergence:11.3e}  {text}"
        print(line, flush=True)

    for name in available():
        if name in skip:
            continue
        if get(name).family == "ravan":
            r_glob, r_updates = ravan_round(ravan_spec, shape, clients, layers, seed)
            agg = create(name, ravan_spec)
            seconds, _ = timed(partial(agg.aggregate, r_glob, r_updates))
        else:
            agg = create(name, lora_spec)
            sent = as_uploaded(agg, lora_spec, updates)
            seconds, _ = timed(partial(agg.aggregate, glob, sent))
        div = agg.metrics.get("divergence", float("nan"))
        row(name, seconds, div, note)
        if name == "flora_na" and "flora_na/dense" not in skip:
            dense = create(name, lora_spec, solver="dense")
            t_dense, _ = timed(partial(dense.aggregate, glob, updates))
            d_div = dense.metrics["divergence"]
            verdict = "no worse" if div <= d_div * (1 + 1e-9) else "WORSE"
            row(
                "flora_na/dense", t_dense, d_div, f"ALS {t_dense / seconds:.1f}x faster, divergence {verdict}"
            )
            if clients == 100:
                ratios["flora_na"] = t_dense / seconds  # the largest shape measured wins
    if clients == 100 and not skip & {"fedrpca", "pcp/numpy"}:
        rpca_layers = layers if shape is MINILM else 1
        t_np, t_torch, diff = compare_rpca(glob, updates, rpca_layers)
        text = (
            f"torch PCP {t_torch:.3f}s on the same {2 * rpca_layers} problems: "
            f"{t_np / t_torch:.1f}x faster, max rel diff {diff:.1e}"
        )
        row("pcp/numpy", t_np, float("nan"), text, n=rpca_layers)
        ratios["fedrpca"] = t_np / t_torch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleetlora bench aggregate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 layers per shape, 7B at K=10 only (K<=100 on a GPU); under a minute",
    )
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated K values")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="budget for the synthetic uploads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clients_list = [int(c) for c in args.clients.split(",")]
    budget = args.memory_gb * 2**30
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device={device} threads={torch.get_num_threads()} methods={','.join(available())}", flush=True)
    header = f"{'shape':7} {'K':>5} {'layers':>6} {'method':14} {'seconds':>9} {'divergence':>11}  note"
    print(header)
    print("-" * len(header), flush=True)
    ratios: dict[str, float] = {}
    for shape in (MINILM, LLAMA7B):
        for clients in clients_list:
            if args.quick and shape is LLAMA7B and clients > (100 if device == "cuda" else 10):
                continue
            layers, skip, note = plan(shape, clients, args.quick, budget, gpu=device == "cuda")
            run_config(shape, clients, layers, skip, note, args.seed, ratios)
    print(
        f"aggregate: fedrpca_speedup={ratios.get('fedrpca', float('nan')):.1f} "
        f"flora_na_speedup={ratios.get('flora_na', float('nan')):.1f}"
    )
    return 0
