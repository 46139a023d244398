"""The one error type of the wire: every refused payload or topic raises :class:`EnvelopeError`.

The coordinator counts rejections by :attr:`EnvelopeError.reason` (a fixed, machine-readable set) and
logs the human message; nothing else may escape a decoder, so a hostile payload can never crash the
service with an unexpected exception type.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a payload or topic was refused (the value is the string logged and counted)."""

    TOO_LARGE = "too_large"  # over the size limit (payload, header)
    TRUNCATED = "truncated"  # framing says more bytes than the payload has
    BAD_MAGIC = "bad_magic"  # not a fleetlora envelope
    BAD_HEADER = "bad_header"  # the JSON header is not valid UTF-8 JSON
    SCHEMA = "schema"  # header fields: missing, unknown, wrong type, out of range, wrong version/kind
    SPEC_MISMATCH = "spec_mismatch"  # adapter spec hash or method differs from the run's
    MODEL_MISMATCH = "model_mismatch"  # the announced model or class count differs from the receiver's
    TOPIC_MISMATCH = "topic_mismatch"  # run / client id in the header disagree with the topic
    WRONG_ROUND = "wrong_round"  # not a round the receiver accepts (stale, future, closed)
    BAD_MAC = "bad_mac"  # HMAC / checksum does not verify, or signed/unsigned mode disagrees
    BAD_TENSORS = "bad_tensors"  # the safetensors blob is malformed
    DTYPE = "dtype"  # a tensor dtype outside the allow-list
    UNKNOWN_KEY = "unknown_key"  # a tensor name the template does not have
    MISSING_KEY = "missing_key"  # a tensor the template requires is absent
    SHAPE = "shape"  # a shape that does not fit the template, rank or heads
    HEADS = "heads"  # Ravan head indices: duplicates, out of range, disagreeing with the header
    NON_FINITE = "non_finite"  # NaN or infinity in a float tensor
    REPLAY = "replay"  # a second, different update from a client for the same round
    BAD_ID = "bad_id"  # a run or client id outside the safe charset
    BAD_TOPIC = "bad_topic"  # a topic that is not one of fleetlora's
    NOT_SAMPLED = "not_sampled"  # an update from a client the open round did not sample
    OUTSIZED = "outsized"  # an update whose delta norm exceeds the coordinator's clip limit (reject mode)


class EnvelopeError(ValueError):
    """A refused payload, with a machine-readable :class:`Reason` and a human message.

    Parameters
    ----------
    reason : Reason
        Why it was refused; counted by the receiver.
    message : str
        What exactly was wrong, for the log. Never contains key material.
    """

    def __init__(self, reason: Reason, message: str):
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
