"""MQTT topics of a fleetlora run, defined once.

``fleetlora/{run}/global``          retained: the global adapter and the round announcement (coordinator only)
``fleetlora/{run}/up/{client}``     a client's update, QoS 1 (the broker's ACL lets only that client publish)
``fleetlora/{run}/status/{client}`` retained: ``online`` / ``offline`` (the client's last will), and
                                    ``refused: <why>`` (an announcement it cannot take) or, from the Python
                                    client, ``training {"round", "steps", "rank", "heads", "profile"}``
                                    while it trains a round (the dashboard shows it)

Run and client ids are restricted to a safe charset so they can never inject MQTT wildcards or levels
(``+``, ``#``, ``/``) and are safe as file names on the coordinator.
"""

from __future__ import annotations

import re

from protocol.wire_errors import EnvelopeError, Reason

PREFIX = "fleetlora"
GLOBAL = "global"
UP = "up"
STATUS = "status"

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"

# Letters, digits, '_', '.', '-'; 1-64 characters; not made only of dots ('.' and '..' as file names).
ID_RE = re.compile(r"(?!\.+\Z)[A-Za-z0-9_.\-]{1,64}\Z")


def validate_id(value: object, what: str = "id") -> str:
    """``value`` if it is a valid run or client id, else :class:`EnvelopeError` (``bad_id``)."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise EnvelopeError(
            Reason.BAD_ID, f"{what} must be 1-64 characters of [A-Za-z0-9_.-] (not only dots), got {value!r}"
        )
    return value


def global_topic(run: str) -> str:
    """The retained topic of the global adapter and round announcement."""
    return f"{PREFIX}/{validate_id(run, 'run id')}/{GLOBAL}"


def up_topic(run: str, client: str) -> str:
    """The topic a client publishes its updates to."""
    return f"{PREFIX}/{validate_id(run, 'run id')}/{UP}/{validate_id(client, 'client id')}"


def status_topic(run: str, client: str) -> str:
    """The retained online/offline topic of a client (its last will)."""
    return f"{PREFIX}/{validate_id(run, 'run id')}/{STATUS}/{validate_id(client, 'client id')}"


def up_subscription(run: str, share_group: str | None = None) -> str:
    """The coordinator's subscription to every client's updates.

    With ``share_group`` it is an MQTT 5 shared subscription (``$share/{group}/...``), so several
    coordinator workers split the load evenly.
    """
    topic = f"{PREFIX}/{validate_id(run, 'run id')}/{UP}/+"
    if share_group is None:
        return topic
    return f"$share/{validate_id(share_group, 'share group')}/{topic}"


def status_subscription(run: str) -> str:
    """The coordinator's subscription to every client's status."""
    return f"{PREFIX}/{validate_id(run, 'run id')}/{STATUS}/+"


def _parse_client_topic(topic: str, channel: str) -> tuple[str, str]:
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) != 4 or parts[0] != PREFIX or parts[2] != channel:
        raise EnvelopeError(Reason.BAD_TOPIC, f"expected '{PREFIX}/<run>/{channel}/<client>', got {topic!r}")
    return validate_id(parts[1], "run id"), validate_id(parts[3], "client id")


def parse_up_topic(topic: str) -> tuple[str, str]:
    """``(run, client)`` of an update topic; :class:`EnvelopeError` for anything else."""
    return _parse_client_topic(topic, UP)


def parse_status_topic(topic: str) -> tuple[str, str]:
    """``(run, client)`` of a status topic; :class:`EnvelopeError` for anything else."""
    return _parse_client_topic(topic, STATUS)
