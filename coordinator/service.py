"""The coordinator's round lifecycle, independent of the transport.

open round ``r`` (sample clients, set the deadline, announce the global adapter) -> collect updates ->
close at quorum or deadline -> aggregate -> checkpoint -> announce round ``r + 1`` ... -> final.

The transport (:mod:`coordinator.service_mqtt`) feeds received envelopes to :meth:`RoundService.receive`
and acknowledges them to the broker only after it returns: by then every accepted envelope is in the
store, so a ``kill -9`` at any moment loses nothing the broker considers delivered. It publishes what
:meth:`RoundService.tick` and :attr:`RoundService.announcement` return.

Policy for updates that are not simply "the first valid update of a sampled client for the open round"
(each one counted by reason in the metrics, none ever touching the global adapter):

- **invalid** (size, framing, schema, spec, topic/header/HMAC disagreement, shapes, dtypes, NaN/inf):
  rejected with the decoder's reason (``bad_mac``, ``shape``, ``non_finite``, ...).
- **outsized** (only with ``clip_norm``): an update whose delta from the global adapter has an L2 norm
  above ``clip_norm`` is scaled back to that norm (``clip_mode="scale"``, counted as ``clipped``) or
  rejected as ``outsized`` (``clip_mode="reject"``); see :mod:`coordinator.clipping`.
- **stale or early**: an update for any round but the open one (a closed round, or a future one) is
  rejected as ``wrong_round``. A round closes when it is aggregated; nothing is accepted for it later.
- **late**: an update for the open round is accepted until the round closes, even after its deadline
  (the deadline only allows closing; see below).
- **not sampled**: an update from a client the open round did not sample is rejected (``not_sampled``).
- **duplicate**: a second, different update (another message id) from the same client for the same
  round is rejected as ``replay``: the first one wins. The *same* message again (a QoS 1 redelivery
  after a lost acknowledgement or a coordinator restart) is acknowledged and counted as
  ``redelivered``, not as a rejection; so is a redelivery of an update the round before this one
  aggregated (a restarted coordinator may close a round from its stored updates before the broker
  has delivered them again).

Closing: a round closes as soon as every sampled client has reported (clients named in the
announcement), or at its deadline when at least ``min_clients`` updates are in. A deadline reached
with fewer extends the round by another ``deadline_s`` (re-announced, updates kept), counted as
``deadline_extended``, rather than aggregating too few updates or dropping the ones received.

Saying what happens: each round logs one line when it opens (who it waits for, until when) and one
when it closes (:func:`coordinator.metrics.round_line`: updates, refusals by reason, the devices'
evaluation of the global they trained from, the server's evaluation of the new one, bytes, time). A
device's status message (``refused: <why>``, ``offline``) is logged by device.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coordinator.aggregators import Aggregator, ClientUpdate
from coordinator.clipping import CLIP_MODES, ClipMode, delta_norm, scale_delta
from coordinator.metrics import MetricsLog, device_measurements, open_line, round_line
from coordinator.store import RoundState, RoundStore, StoreError, describe_task
from export.spec import AdapterSpec, rank_choices
from export.state import State, num_bytes, without_kept
from protocol.mqtt_types import Payload
from protocol.topics import parse_up_topic
from protocol.wire import (
    DEFAULT_MAX_BYTES,
    DecodedUpdate,
    EnvelopeError,
    GlobalHeader,
    Reason,
    decode_update,
    encode_global,
    is_sampled,
    sample_clients,
    spec_differences,
)
from protocol.wire_tensors import template_of

log = logging.getLogger(__name__)

REDELIVERED = "redelivered"
Evaluator = Callable[[State], Mapping[str, float]]  # a new global -> eval_accuracy, eval_loss, eval_examples


class ServiceError(ValueError):
    """A coordinator configuration that cannot run, or a state directory from another run."""


@dataclass(frozen=True)
class ServiceConfig:
    """The round lifecycle's parameters (the flags of ``fleetlora coordinator serve``).

    ``clients``: the fleet roster; each round samples ``clients_per_round`` of them (0 = all) with a
    seeded hash draw, and names them in the announcement. Without a roster the fleet is open: every
    client whose stable hash draw falls below ``sample_fraction`` takes part (:func:`is_sampled`),
    and a round closes at its deadline.

    ``clip_norm``: 0 = off; else the largest L2 norm of an update's delta that is aggregated as sent
    (``clip_mode``: ``scale`` larger ones down to it, or ``reject`` them as ``outsized``).
    """

    run: str
    method: str
    rounds: int
    min_clients: int = 1
    deadline_s: float = 60.0
    clients: tuple[str, ...] = ()
    clients_per_round: int = 0
    sample_fraction: float = 1.0
    seed: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES
    clip_norm: float = 0.0
    clip_mode: ClipMode = "scale"
    # What is trained (from the bundle): announced to devices and recorded in the state folder.
    model: str = ""
    num_classes: int = 0
    labels: tuple[str, ...] = ()
    seq_len: int = 0
    model_seed: int = 0

    def __post_init__(self) -> None:
        per_round = self.clients_per_round or len(self.clients)
        checks = [
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.min_clients >= 1, f"min_clients must be >= 1, got {self.min_clients}"),
            (self.deadline_s > 0, f"deadline must be > 0 seconds, got {self.deadline_s}"),
            (0 < self.sample_fraction <= 1, f"sample_fraction must be in (0, 1], got {self.sample_fraction}"),
            (
                0 <= self.clip_norm < float("inf"),
                f"clip_norm must be finite and >= 0 (0 = off), got {self.clip_norm}",
            ),
            (self.clip_mode in CLIP_MODES, f"clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}"),
            (len(set(self.clients)) == len(self.clients), "the client roster has duplicates"),
            (
                not self.clients or 0 <= self.clients_per_round <= len(self.clients),
                f"clients_per_round must be in [0, {len(self.clients)}], got {self.clients_per_round}",
            ),
            (
                not self.clients or self.min_clients <= per_round,
                f"min_clients={self.min_clients} exceeds the {per_round} clients sampled per round",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ServiceError(message)


@dataclass
class _Accepted:
    update: DecodedUpdate
    size: int


@dataclass
class _RoundTally:
    rejected: Counter[str] = field(default_factory=Counter)
    redelivered: int = 0
    clipped: int = 0
    opened_at: float = field(default_factory=time.time)


class RoundService:
    """The round state machine; single-threaded (the transport calls it from one thread).

    Parameters
    ----------
    config : ServiceConfig
    spec : AdapterSpec
        The adapter every client trains.
    aggregator : Aggregator
        The method (its device is where aggregation runs: CUDA when present).
    initial : State
        The freshly attached model's trainable state: round 1's global adapter and the template every
        update is checked against.
    store : RoundStore
    metrics : MetricsLog
    device_keys : mapping of client id to key, optional
        With keys every update must carry a valid HMAC by its client's key; clients without a key are
        refused (``bad_mac``). Without keys a SHA-256 checksum is required.
    coordinator_key : bytes, optional
        Signs the announcements (clients verify them with it).
    evaluate : callable, optional
        Evaluates each new global on held-out data (``--eval-data``); its figures join the round record.
    clock : callable
        Unix time (tests replace it).
    """

    def __init__(
        self,
        config: ServiceConfig,
        spec: AdapterSpec,
        aggregator: Aggregator,
        initial: State,
        store: RoundStore,
        metrics: MetricsLog,
        *,
        device_keys: Mapping[str, bytes] | None = None,
        coordinator_key: bytes | None = None,
        evaluate: Evaluator | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config, self.spec, self.agg = config, spec, aggregator
        self.evaluate = evaluate
        self.store, self.metrics, self.clock = store, metrics, clock
        self.device_keys = dict(device_keys) if device_keys is not None else None
        self.coordinator_key = coordinator_key
        # What updates may carry: not the tensors the method leaves on the devices (FedSA-LoRA's B).
        self.template = template_of(without_kept(initial, aggregator.local_suffixes))
        self._initial = initial
        self.state: RoundState | None = None
        self.global_state: State = {}
        self.accepted: dict[str, _Accepted] = {}
        self.tally = _RoundTally()
        self.history: list[dict[str, Any]] = []
        self._announcement = b""
        self._sent: tuple[int, State] | None = None  # (round, what clients of that round trained from)

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> bytes:
        """Resume from the store, or open round 1; returns the announcement to publish (retained)."""
        loaded = self.store.load()
        if loaded is None:
            self.global_state = self.agg.init_global(self._initial)
            self.state = self._open_state(1)
            self.store.commit_round(self.state, self.global_state)
            resumed = 0
        else:
            state, global_state, updates = loaded
            self._check_same_run(state)
            self.state = state
            self.global_state = {k: v.to(self.agg.device) for k, v in global_state.items()}
            for client, payload in updates:  # re-validated: the files are ours, but cheap to check
                try:
                    decoded = self._decode(client, payload, state.round)
                except EnvelopeError as e:
                    log.error("stored update of %s, round %d, fails validation: %s", client, state.round, e)
                    continue
                self.accepted[client] = _Accepted(decoded, len(payload))
            resumed = len(self.accepted)
        self.metrics.write(
            "start", run=self.config.run, method=self.config.method, round=self.state.round,
            resumed_updates=resumed, done=self.state.done, device=str(self.agg.device),
        )  # fmt: skip
        if resumed:
            log.info("resumed round %d with %d stored updates", self.state.round, resumed)
        self._log_open()
        self._announcement = self._encode_announcement()
        return self._announcement

    def _task(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "model": cfg.model, "num_classes": cfg.num_classes, "labels": list(cfg.labels),
            "seq_len": cfg.seq_len, "model_seed": cfg.model_seed, "spec": self.spec.to_dict(),
        }  # fmt: skip

    def _check_same_run(self, state: RoundState) -> None:
        """Refuse a state folder of another run, method, model, class count or adapter spec."""
        mine, theirs = self._task(), state.task
        ours = (self.config.run, self.config.method, self.spec.digest())
        same = (state.run, state.method, state.spec) == ours
        for key in ("model", "num_classes"):  # (folders written before the task was recorded lack them)
            same = same and (not theirs.get(key) or not mine[key] or theirs[key] == mine[key])
        if not same:
            here = describe_task(self.config.run, self.config.method, mine)
            there = describe_task(state.run, state.method, theirs or {"spec_digest": state.spec})
            if theirs.get("spec") and state.spec != self.spec.digest():
                there += f" (adapter spec: {spec_differences(theirs['spec'], self.spec)})"
            raise StoreError(
                f"{self.store.root} holds {there}; this coordinator serves {here}: use another "
                "--state-dir (or serve the bundle that folder was trained with)"
            )

    def _log_open(self) -> None:
        state = self.state
        assert state is not None
        log.info(open_line(state, self.config.rounds, self.config.min_clients))
        self.metrics.notify(
            "opened", round=state.round, rounds=self.config.rounds, sampled=state.sampled,
            deadline=state.deadline, done=state.done, accepted=sorted(self.accepted),
            bytes_down=num_bytes(self.global_state),
        )  # fmt: skip

    def _open_state(self, round: int) -> RoundState:
        cfg = self.config
        sampled = sample_clients(cfg.seed, round, cfg.clients, cfg.clients_per_round) if cfg.clients else None
        return RoundState(
            run=cfg.run, method=cfg.method, spec=self.spec.digest(), round=round,
            deadline=self.clock() + cfg.deadline_s, sampled=sampled,
            sample_fraction=None if sampled is not None else cfg.sample_fraction,
            done=round > cfg.rounds, task=self._task(),
        )  # fmt: skip

    def open_round(self, round: int, global_state: State) -> bytes:
        """Open ``round`` from ``global_state``, aggregated by the caller, and return its announcement.

        For a caller that runs the rounds itself and uses this service for what crosses the network
        (sampling, the signed announcement, validating updates with :meth:`admit`): the simulator's
        ``mqtt`` transport, whose engine aggregates with its server optimizer. Nothing is persisted.
        """
        self.global_state = global_state
        self.state = self._open_state(round)
        self.accepted = {}
        self.tally = _RoundTally()
        self._announcement = self._encode_announcement()
        return self._announcement

    @property
    def round(self) -> int:
        assert self.state is not None, "call start() first"
        return self.state.round

    @property
    def finished(self) -> bool:
        return self.state is not None and self.state.done

    @property
    def announcement(self) -> bytes:
        """The current global adapter and round announcement (republish it after a reconnect)."""
        return self._announcement

    def seconds_to_deadline(self) -> float:
        assert self.state is not None
        return max(0.0, self.state.deadline - self.clock())

    def reannounce(self) -> bytes:
        """A fresh announcement of the open round: a new id, and only the clients still awaited.

        Published after the coordinator reconnects: a broker that restarted may have acknowledged
        updates it never delivered, and a device sends its update again when it sees a new id for a
        round it is still listed in (devices whose update is in are not listed, so they stay quiet).
        """
        self._announcement = self._encode_announcement()
        return self._announcement

    def _encode_announcement(self) -> bytes:
        assert self.state is not None
        payload = self.agg.announced(self.global_state)
        final = self.state.done
        # The header lists the sampled clients whose update is not in yet: a listed device that
        # already sent its update sends it again (see reannounce), an unlisted one does nothing.
        awaited = (
            None if self.state.sampled is None else [c for c in self.state.sampled if c not in self.accepted]
        )
        return encode_global(
            payload, run=self.config.run, round=self.state.round, method=self.config.method,
            spec=self.spec, deadline=self.state.deadline,
            clients=None if final else awaited,
            sample_fraction=0.0 if final else self.state.sample_fraction,
            rank=self.spec.rank if self.spec.family == "lora" else None, final=final,
            key=self.coordinator_key, keep_local=self.agg.local_suffixes,
            model=self.config.model or None, num_classes=self.config.num_classes or None,
            rank_choices=self._rank_choices(),
        )  # fmt: skip

    def _rank_choices(self) -> tuple[int, ...] | None:
        """The LoRA ranks devices may train (methods that aggregate heterogeneous ranks), else None."""
        if self.spec.family != "lora" or not self.agg.heterogeneous_ranks:
            return None
        return rank_choices(self.spec.rank)

    # ---- receiving --------------------------------------------------------------------------------

    def _decode(self, client: str, payload: Payload, round: int) -> DecodedUpdate:
        """Validate an envelope, then apply the norm limit (the same way on receipt and on resume)."""
        if self.device_keys is not None and client not in self.device_keys:
            raise EnvelopeError(Reason.BAD_MAC, f"no device key for client {client!r}")
        key = self.device_keys[client] if self.device_keys is not None else None
        decoded = decode_update(
            payload, expected_run=self.config.run, expected_client=client, rounds=round, spec=self.spec,
            template=self.template, key=key, max_bytes=self.config.max_bytes, method=self.config.method,
        )  # fmt: skip
        rank = decoded.header.rank
        if rank is not None and rank != self.spec.rank and self._rank_choices() is None:
            raise EnvelopeError(
                Reason.SHAPE, f"rank {rank}, but {self.config.method} aggregates the global rank "
                f"{self.spec.rank} only (it offers devices no lower rank)",
            )  # fmt: skip
        limit = self.config.clip_norm
        if limit:
            sent = self._sent_payload()
            norm = delta_norm(decoded.state, sent, decoded.header.heads)
            if norm > limit:
                if self.config.clip_mode == "reject":
                    raise EnvelopeError(Reason.OUTSIZED, f"delta norm {norm:.4g} exceeds the limit {limit:g}")
                decoded.state = scale_delta(decoded.state, sent, decoded.header.heads, limit / norm)
                self.tally.clipped += 1
                self.metrics.write("clipped", client=client, round=round, norm=norm, limit=limit)
        return decoded

    def _sent_payload(self) -> State:
        """The adapter the open round's clients received (what an update's delta is measured from)."""
        assert self.state is not None
        if self._sent is None or self._sent[0] != self.state.round:
            payload = self.agg.announced(self.global_state)
            self._sent = (self.state.round, {k: v.detach().to("cpu") for k, v in payload.items()})
        return self._sent[1]

    def _sampled(self, header: GlobalHeader | None, client: str) -> bool:
        assert self.state is not None
        if self.state.sampled is not None:
            return client in self.state.sampled
        assert header is not None
        return is_sampled(header, client)

    def _fraction_header(self) -> GlobalHeader | None:
        """A header carrying the open round's hash-draw parameters (open fleets only)."""
        state = self.state
        assert state is not None
        if state.sampled is not None:
            return None
        return GlobalHeader(
            run=state.run, round=state.round, method=state.method, spec=state.spec, spec_json={},
            deadline=state.deadline, clients=None, sample_fraction=state.sample_fraction, rank=None,
            final=False, msg_id="", sent_at=0.0, signed=False,
        )  # fmt: skip

    def receive(self, messages: list[tuple[str, bytes]]) -> int:
        """Validate ``(topic, payload)`` envelopes and persist the accepted ones; returns how many.

        When this returns, every accepted update is in the store: the caller may acknowledge all of
        ``messages`` to the broker (rejected ones too: a refused envelope must not come back).
        """
        fresh = self.admit(messages)
        self.store.save_updates(self.round, fresh)
        return len(fresh)

    def admit(self, messages: Sequence[tuple[str, Payload]]) -> list[tuple[str, Payload]]:
        """Validate envelopes and count the accepted ones in the open round, without persisting them.

        Returns the ``(client id, payload)`` records the caller must persist
        (``store.save_updates(round, records)``) before acknowledging ``messages`` and before the next
        :meth:`tick` that :meth:`close_due` announces: :meth:`receive` is both steps at once.
        """
        if self.state is None or self.state.done:
            for _, _payload in messages:
                self._reject(Reason.WRONG_ROUND.value, None, "the run is finished")
            return []
        fresh: list[tuple[str, Payload]] = []
        header = self._fraction_header()
        for topic, payload in messages:
            client = None
            try:
                run, client = parse_up_topic(topic)
                if run != self.config.run:
                    raise EnvelopeError(Reason.TOPIC_MISMATCH, f"run {run!r} is not {self.config.run!r}")
                decoded = self._decode(client, payload, self.state.round)
                if not self._sampled(header, client):
                    raise EnvelopeError(Reason.NOT_SAMPLED, f"{client} is not sampled in round {self.round}")
                first = self.accepted.get(client)
                if first is not None:
                    if first.update.header.msg_id == decoded.header.msg_id:
                        self.tally.redelivered += 1
                        self.metrics.write(REDELIVERED, client=client, round=self.round)
                        continue
                    raise EnvelopeError(
                        Reason.REPLAY, f"{client} already sent round {self.round}: the first update wins"
                    )
            except EnvelopeError as e:
                if e.reason is Reason.WRONG_ROUND and client and self._aggregated_before(client, payload):
                    self.tally.redelivered += 1
                    self.metrics.write(REDELIVERED, client=client, round=self.round - 1, late=True)
                    continue
                self._reject(e.reason.value, client, e.message)
                continue
            self.accepted[client] = _Accepted(decoded, len(payload))
            fresh.append((client, payload))
            h = decoded.header
            self.metrics.notify(
                "accepted", client=client, round=h.round, bytes=len(payload), steps=h.local_steps,
                compute_s=h.compute_s, rank=h.rank, heads=h.heads, examples=h.num_examples,
            )  # fmt: skip
        return fresh

    def _aggregated_before(self, client: str, payload: Payload) -> bool:
        """Whether ``payload`` is the very update of ``client`` that the previous round aggregated."""
        assert self.state is not None
        expected = self.state.closed_msg_ids.get(client)
        if expected is None:
            return False
        key = self.device_keys.get(client) if self.device_keys is not None else None
        try:
            header = decode_update(
                payload, expected_run=self.config.run, expected_client=client, rounds=self.round - 1,
                spec=self.spec, template=self.template, key=key, max_bytes=self.config.max_bytes,
            ).header  # fmt: skip
        except EnvelopeError:
            return False
        return header.msg_id == expected

    def device_status(self, client: str, status: bytes) -> None:
        """A device's status message (retained ``online``/``offline``, or ``refused: <why>``): logged."""
        text = bytes(status[:1000]).decode("utf-8", errors="replace")
        if text.startswith("refused"):
            log.warning("%s %s", client, text.replace("refused:", "refused the announcement:", 1))
        elif text == "offline":
            log.info("%s went offline", client)
        else:
            log.debug("%s is %s", client, text)
        self.metrics.write("device_status", client=client, status=text)

    def _reject(self, reason: str, client: str | None, message: str) -> None:
        self.tally.rejected[reason] += 1
        self.metrics.rejected(reason, client, message)
        log.info("rejected an update from %s: %s: %s", client or "?", reason, message)

    # ---- closing ----------------------------------------------------------------------------------

    def _everyone_in(self) -> bool:
        assert self.state is not None
        return self.state.sampled is not None and set(self.state.sampled) <= set(self.accepted)

    def close_due(self) -> bool:
        """Whether :meth:`tick` would now close or extend the open round."""
        state = self.state
        if state is None or state.done:
            return False
        return self._everyone_in() or self.clock() >= state.deadline

    def tick(self) -> bytes | None:
        """Close, extend or leave the open round; returns a new announcement when there is one."""
        state = self.state
        if state is None or state.done:
            return None
        due = self.clock() >= state.deadline
        if self._everyone_in() or (due and len(self.accepted) >= self.config.min_clients):
            self._close_round()
        elif due:
            state.deadline = self.clock() + self.config.deadline_s
            state.extensions += 1
            self.store.save_state(state)
            self.metrics.write(
                "deadline_extended", round=state.round, accepted=len(self.accepted),
                min_clients=self.config.min_clients, deadline=state.deadline,
            )  # fmt: skip
            missing = sorted(set(state.sampled or ()) - set(self.accepted))
            log.warning(
                "round %d: %d of the %d updates needed by the deadline%s; waiting another %g s",
                state.round, len(self.accepted), self.config.min_clients,
                f" (no update yet from {', '.join(missing)})" if missing else "", self.config.deadline_s,
            )  # fmt: skip
        else:
            return None
        self._announcement = self._encode_announcement()
        return self._announcement

    def _shares(self, decoded: list[DecodedUpdate]) -> dict[str, list[int]]:
        """What each update trained, in ``clients`` order: its LoRA rank, or its number of Ravan heads."""
        if self.spec.family == "ravan":
            return {"heads": [len(d.header.heads or range(self.spec.heads)) for d in decoded]}
        return {"ranks": [d.header.rank or self.spec.rank for d in decoded]}

    def _close_round(self) -> None:
        state = self.state
        assert state is not None
        clients = sorted(self.accepted)
        decoded = [self.accepted[c].update for c in clients]
        updates = [
            ClientUpdate(
                c, d.state, d.header.num_examples, rank=d.header.rank, meta={"heads": d.header.heads}
            )
            for c, d in zip(clients, decoded, strict=True)
        ]
        start = time.perf_counter()
        self.agg.metrics = {}
        self.global_state = self.agg.aggregate(self.global_state, updates)
        if self.agg.device.type == "cuda":
            torch.cuda.synchronize(self.agg.device)
        aggregate_s = time.perf_counter() - start
        evaluation: dict[str, float] = {}
        if self.evaluate is not None:
            start = time.perf_counter()
            evaluation = {**self.evaluate(self.global_state), "eval_s": time.perf_counter() - start}
        record = self.metrics.write(
            "round", round=state.round, participants=len(updates), clients=clients,
            sampled=len(state.sampled) if state.sampled is not None else None,
            examples=sum(u.num_examples for u in updates),
            bytes_up=sum(a.size for a in self.accepted.values()),
            bytes_down=num_bytes(self.global_state), rejected=dict(self.tally.rejected),
            redelivered=self.tally.redelivered, clipped=self.tally.clipped,
            deadline_extensions=state.extensions, **self._shares(decoded),
            aggregate_s=aggregate_s, round_s=time.time() - self.tally.opened_at,
            device=str(self.agg.device), **device_measurements([d.header for d in decoded]), **evaluation,
            **{k: v for k, v in self.agg.metrics.items() if k == "divergence"},
            aggregation=dict(self.agg.metrics),  # per-layer divergence, FedRPCA's, FLoRA-NA's figures
        )  # fmt: skip
        self.history.append(record)
        log.info(round_line(record, self.config.rounds))
        self.state = self._open_state(state.round + 1)
        self.state.closed_msg_ids = {c: d.header.msg_id for c, d in zip(clients, decoded, strict=True)}
        start = time.perf_counter()
        self.store.commit_round(self.state, self.global_state)
        self.metrics.notify("committed", seconds=time.perf_counter() - start, round=state.round)
        self.accepted = {}
        self.tally = _RoundTally()
        self._log_open()
        if self.state.done:
            self.metrics.write(
                "done", rounds=self.config.rounds, rejected_total=dict(self.metrics.rejections)
            )
