"""Batched clients: local step t of many sampled clients as one forward and one backward pass.

One-by-one, a round of C clients runs C x steps small passes through the shared frozen base. Here
the clients' batches are stacked along a client dimension and run as one batch of ``C x B`` rows:
the frozen base is shared (its products take all rows at once), each client's trainable tensors are
stacked along a leading client dimension and every layer that owns one runs as a batched product
(``bmm``: LoRA's A and B, which peft computes as two ``nn.Linear``; the classifier head; Ravan's heads,
``C x h`` small products). Rows never mix in the base (no batch norm; attention, layer norm and
pooling act per example), so the sum of the clients' losses has, for client c's tensors, exactly
client c's gradient. Each client keeps its own SGD state, updated with torch.optim.SGD's formula
(weight decay, then momentum, then the step) on its rows only.

* Clients with fewer steps (or fewer batches) leave the batch when done.
* A smaller batch is padded with copies of the client's first example weighted zero: a zero weight
  gives exactly zero gradient, and the loss of a client is its real rows' sum over its batch size.
* Heterogeneous LoRA ranks are zero-padded to the spec's rank (``start_state``) and their gradient
  masked, as are Ravan heads a client does not train: those components get zero gradient and keep
  their values, as they do one by one.
* A base change a method made (FLoRA, FedEx-LoRA) is the same for every client of a round, so it is
  applied once for the whole batch.

:func:`unbatchable` says why a round cannot be batched (another trainer or optimizer, a trainable
tensor in a module without a batched form, base changes that differ); the transport then trains the
clients one by one and logs that reason once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_client.local_round import start_state, upload_state
from edge_client.trainer import Batch, EagerTrainer, Trainer, TrainMetrics, model_inputs
from export.base_delta import applied_base_delta, split_base_delta
from export.ravan import RavanLinear
from export.spec import AdapterSpec
from export.state import LORA_A, LORA_B, RAVAN_H, RAVAN_S, State
from sim.config import SimConfig
from sim.features import Inputs
from sim.transports import ClientJob, ClientResult, InProcTransport

Leaves = dict[str, torch.Tensor]  # trainable name -> (active clients, *shape), this step's leaves
log = logging.getLogger(__name__)


def trainable_owners(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Each module that directly owns a trainable parameter -> the parameters' full names."""
    owners: dict[nn.Module, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            owners.setdefault(owner, []).append(name)
    return owners


def unbatchable(trainer: Trainer, spec: AdapterSpec, jobs: list[ClientJob]) -> str | None:
    """Why these jobs cannot train as one batch (``None``: they can)."""
    if not isinstance(trainer, EagerTrainer):
        return f"the {type(trainer).__name__} trains one program per client"
    if trainer.opt_config.name != "sgd":
        return f"optimizer {trainer.opt_config.name} (batched clients reproduce SGD only)"
    for owner, names in trainable_owners(trainer.model).items():
        leaf_names = {n.rpartition(".")[2] for n in names}
        if isinstance(owner, RavanLinear) and leaf_names <= {"ravan_H", "ravan_s"}:
            continue
        if type(owner) is nn.Linear and "weight" in leaf_names:
            continue
        return f"trainable {names[0]} sits in a {type(owner).__name__}, which has no batched form"
    deltas = [split_base_delta(job.payload)[1] for job in jobs]
    first = deltas[0] if deltas else {}
    for delta in deltas[1:]:
        if delta.keys() != first.keys() or not all(torch.equal(delta[k], first[k]) for k in first):
            return "the clients' base changes differ"
    return None


def _linear_forward(module: nn.Linear, weight: str, bias: str | None, leaves: Leaves):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = leaves[weight]  # (C, out, in)
        rows = x.reshape(w.shape[0], -1, x.shape[-1])  # the client dimension leads the merged batch
        y = torch.bmm(rows, w.transpose(1, 2))
        if bias is not None:
            y = y + leaves[bias].unsqueeze(1)
        elif module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], w.shape[1])

    return forward


def _ravan_forward(module: RavanLinear, h_name: str | None, s_name: str | None, leaves: Leaves):
    heads, r = module.heads, module.head_rank

    def forward(x: torch.Tensor) -> torch.Tensor:
        # The clients' H_i and s_i; a frozen one (none today) is the module's own, for every client.
        c = next(iter(leaves.values())).shape[0]
        h = leaves[h_name] if h_name else module.ravan_H.expand(c, -1, -1, -1)
        s = leaves[s_name] if s_name else module.ravan_s.expand(c, -1)
        y = module.base(x)
        z = torch.mm(x.reshape(-1, x.shape[-1]), module.ravan_A.t())  # (C n, h r): shared bases
        z = z.view(c, -1, heads, r).permute(0, 2, 1, 3).reshape(c * heads, -1, r)
        sh = (s.view(c, heads, 1, 1) * h).reshape(c * heads, r, r)
        z = torch.bmm(z, sh.transpose(1, 2))  # x A_i^T (s_i H_i)^T per client and head
        z = z.view(c, heads, -1, r).permute(0, 2, 1, 3).reshape(-1, heads * r)
        return y + torch.mm(z, module.ravan_B.t()).view(*x.shape[:-1], -1)

    return forward


@contextmanager
def batched_forward(model: nn.Module, leaves: Leaves) -> Iterator[None]:
    """Within the block, every module owning a trainable tensor computes with ``leaves`` per client."""
    patched = []
    try:
        for owner, names in trainable_owners(model).items():
            by_leaf = {n.rpartition(".")[2]: n for n in names}
            if isinstance(owner, RavanLinear):
                fn = _ravan_forward(owner, by_leaf.get("ravan_H"), by_leaf.get("ravan_s"), leaves)
            else:
                fn = _linear_forward(owner, by_leaf["weight"], by_leaf.get("bias"), leaves)  # type: ignore[arg-type]
            owner.forward = fn  # an instance attribute, deleted below
            patched.append(owner)
        yield
    finally:
        for owner in patched:
            del owner.forward


def gradient_mask(spec: AdapterSpec, name: str, shape: torch.Size, job: ClientJob) -> torch.Tensor | None:
    """0/1 over a client's tensor: the components it does not train (padded rank, other heads)."""
    plan = job.plan
    lora_factor = name.endswith((LORA_A, LORA_B))
    if spec.family == "lora" and lora_factor and plan.rank is not None and plan.rank < spec.rank:
        mask = torch.zeros(shape)
        if name.endswith(LORA_A):
            mask[: plan.rank] = 1  # A is (rank, in)
        else:
            mask[:, : plan.rank] = 1  # B is (out, rank)
        return mask
    if spec.family == "ravan" and plan.heads is not None and name.endswith((RAVAN_H, RAVAN_S)):
        mask = torch.zeros(shape)
        mask[list(plan.heads)] = 1
        return mask
    return None


def merge_batches(batches: list[Batch]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """One batch of ``C x B`` rows (short batches padded with their first example), the 0/1 row
    weights (C, B) and each client's real batch size (C,)."""
    sizes = [int(b["labels"].shape[0]) for b in batches]
    width = max(sizes)
    pads = [torch.cat([torch.arange(n), torch.zeros(width - n, dtype=torch.int64)]) for n in sizes]
    merged: Batch = {
        key: torch.cat([b[key][pad] for b, pad in zip(batches, pads, strict=True)])
        for key in batches[0]
        if key != "start_layer"
    }
    if "start_layer" in batches[0]:
        merged["start_layer"] = batches[0]["start_layer"]
    weights = torch.stack([(torch.arange(width) < n).to(torch.float32) for n in sizes])
    return merged, weights, torch.tensor(sizes, dtype=torch.float32)


@dataclass
class _Sgd:
    """torch.optim.SGD's update (dampening 0, no Nesterov) on the stacked rows of the active clients."""

    lr: float
    momentum: float
    weight_decay: float

    def step(self, param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor | None:
        if self.weight_decay:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum:
            buf = grad.clone() if buf is None else buf.mul_(self.momentum).add_(grad)
            grad = buf
        param.add_(grad, alpha=-self.lr)
        return buf


def train_batched(
    trainer: EagerTrainer, spec: AdapterSpec, template: State, inputs: Inputs, jobs: list[ClientJob]
) -> list[ClientResult]:
    """Every job's local round, batched step by step; the same results as one by one (within float
    rounding: the products sum in another order)."""
    model, c = trainer.model, trainer.opt_config
    device = next(iter(template.values())).device
    sgd = _Sgd(c.lr, c.momentum, c.weight_decay)
    starts = [start_state(spec, {**job.payload, **(job.keep_local or {})}, template) for job in jobs]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    stacks = {k: torch.stack([s[k].to(device) for s in starts]).clone() for k in names}
    masks: dict[str, torch.Tensor] = {}
    for k in names:
        per_client = [gradient_mask(spec, k, stacks[k].shape[1:], job) for job in jobs]
        if any(m is not None for m in per_client):
            ones = torch.ones(stacks[k].shape[1:])
            masks[k] = torch.stack([ones if m is None else m for m in per_client]).to(device)
    bufs: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    batch_iters = [
        inputs.client_batches(
            job.client.indices, job.batch_size, job.plan.local_steps, np.random.default_rng(job.data_seed)
        )
        for job in jobs
    ]
    metrics = [TrainMetrics() for _ in jobs]
    active = list(range(len(jobs)))
    start = time.perf_counter()
    delta = split_base_delta(jobs[0].payload)[1] if jobs else {}
    with applied_base_delta(model, delta):
        while active:
            batches, still = [], []
            for i in active:
                batch = next(batch_iters[i], None) if metrics[i].steps < jobs[i].plan.local_steps else None
                if batch is not None:
                    still.append(i)
                    batches.append(batch)
            active = still
            if not active:
                break
            idx = torch.tensor(active, device=device)
            merged, weights, sizes = merge_batches(batches)
            merged = {k: v.to(device) for k, v in merged.items()}
            leaves = {k: stacks[k][idx].requires_grad_() for k in names}
            with batched_forward(model, leaves):
                logits = model(**model_inputs(merged))
            rows = nn.functional.cross_entropy(logits, merged["labels"], reduction="none")
            losses = (rows.view(len(active), -1) * weights.to(device)).sum(1) / sizes.to(device)
            bad = [(jobs[i].client.cid, float(v)) for i, v in zip(active, losses.detach(), strict=True)]
            bad = [(cid, v) for cid, v in bad if not np.isfinite(v)]
            if bad:
                step = metrics[active[0]].steps
                raise FloatingPointError(f"non-finite loss {bad[0][1]} at local step {step} ({bad[0][0]})")
            grads = torch.autograd.grad(losses.sum(), [leaves[k] for k in names], allow_unused=True)
            for k, grad in zip(names, grads, strict=True):
                if grad is None:  # not in the graph: torch.optim.SGD skips it too (no weight decay)
                    continue
                if k in masks:
                    grad = grad * masks[k][idx]
                param = leaves[k].detach()
                buf = bufs[k][idx] if bufs[k] is not None else None  # type: ignore[index]
                new_buf = sgd.step(param, grad, buf)
                stacks[k][idx] = param
                if new_buf is not None:
                    if bufs[k] is None:  # every client takes its first step together
                        bufs[k] = torch.zeros_like(stacks[k])
                    bufs[k][idx] = new_buf  # type: ignore[index]
            for i, loss, n in zip(active, losses.detach().tolist(), sizes.tolist(), strict=True):
                metrics[i].steps += 1
                metrics[i].examples += int(n)
                metrics[i].losses.append(loss)
    seconds = time.perf_counter() - start
    results = []
    for i, job in enumerate(jobs):
        metrics[i].seconds = seconds / len(jobs)  # the batch's time, shared
        trained = {k: stacks[k][i].clone() for k in names}
        keep = job.keep_local or {}
        upload = upload_state(spec, trained, job.plan)
        local = {k: trained[k] for k in keep}
        results.append(
            ClientResult(
                job.client.cid, {k: v for k, v in upload.items() if k not in keep}, metrics[i], local
            )
        )
    return results


class BatchedTransport(InProcTransport):
    """In this process, like :class:`InProcTransport`, but a round's clients train as one batch;
    a round that cannot be batched trains one by one, and the reason is logged once."""

    def __init__(self, *args: object, label: str = "", **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.label, self.said = label, set[str]()

    def run(self, spec: AdapterSpec, jobs: list[ClientJob]) -> list[ClientResult]:
        if not self.train_fn or not jobs:
            return super().run(spec, jobs)
        reason = unbatchable(self.trainer, spec, jobs)
        if reason is None:
            return train_batched(self.trainer, spec, self.template, self.train_inputs, jobs)  # type: ignore[arg-type]
        if reason not in self.said:
            self.said.add(reason)
            log.warning(
                "batched clients off for %s: %s; training them one by one", self.label or spec.family, reason
            )
        return super().run(spec, jobs)


def batched_by_default(config: SimConfig, device: str) -> bool:
    """``--batched auto``: on the GPU only (one large product instead of many small kernel launches).

    On the CPU the client workers (sim/pool.py) are faster. Measured on this 2-core CPU, idle
    (MiniLM, one round of 10 clients x <= 8 steps x 16 examples of 64 tokens, adapters on every
    block): 2 workers x 1 thread 18.7 s, one by one with 2 threads 19.5 s, batched with 2 threads
    24.7 s. Earlier, at load ~5 and one thread, batched had led one by one 68 s to 74 s (all blocks,
    32 tokens), inside the noise of a loaded machine. ``--batched on`` forces it.
    """
    return config.trainer == "eager" and device == "cuda"
