"""One client's part of a round, the same code on a real device and in the simulator.

Download -> the client's slice of the global (:func:`export.adapters.rank_view`) -> start state
(Ravan: ``s_i = 1``; a lower-rank LoRA payload zero-padded to the model's rank) -> train within the
budget -> upload (Ravan: ``s_i H_i`` of the trained heads only; LoRA: the client's rank slice;
FFA-LoRA: B only, since A never trains).

A payload may also carry a change of the frozen base (FLoRA, FedEx-LoRA; keys in
:mod:`export.state`): it is applied for the round through the trainer's ``base_delta`` context and
removed afterwards, never trained and never uploaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from edge_client.trainer import Batch, Trainer, TrainMetrics
from export.adapters import lora_rank_slice, rank_view, ravan_upload, start_state
from export.base_delta import split_base_delta
from export.spec import AdapterSpec
from export.state import BASE_VERSION, State


@dataclass(frozen=True)
class LocalPlan:
    """What this client does this round: its local steps, its LoRA rank and Ravan heads (``None`` = the
    spec's all) and its batch size (``None``: the caller's own; made by :mod:`edge_client.planner`)."""

    local_steps: int
    rank: int | None = None
    heads: tuple[int, ...] | None = None
    batch_size: int | None = None


def base_delta_context(trainer: object, payload: State) -> AbstractContextManager[None]:
    """The payload's base delta applied to the trainer's model for the ``with`` block.

    A backend without ``base_delta`` (the ExecuTorch program bakes its base in) cannot follow a method
    that changes the base: that is refused here rather than trained on a stale base.
    """
    _, delta = split_base_delta(payload)
    if not any(k != BASE_VERSION for k in delta):
        return nullcontext()
    apply = getattr(trainer, "base_delta", None)
    if apply is None:
        raise TypeError(
            f"{type(trainer).__name__} cannot apply a base delta; this method needs the eager trainer"
        )
    return apply(delta)


def upload_state(spec: AdapterSpec, trained: State, plan: LocalPlan) -> State:
    """What the client sends after training (a slice of its trainable state)."""
    if spec.family == "ravan":
        return ravan_upload(trained, list(plan.heads) if plan.heads is not None else None)
    if plan.rank is not None and plan.rank < spec.rank:
        return lora_rank_slice(trained, plan.rank)
    return dict(trained)


def run_local_round(
    trainer: Trainer,
    spec: AdapterSpec,
    payload: State,
    template: State,
    batches: Iterable[Batch],
    plan: LocalPlan,
    keep_local: State | None = None,
    eval_batches: Iterable[Batch] | None = None,
) -> tuple[State, TrainMetrics]:
    """Train one round from ``payload`` and return (upload, metrics).

    ``keep_local``: tensors the client keeps between rounds instead of taking them from the payload
    (personalised methods, FedSA-LoRA's B); they override the payload and are not uploaded. Their
    trained values are what ``trainer.get_trainable()`` holds after the call.
    ``eval_batches``: the client's validation examples; the received adapter is evaluated on them
    before training (``metrics.evaluation``), by a trainer that can evaluate.
    """
    state = dict(rank_view(payload, plan.rank))  # the device's slice of the one global
    if keep_local:
        state.update(keep_local)
    with base_delta_context(trainer, state):
        trainer.set_trainable(start_state(spec, state, template))
        evaluate = getattr(trainer, "evaluate", None)
        evaluation = evaluate(eval_batches) if eval_batches is not None and evaluate is not None else None
        if spec.family == "ravan":
            trainer.select_heads(list(plan.heads) if plan.heads is not None else None)
        metrics = trainer.train(batches, plan)
        metrics.evaluation = evaluation
    upload = upload_state(spec, trainer.get_trainable(), plan)
    return {k: v for k, v in upload.items() if k not in (keep_local or {})}, metrics


def trained_kept(trainer: Trainer, keep_local: State | None) -> State:
    """After :func:`run_local_round`: the trained values of the tensors the client keeps (copies)."""
    if not keep_local:
        return {}
    trained = trainer.get_trainable()
    return {k: trained[k] for k in keep_local}
