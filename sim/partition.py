"""Splitting a data set's training examples over the simulator's virtual clients.

Every function returns one sorted int64 index array per client; together the arrays are disjoint and
cover every example. All randomness comes from ``numpy.random.default_rng(seed)``, so a partition is a
pure function of its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

MAX_DIRICHLET_DRAWS = 1000


def _check_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < num_clients:
        raise ValueError(
            f"cannot split {num_examples} examples over {num_clients} clients without empty ones"
        )


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and deal it into ``num_clients`` parts whose sizes differ by at most one."""
    _check_clients(num_clients, n)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed split: each class is shared among clients in Dirichlet(``alpha``) proportions.

    The usual federated-learning recipe (Hsu et al. 2019; Li et al. 2022, "Federated learning on
    non-IID data silos"): for every class draw ``p ~ Dir(alpha * 1)`` over clients, give no more of
    that class to clients that already hold more than an equal share, and cut the class's shuffled
    examples at the cumulative proportions. The whole draw is repeated until every client has at
    least ``min_size`` examples. Small ``alpha`` gives each client few classes; large ``alpha``
    approaches an IID split.

    Parameters
    ----------
    labels : numpy.ndarray
        1-D integer class label of every example.
    num_clients : int
        Number of parts.
    alpha : float
        Dirichlet concentration, > 0.
    seed : int
        Seed of the draw.
    min_size : int
        Smallest acceptable client (every client gets at least one example regardless); raises
        ``ValueError`` if no draw reaches it after ``MAX_DIRICHLET_DRAWS`` tries.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    _check_clients(num_clients, len(labels))
    if num_clients * min_size > len(labels):
        raise ValueError(f"{num_clients} clients x min_size {min_size} exceeds {len(labels)} examples")
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    fair_share = len(labels) / num_clients
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in classes:
            members = rng.permutation(members)
            p = rng.dirichlet(np.full(num_clients, alpha))
            capped = p * (sizes < fair_share)
            # At tiny alpha the uncapped clients' draws can all underflow to 0; fall back to p then.
            p = capped / capped.sum() if capped.sum() > 0 else p / p.sum()
            cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= max(min_size, 1):
            return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_DRAWS} gave all {num_clients} clients "
        f">= {min_size} examples; raise alpha or lower num_clients or min_size"
    )


def natural_partition(groups: Sequence[Hashable], num_clients: int, seed: int) -> list[np.ndarray]:
    """Split by a natural key (author, speaking role, news agency): a group never spans two clients.

    With as many clients as groups each client is one group (in a seeded random order); with fewer,
    groups are shuffled, then placed largest first on the client holding the fewest examples, so
    client sizes stay balanced.

    Parameters
    ----------
    groups : sequence of hashable
        The group of every example.
    num_clients : int
        Number of parts, at most the number of distinct groups.
    seed : int
        Seed of the group order.
    """
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(members):
        raise ValueError(f"cannot split {len(members)} groups over {num_clients} clients without empty ones")
    blocks = [np.asarray(members[g], dtype=np.int64) for g in members]
    order = np.random.default_rng(seed).permutation(len(blocks))
    by_size = sorted(order, key=lambda b: -len(blocks[b]))  # stable: ties keep the seeded order
    assigned: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for block in by_size:
        client = int(np.argmin(sizes))
        assigned[client].append(blocks[block])
        sizes[client] += len(blocks[block])
    return [np.sort(np.concatenate(chunks)) for chunks in assigned]


def label_skew(parts: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the pooled one.

    0 when every client has the pooled class mix; approaches 1 when clients hold disjoint classes.
    The pooled distribution is that of all examples in ``parts``; every client counts equally.
    """
    labels = np.asarray(labels)
    if not parts:
        raise ValueError("label_skew needs at least one part")
    if any(len(part) == 0 for part in parts):
        raise ValueError("label_skew is undefined for an empty part")
    _, codes = np.unique(labels, return_inverse=True)
    num_classes = int(codes.max()) + 1
    counts = np.stack([np.bincount(codes[np.asarray(part)], minlength=num_classes) for part in parts])
    pooled = counts.sum(axis=0) / counts.sum()
    dists = counts / counts.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(dists - pooled).sum(axis=1).mean())
