"""Replay protection for updates: each message id and each (client, round) is accepted once.

A QoS 1 redelivery, a resend after a lost acknowledgement and a captured-and-replayed payload all carry
a message id (and a (client, round)) already seen; the guard refuses them with ``replay``. Memory is
bounded: only the ``max_rounds`` most recent rounds are remembered, each with at most
``max_per_round`` entries; updates for rounds that were forgotten are refused as ``wrong_round``,
since the guard can no longer tell whether they are repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.wire import UpdateHeader
from protocol.wire_errors import EnvelopeError, Reason


@dataclass
class _Round:
    msg_ids: set[str] = field(default_factory=set)
    clients: set[str] = field(default_factory=set)


class ReplayGuard:
    """Remembers the message ids and (client, round) pairs of the open rounds.

    Parameters
    ----------
    max_rounds : int
        How many of the most recent rounds are remembered.
    max_per_round : int
        At most this many updates per round (about the fleet size); more are refused with ``capacity``.
    """

    def __init__(self, max_rounds: int = 4, max_per_round: int = 100_000):
        if max_rounds < 1 or max_per_round < 1:
            raise ValueError("max_rounds and max_per_round must be >= 1")
        self.max_rounds = max_rounds
        self.max_per_round = max_per_round
        self._rounds: dict[int, _Round] = {}
        self._floor = 0  # rounds below this were forgotten

    def check(self, header: UpdateHeader) -> None:
        """Raise :class:`EnvelopeError` if ``header`` repeats a remembered update; record nothing."""
        if header.round < self._floor:
            raise EnvelopeError(Reason.WRONG_ROUND, f"round {header.round} is closed (before {self._floor})")
        seen = self._rounds.get(header.round)
        if seen is None:
            return
        if header.msg_id in seen.msg_ids:
            raise EnvelopeError(Reason.REPLAY, f"message {header.msg_id} was already received")
        if header.client in seen.clients:
            raise EnvelopeError(Reason.REPLAY, f"client {header.client} already sent round {header.round}")
        if len(seen.msg_ids) >= self.max_per_round:
            raise EnvelopeError(
                Reason.CAPACITY, f"round {header.round} already has {self.max_per_round} updates"
            )

    def admit(self, header: UpdateHeader) -> None:
        """:meth:`check`, then remember ``header``; forget the oldest rounds beyond ``max_rounds``."""
        self.check(header)
        if header.round not in self._rounds and len(self._rounds) >= self.max_rounds:
            oldest = min(self._rounds)
            if header.round < oldest:
                raise EnvelopeError(
                    Reason.WRONG_ROUND, f"round {header.round} is older than every open round"
                )
            del self._rounds[oldest]
            self._floor = oldest + 1
        seen = self._rounds.setdefault(header.round, _Round())
        seen.msg_ids.add(header.msg_id)
        seen.clients.add(header.client)

    def forget_before(self, round: int) -> None:
        """Forget every round below ``round`` (the coordinator closed them); they are refused from now on."""
        for r in [r for r in self._rounds if r < round]:
            del self._rounds[r]
        self._floor = max(self._floor, round)

    def __len__(self) -> int:
        return sum(len(r.msg_ids) for r in self._rounds.values())
