"""The server's answer to a durable publish: the `PubAck`, and the bus error a rejection means.

    {"stream": "CONTINUUM_DEFAULT", "seq": 42, "duplicate": true}      stored (or stored before)
    {"error": {"code": 400, "err_code": 10071, "description": "wrong last sequence: 41"}}

Also the NATS headers a durable publish carries (dedup id, optional optimistic concurrency).
"""

from __future__ import annotations

import re

import msgspec

from bus.errors import BusError, BusUnavailable, ConcurrencyConflict, PermissionDenied


class PubAck(msgspec.Struct, frozen=True, kw_only=True):
    """The server's receipt: the stream and the sequence the message is stored at.
    `duplicate` is True when the message id was already stored (the original seq is returned),
    including by an earlier attempt of the same call whose ack was lost with the connection."""

    stream: str
    seq: int
    duplicate: bool = False


class WirePubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    batch: str | None = None
    count: int | None = None
    error: "WireError | None" = None


class WireError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


_ack_decoder = msgspec.json.Decoder(WirePubAck)
_WRONG_LAST = re.compile(r"wrong last sequence: (\d+)")
ERR_WRONG_LAST_SEQUENCE = 10071
ERR_BATCH_INCOMPLETE = 10176
# Atomic-batch errors about the batch as a whole: re-sending its messages one by one would not
# help, or would hide a misconfiguration, so the callers get the server's description.
BATCH_LEVEL_ERRORS = frozenset({
    10174,  # atomic publish disabled on the stream
    10175,  # batch sequence missing
    10179,  # batch id invalid
    10198,  # mirror with atomic publish
    10199,  # batch too large
    10200,  # batch commit invalid
    10210,  # too many batches in flight on the server
})
# Any other rejection (10201 duplicate id, 10176 incomplete or abandoned, 10177 a header not
# allowed in batches, a message too large, a subject no stream captures, ...) may come from one
# message. Nothing of a rejected batch is stored, so its messages are re-sent one by one and
# each caller gets its own message's outcome.


def parse_puback(data: bytes, *, expected: int | None = None) -> PubAck:
    """Turn a PubAck reply into a `PubAck`, or raise the bus error it stands for.

    Raises ConcurrencyConflict (err 10071), PermissionDenied, or BusUnavailable for any other
    server error (with the server's description).
    """
    wire = decode_ack(data)
    if wire.error is not None:
        raise ack_error(wire.error, expected)
    if not wire.stream:
        raise BusUnavailable(f"no stream stored the message (reply {data[:200]!r}); is the stream declared?")
    return PubAck(stream=wire.stream, seq=wire.seq, duplicate=wire.duplicate)


def decode_ack(data: bytes) -> WirePubAck:
    try:
        return _ack_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:  # (an inbox is a subject anyone can publish on)
        raise BusUnavailable(f"unreadable publish ack {data[:200]!r}") from exc


def ack_error(err: WireError, expected: int | None) -> BusError:
    if err.err_code == ERR_WRONG_LAST_SEQUENCE:
        match = _WRONG_LAST.search(err.description)
        actual = int(match.group(1)) if match else None
        return ConcurrencyConflict(
            f"expected last sequence {expected}, server has {actual}", expected=expected, actual=actual
        )
    if "permission" in err.description.lower():
        return PermissionDenied(err.description)
    return BusUnavailable(f"publish rejected ({err.err_code}): {err.description}")


def publish_headers(
    msg_id: str,
    headers: dict[str, str] | None,
    expected_last_subject_seq: int | None,
    expected_last_subject: str | None,
) -> dict[str, str]:
    """The NATS headers of one durable publish: dedup id and optional optimistic concurrency."""
    out = dict(headers) if headers else {}
    out["Nats-Msg-Id"] = msg_id
    if expected_last_subject_seq is not None:
        out["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
        if expected_last_subject:
            out["Nats-Expected-Last-Subject-Sequence-Subject"] = expected_last_subject
    return out
