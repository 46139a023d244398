"""Topic names: built once, ids validated, received topics parsed strictly."""

from __future__ import annotations

import pytest

from protocol.topics import (
    global_topic,
    parse_status_topic,
    parse_up_topic,
    status_subscription,
    status_topic,
    up_subscription,
    up_topic,
    validate_id,
)
from protocol.wire_errors import EnvelopeError, Reason


def test_topic_builders() -> None:
    assert global_topic("run-1") == "fleetlora/run-1/global"
    assert up_topic("run-1", "jetson_07") == "fleetlora/run-1/up/jetson_07"
    assert status_topic("run-1", "a.b") == "fleetlora/run-1/status/a.b"
    assert up_subscription("run-1") == "fleetlora/run-1/up/+"
    assert up_subscription("run-1", share_group="coord") == "$share/coord/fleetlora/run-1/up/+"
    assert status_subscription("run-1") == "fleetlora/run-1/status/+"


def test_parse_round_trips() -> None:
    assert parse_up_topic(up_topic("r", "c-1")) == ("r", "c-1")
    assert parse_status_topic(status_topic("r", "c-1")) == ("r", "c-1")


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "x" * 65, ".", "..", "é", "a b", "a\n"])
def test_unsafe_ids_are_refused(bad: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        up_topic("run", bad)
    assert info.value.reason is Reason.BAD_ID
    with pytest.raises(EnvelopeError):
        validate_id(bad)


@pytest.mark.parametrize(
    "topic",
    [
        "fleetlora/r/global",
        "fleetlora/r/status/c",
        "other/r/up/c",
        "fleetlora/r/up/c/extra",
        "fleetlora/r/up",
        "fleetlora//up/c",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        parse_up_topic(topic)
    assert info.value.reason in (Reason.BAD_TOPIC, Reason.BAD_ID)


def test_parse_refuses_wildcards_in_ids() -> None:
    with pytest.raises(EnvelopeError) as info:
        parse_up_topic("fleetlora/r/up/+")
    assert info.value.reason is Reason.BAD_ID
