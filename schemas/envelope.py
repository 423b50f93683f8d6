"""The wire envelope: what a producer said, separate from the facts of its delivery.

`Envelope[P]` is generic over its payload so that one `msgspec` decoder over
`Envelope[Union[...all registered payloads...]]` validates the envelope and picks the payload
type by its `kind` tag in a single pass (see `schemas.registry`).

`Delivery` carries what the broker knows about one delivery attempt (stream sequence, attempt
number, subject). Handlers receive both; only the consumer engine settles a message.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Generic, TypeVar

import msgspec

from schemas.limits import Headers, Ident, Name

ENVELOPE_VERSION = 1

# Priorities run 0 (lowest) to 9 (highest); under a backlog higher is handled first.
PRIORITY_MIN = 0
PRIORITY_MAX = 9
PRIORITY_DEFAULT = 4
# Out of range is invalid on the wire too (a consumer dead-letters it, a projection folds it as an
# undecodable record), not only when sending.
Priority = Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX)]
# Envelope.hops on the wire; a consumer's own bound (ConsumerSettings.max_hops) is far lower.
MAX_HOPS_ON_WIRE = 10_000
Hops = Annotated[int, msgspec.Meta(ge=0, le=MAX_HOPS_ON_WIRE)]


class Payload(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every payload. Subclasses set an explicit dotted `tag=` (never the class name:
    the log outlives renames) and give every field added later a default."""


P = TypeVar("P")


class Envelope(msgspec.Struct, Generic[P], frozen=True, kw_only=True, omit_defaults=True):
    """One message or event on the bus.

    Exactly one of `to` (a named agent) and `tag` (every agent carrying the tag) is set for a
    message; both are None for an event an agent records about itself.
    """

    # Names and ids are bounded (schemas.limits): an envelope over a limit does not decode.
    id: Ident
    sender: Name
    payload: P
    created_at: datetime
    to: Name | None = None
    tag: Name | None = None
    correlation_id: Ident | None = None
    causation_id: Ident | None = None
    # Set on a request: the name replies are addressed to (the reply subject is derived from it).
    reply_to: Name | None = None
    priority: Priority = PRIORITY_DEFAULT
    expires_at: datetime | None = None
    headers: Headers = {}
    # How many handled messages led to this one: what a handler sends, broadcasts, requests or
    # replies carries its inbound message's hops + 1. Consumers end a chain past their
    # `max_hops` (agents answering each other for ever), dead-lettering it as `hop_limit`.
    hops: Hops = 0
    v: int = ENVELOPE_VERSION

    @property
    def kind(self) -> str:
        """The payload's tag, e.g. "task.requested"."""
        return payload_kind(self.payload)

    def is_expired(self, now: datetime | None = None) -> bool:
        """True if `expires_at` is set and is not after `now` (default: the current UTC time)."""
        if self.expires_at is None:
            return False
        return self.expires_at <= (now or datetime.now(timezone.utc))


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """Facts of one delivery attempt, from the broker (never from the producer)."""

    stream: str
    consumer: str
    subject: str
    stream_seq: int
    consumer_seq: int
    attempt: int
    pending: int
    published_at: datetime


def payload_kind(payload: Any) -> str:
    """Return the `kind` tag of a payload Struct instance. Raises TypeError for a non-payload."""
    tag = type(payload).__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{type(payload).__name__} has no string tag; payloads need tag='...'")
    return tag


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)
