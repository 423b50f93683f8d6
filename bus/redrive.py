"""Dead letters you can act on: read one back from the log and send its original again.

    letter = await read_dead_letter(bus, seq)             # the dead letter stored at `seq`
    outcome = await retry_dead_letter(bus, letter, by="ops")

A retry publishes the original envelope again as a new message: a new id derived from the dead
letter's (so retrying the same dead letter twice stores one message, and the second retry is
told so), caused by the dead letter, same payload, correlation and hops, no expiry. A broadcast
is sent again only to the agent whose consumer gave up on it, as a direct message. Then a
`delivery.dead_letter.retried` event records who retried it and as what. Nothing loops: the
new message is handled under the usual retry policy and, failing again, dead-lettered again.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import msgspec

from bus.errors import ConfigurationError
from schemas import DecodeError, Envelope, derived_id, utcnow
from schemas.codec import decode_loose
from schemas.ids import id_problem, is_id
from schemas.payloads import DeadLettered, DeadLetterRetried

if TYPE_CHECKING:
    from bus.client import Bus


class RetryOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one retry did: the new message's id and sequence; `already` when this dead letter
    had been retried before (nothing new was stored)."""

    dead_letter_id: str
    retried_as: str
    retried_seq: int
    to: str
    already: bool


async def read_dead_letter(bus: Bus, seq: int) -> Envelope[DeadLettered]:
    """The dead letter stored at log sequence `seq`. Raises ConfigurationError when there is no
    message there or it is not a dead letter, BusUnavailable."""
    stored = await bus.transport.direct_get(bus.subjects.stream, {"seq": seq})
    if stored is None:
        raise ConfigurationError(f"nothing is stored at seq {seq} (trimmed, or never written)")
    if not stored.subject.startswith(f"{bus.subjects.ns}.dead."):
        raise ConfigurationError(f"seq {seq} holds {stored.subject}, not a dead letter")
    try:
        envelope = bus.codec.decode(stored.data)
    except DecodeError as exc:
        raise ConfigurationError(f"the dead letter at seq {seq} does not decode: {exc}") from exc
    if not isinstance(envelope.payload, DeadLettered):
        raise ConfigurationError(f"seq {seq} holds a {envelope.kind}, not a dead letter")
    return envelope


async def original_bytes(bus: Bus, letter: DeadLettered) -> bytes:
    """The exact bytes that were dead-lettered: carried in the letter, or read back from the log
    (checked against the letter's size and SHA-256). Raises ConfigurationError when they are
    gone or differ, BusUnavailable."""
    if letter.carries_original:
        return letter.original
    stored = await bus.transport.direct_get(bus.subjects.stream, {"seq": letter.original_seq})
    data = b"" if stored is None else stored.data
    if stored is None or hashlib.sha256(data).hexdigest() != letter.original_sha256:
        raise ConfigurationError(
            f"the original of this dead letter is no longer in the log at seq {letter.original_seq}"
        )
    return data


async def retry_dead_letter(bus: Bus, letter: Envelope[DeadLettered], *, by: str) -> RetryOutcome:
    """Send `letter`'s original again and record that `by` did. Raises ConfigurationError when
    the original cannot be sent again (not an envelope, or an event rather than a message),
    BusUnavailable."""
    dead = letter.payload
    data = await original_bytes(bus, dead)
    try:
        original: Envelope[Any] = decode_loose(data)
    except DecodeError as exc:
        raise ConfigurationError(
            f"dead letter {letter.id} ({dead.reason}) holds bytes that are not an envelope, so there is "
            f"nothing to send again: {exc}"
        ) from exc
    if original.to is None and original.tag is None:
        raise ConfigurationError(f"dead letter {letter.id} holds an event ({original.kind}), not a message")
    if original.correlation_id is not None and not is_id(original.correlation_id):
        # Sent again it would be refused again, for the same reason.
        raise ConfigurationError(
            f"dead letter {letter.id} cannot be sent again: {id_problem('correlation_id', original.correlation_id)}"
        )
    # A broadcast goes again only to the agent whose consumer gave up on it.
    again = msgspec.structs.replace(
        original,
        id=derived_id(letter.id, "retry"),
        created_at=utcnow(),
        to=dead.agent,
        tag=None,
        causation_id=letter.id,
        expires_at=None,
    )
    sent = await bus.publish(again)
    if not sent.ack.duplicate:
        await bus.record(
            dead.agent,
            DeadLetterRetried(
                agent=dead.agent, dead_letter_id=letter.id, original_id=dead.original_id,
                retried_as=again.id, retried_seq=sent.ack.seq, by=by,
            ),
            sender=by,
            id=derived_id(again.id, "retried"),
            correlation_id=original.correlation_id,
            causation_id=letter.id,
        )
    return RetryOutcome(
        dead_letter_id=letter.id, retried_as=again.id, retried_seq=sent.ack.seq, to=dead.agent,
        already=sent.ack.duplicate,
    )
