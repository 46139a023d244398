"""The device loop: global announcement -> sampled? -> train within the budget -> publish one update.

:class:`EdgeClient` holds one device's logic and its progress; it does no threading of its own. A real
device runs it with :func:`run_device` (one worker thread beside the MQTT loop); the simulator drives
hundreds of them from one worker over one shared :class:`~protocol.mqtt_pool.MqttPool`.

Restarts: the progress (last round handled, the update not yet acknowledged) is a small JSON file
written atomically, and the encoded update is saved beside it *before* it is published. A client that
restarts and sees the same round again re-publishes that saved envelope (same message id: the
coordinator recognises a redelivery) instead of training the round twice; a round it never saw (it was
offline) is logged and counted in ``missed``, never skipped silently.

End to end, not only to the broker: the broker's acknowledgement of an update does not prove the
coordinator got it (a broker killed without persistence forgets what it had queued). So the client
keeps its last sent envelope in memory until a newer round is announced, and sends it again when the
coordinator *re-announces* the same round (a new announcement id: it does so after every reconnect and
at a deadline extension). The coordinator counts an envelope it already has as ``redelivered``.

Tensors a method keeps on the device (FedSA-LoRA's B; the announcement's ``keep_local`` names them)
are neither downloaded nor uploaded: the client starts them from its template, keeps their trained values
in ``kept`` and, with a state file, in ``<state file>.kept.safetensors`` (written before the update).

An update above the broker's packet limit is refused locally (:class:`PayloadTooLarge`): the round is
marked ``refused`` with the reason, nothing is sent, and the link stays connected.

An announcement the device cannot take (another model, class count or adapter spec, a signature that
does not verify) is refused with the reason in words, logged, and published (retained) on the device's
status topic as ``refused: <reason>``, so the coordinator logs it by device; ``online`` replaces it once
an announcement is taken again. With ``eval_batches`` the device evaluates each global it receives on
its validation examples before training, and the update header carries the result.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from edge_client.local_round import LocalPlan, run_local_round, trained_kept
from edge_client.trainer import Batch, Trainer, TrainMetrics
from export.files import atomic_write
from export.spec import AdapterSpec
from export.state import State
from protocol.mqtt_link import Delivery, MqttLink, MqttLinkError, PayloadTooLarge
from protocol.topics import STATUS_ONLINE, global_topic, up_topic
from protocol.wire import (
    DEFAULT_MAX_BYTES,
    EnvelopeError,
    GlobalHeader,
    Reason,
    decode_global,
    encode_update,
    is_sampled,
)
from protocol.wire_tensors import template_of

log = logging.getLogger(__name__)

PlanFn = Callable[[GlobalHeader], LocalPlan]
EvalBatchesFn = Callable[[], Iterable[Batch]]
BatchesFn = Callable[[GlobalHeader, LocalPlan], Iterable[Batch]]
TrainedFn = Callable[[GlobalHeader, TrainMetrics], None]

# What handle_global did with an announcement.
TRAINED, RESENT, NOT_SAMPLED, ALREADY_DONE, FINAL, REJECTED, REFUSED = (
    "trained", "resent", "not_sampled", "already_done", "final", "rejected", "refused",
)  # fmt: skip


@dataclass(frozen=True)
class EdgeConfig:
    """Who this device is in which run, and its keys (``key`` signs updates, ``coordinator_key``
    verifies announcements). ``state_file``: where progress survives restarts (None: memory only).
    ``model``, ``num_classes``: what this device trains (announcements of others are refused in words).
    """

    run: str
    client_id: str
    spec: AdapterSpec
    num_examples: int
    key: bytes | None = None
    coordinator_key: bytes | None = None
    state_file: Path | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    model: str | None = None
    num_classes: int | None = None
    # Say on the status topic when a round's training starts (``training {json plan}``) and ends
    # (``online``), so the coordinator's dashboard shows it; ``profile`` names the device's profile there.
    report_training: bool = False
    profile: str | None = None


@dataclass
class Progress:
    """The persisted part of a client: the last round handled and an update awaiting acknowledgement."""

    run: str = ""  # the run these rounds belong to: another run's file starts afresh
    last_round: int = 0
    pending_round: int = 0  # 0: none; else its envelope is saved in the pending file
    missed: int = 0  # rounds announced while this client was away (never seen)
    last_outcome: str = ""
    last_error: str = ""  # the most recent error (kept after later successes, for the operator)
    refused: list[int] = field(default_factory=list)  # rounds whose update could not be sent


class EdgeClient:
    """One device's side of the protocol (see the module docstring).

    Parameters
    ----------
    config : EdgeConfig
    link : MqttLink
        Connected (or connecting) to the broker; the client subscribes to the global topic on it.
    trainer : Trainer
        Trains the adapter (eager torch or ExecuTorch).
    template : State
        The model's full trainable state (shapes and the tensors a payload is padded against).
    plan_fn : callable
        The round's :class:`LocalPlan` (steps, rank, heads) from the announcement: the device budget.
    batches_fn : callable
        The local mini-batches for a plan.
    on_trained : callable, optional
        Called with the local training metrics of each round (for logs and the simulator).
    eval_batches : callable, optional
        The validation batches each received global is evaluated on (federated evaluation).
    """

    def __init__(
        self,
        config: EdgeConfig,
        link: MqttLink,
        trainer: Trainer,
        template: State,
        plan_fn: PlanFn,
        batches_fn: BatchesFn,
        on_trained: TrainedFn | None = None,
        eval_batches: EvalBatchesFn | None = None,
    ) -> None:
        self.config, self.link, self.trainer = config, link, trainer
        self.eval_batches = eval_batches
        self.template = template
        self.shapes = template_of(template)
        self.plan_fn, self.batches_fn, self.on_trained = plan_fn, batches_fn, on_trained
        self.progress = self._load_progress()
        self.finished = threading.Event()
        self._delivery: Delivery | None = None
        self._pending_envelope: bytes | None = None
        self._sent: tuple[int, bytes] | None = None  # the last acknowledged update: (round, envelope)
        self._answered = ""  # the id of the announcement the last update answered
        self._up_topic = up_topic(config.run, config.client_id)
        self.last_rejection: str | None = None  # why the last announcement refused to decode, if it did
        self._status = STATUS_ONLINE  # what the status topic says of us (the link publishes "online")
        self.kept: State = self._load_kept()  # the tensors this device keeps between rounds, if any

    # ---- progress file ----------------------------------------------------------------------------

    @property
    def _pending_file(self) -> Path | None:
        f = self.config.state_file
        return f.with_name(f.name + ".pending.env") if f is not None else None

    @property
    def _kept_file(self) -> Path | None:
        f = self.config.state_file
        return f.with_name(f.name + ".kept.safetensors") if f is not None else None

    def _load_kept(self) -> State:
        f = self._kept_file
        if f is None or not f.exists():
            return {}
        try:
            with safetensors.safe_open(f, "pt") as opened:
                run = (opened.metadata() or {}).get("run", "")
                kept = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118 (not a dict)
        except safetensors.SafetensorError as e:
            raise ValueError(
                f"{f} is not a safetensors file ({e}); move it away to restart those tensors"
            ) from e
        if run != self.config.run:
            log.warning(
                "%s: %s holds run %r's tensors, not %r's: starting them afresh",
                self.config.client_id,
                f,
                run,
                self.config.run,
            )
            return {}
        for name, tensor in kept.items():
            if self.shapes.get(name) != tuple(tensor.shape) or not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{f}: {name} is not a finite tensor of this adapter's template")
        return kept

    def _load_progress(self) -> Progress:
        f, run = self.config.state_file, self.config.run
        if f is None or not f.exists():
            return Progress(run=run)
        try:
            progress = Progress(**json.loads(f.read_text()))
        except (ValueError, TypeError) as e:  # bad JSON, unknown or missing fields
            raise ValueError(f"{f} is not a progress file of this client ({e}); move it away") from e
        if progress.run and progress.run != run:
            # A new run on the same state file: its rounds start again at 1, and none of its own
            # progress (nor a pending update of the old run) may suppress them.
            log.warning(
                "%s: %s belongs to run %r: starting run %r afresh",
                self.config.client_id,
                f,
                progress.run,
                run,
            )
            return Progress(run=run)
        progress.run = run
        return progress

    def _save(self) -> None:
        if self.config.state_file is not None:
            atomic_write(self.config.state_file, json.dumps(asdict(self.progress)).encode())

    def _finish(self, outcome: str, error: str = "", round: int = 0) -> str:
        self.progress.last_outcome = outcome
        if error:
            self.progress.last_error = error
            if round and round not in self.progress.refused:
                self.progress.refused.append(round)
        self._save()
        return outcome

    # ---- the protocol -----------------------------------------------------------------------------

    def subscribe(self, deliver: Callable[[EdgeClient, bytes], None]) -> None:
        """Have every announcement handed to ``deliver(self, payload)`` (on the MQTT loop thread)."""
        self.link.subscribe(global_topic(self.config.run), lambda topic, payload: deliver(self, payload))

    def handle_global(self, payload: bytes) -> str:
        """Act on one announcement; returns what was done (``trained``, ``not_sampled``, ...)."""
        cfg, progress = self.config, self.progress
        try:
            decoded = decode_global(
                payload, expected_run=cfg.run, spec=cfg.spec, template=self.shapes,
                key=cfg.coordinator_key, min_round=progress.last_round, max_bytes=cfg.max_bytes,
                model=cfg.model, num_classes=cfg.num_classes,
            )  # fmt: skip
        except EnvelopeError as e:
            words = refusal_words(e)
            log.warning("%s: announcement refused: %s", cfg.client_id, words)
            self.last_rejection = str(e)
            if e.reason is not Reason.WRONG_ROUND:  # a stale retained announcement is nobody's concern
                self._set_status(f"refused: {words}".encode())
            return REJECTED  # not persisted: a bad message says nothing about our progress
        self._set_status(STATUS_ONLINE)
        header = decoded.header
        self.settle()  # an acknowledgement that arrived since the last look counts before we judge
        if progress.pending_round and progress.pending_round == header.round:
            self._answered = header.msg_id
            return self._publish_pending(header.round, resent=True)
        sent = self._sent
        if (
            sent is not None
            and sent[0] == header.round
            and header.msg_id != self._answered
            and is_sampled(header, cfg.client_id)
        ):
            # Re-announced with us still awaited: the broker may have lost our update (restart);
            # the coordinator drops a repeat.
            self._answered, self._pending_envelope = header.msg_id, sent[1]
            progress.pending_round = header.round
            return self._publish_pending(header.round, resent=True)
        if progress.pending_round and progress.pending_round < header.round:
            log.warning(
                "%s: round %d closed before its update was acked", cfg.client_id, progress.pending_round
            )
            progress.pending_round = 0
        if header.final:
            self.finished.set()
            progress.last_round = max(progress.last_round, header.round)
            return self._finish(FINAL)
        if header.round <= progress.last_round:
            return ALREADY_DONE
        if progress.last_round and header.round > progress.last_round + 1:
            gap = header.round - progress.last_round - 1
            progress.missed += gap
            log.warning("%s: missed %d round(s) before round %d (offline)", cfg.client_id, gap, header.round)
        if not is_sampled(header, cfg.client_id):
            progress.last_round = header.round
            return self._finish(NOT_SAMPLED)
        return self._train_and_publish(header, decoded.state)

    def _set_status(self, status: bytes) -> None:
        """Publish ``status`` (retained) on our status topic when it is news."""
        topic = self.link.config.status_topic
        if topic is None or status == self._status:
            return
        try:
            self.link.publish(topic, status, qos=1, retain=True)
            self._status = status
        except MqttLinkError as e:
            log.error("%s: status not published: %s", self.config.client_id, e)

    def _train_and_publish(self, header: GlobalHeader, payload: State) -> str:
        cfg = self.config
        plan = self.plan_fn(header)
        if cfg.report_training:
            self._set_status(training_status(header.round, plan, cfg.profile))
        kept = {k: self.kept.get(k, t) for k, t in self.template.items() if k.endswith(header.keep_local)}
        upload, metrics = run_local_round(
            self.trainer, cfg.spec, payload, self.template, self.batches_fn(header, plan), plan, kept,
            eval_batches=self.eval_batches() if self.eval_batches is not None else None,
        )  # fmt: skip
        if kept:
            self.kept = {k: v.contiguous() for k, v in trained_kept(self.trainer, kept).items()}
            if self._kept_file is not None:
                atomic_write(self._kept_file, safetensors.torch.save(self.kept, {"run": cfg.run}))
        if self.on_trained is not None:
            self.on_trained(header, metrics)
        lora = cfg.spec.family == "lora"
        envelope = encode_update(
            upload, run=cfg.run, round=header.round, client=cfg.client_id, method=header.method,
            spec=cfg.spec, num_examples=cfg.num_examples, local_steps=metrics.steps,
            compute_s=metrics.seconds, rank=(plan.rank or cfg.spec.rank) if lora else None,
            heads=sorted(plan.heads) if plan.heads is not None else None, key=cfg.key,
            **measurements(metrics),
        )  # fmt: skip
        self._pending_envelope, self._answered = envelope, header.msg_id
        if self._pending_file is not None:
            atomic_write(self._pending_file, envelope)  # before publishing: a restart resends it
        self.progress.pending_round = header.round
        self.progress.last_round = header.round
        self._save()
        outcome = self._publish_pending(header.round, resent=False)
        self._set_status(STATUS_ONLINE)  # (a no-op unless training was reported)
        return outcome

    def _publish_pending(self, round: int, resent: bool) -> str:
        envelope = self._pending_envelope
        if envelope is None and self._pending_file is not None and self._pending_file.exists():
            envelope = self._pending_envelope = self._pending_file.read_bytes()
        if envelope is None:
            self.progress.pending_round = 0
            return self._finish(REFUSED, f"the update of round {round} was lost before it was sent", round)
        try:
            self._delivery = self.link.publish(self._up_topic, envelope, qos=1)
        except PayloadTooLarge as e:
            log.error("%s: round %d update not sent: %s", self.config.client_id, round, e)
            self.progress.pending_round = 0
            self._pending_envelope = None
            return self._finish(REFUSED, str(e), round)
        except MqttLinkError as e:  # the bounded queue is full: kept pending, resent on the next announcement
            log.error("%s: round %d update not queued: %s", self.config.client_id, round, e)
            return self._finish(REFUSED, str(e))  # still pending: not a refusal of the round
        return self._finish(RESENT if resent else TRAINED)

    def settle(self, timeout_s: float = 0.0) -> bool:
        """Once the broker acknowledged the pending update, forget it; True when nothing is pending."""
        delivery = self._delivery
        if delivery is not None and delivery.wait(timeout_s):
            self._delivery = None
            if delivery.error is None:
                if self._pending_envelope is not None:
                    self._sent = (self.progress.pending_round, self._pending_envelope)
                self.progress.pending_round = 0
                self._pending_envelope = None
                if self._pending_file is not None:
                    self._pending_file.unlink(missing_ok=True)
                self._save()
            else:
                log.error("%s: update not delivered: %s", self.config.client_id, delivery.error)
        return self.progress.pending_round == 0


def training_status(round: int, plan: LocalPlan, profile: str | None) -> bytes:
    """The status a device publishes while it trains: ``training`` and its plan as JSON."""
    heads = sorted(plan.heads) if plan.heads is not None else None
    fields = {
        "round": round,
        "steps": plan.local_steps,
        "rank": plan.rank,
        "heads": heads,
        "profile": profile,
    }
    return b"training " + json.dumps(fields).encode()


def refusal_words(error: EnvelopeError) -> str:
    """Why an announcement was refused, in the words an operator needs."""
    if error.reason in (Reason.SHAPE, Reason.UNKNOWN_KEY, Reason.MISSING_KEY):
        why = "the coordinator's adapter does not fit this device's model (another model or class count?)"
    elif error.reason is Reason.BAD_MAC:
        why = "the announcement's signature does not verify with this device's coordinator key"
    else:
        return error.message
    return f"{why}: {error.message}"


def measurements(metrics: TrainMetrics) -> dict[str, Any]:
    """The optional update header fields of a round's metrics (finite values only)."""
    fields: dict[str, Any] = {}
    if metrics.losses and math.isfinite(metrics.mean_loss):
        fields["train_loss"] = metrics.mean_loss
    e = metrics.evaluation
    if e is not None and math.isfinite(e.loss):
        fields.update(eval_loss=e.loss, eval_accuracy=e.accuracy, eval_examples=e.examples)
    return fields


def run_device(client: EdgeClient, stop: threading.Event, poll_s: float = 0.5) -> Progress:
    """A device's main loop: handle announcements on this thread until the final one or ``stop``.

    Also ends when the link gives up (the broker refused our credentials too often): the reason is
    the progress's ``last_error``.
    """
    inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    client.subscribe(lambda _client, payload: inbox.put(payload))
    while not stop.is_set():
        if client.link.failure is not None:
            client.progress.last_error = client.link.failure
            break
        try:
            payload = inbox.get(timeout=poll_s)
        except queue.Empty:
            client.settle()
            continue
        while True:  # only the newest announcement matters: older ones are superseded
            try:
                payload = inbox.get_nowait()
            except queue.Empty:
                break
        outcome = client.handle_global(payload)
        log.info("%s: %s (round %d)", client.config.client_id, outcome, client.progress.last_round)
        client.settle(timeout_s=poll_s)
        if client.finished.is_set() and client.settle():
            break
    return client.progress
