"""Facts the consumer engine records about deliveries: settlements, expiries, dead letters."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from schemas.envelope import Payload

# "skipped": acked without running the handler (a broadcast the agent sent itself).
Outcome = Literal["handled", "retried", "failed", "dead_lettered", "expired", "skipped"]


class Settlement(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How one delivery attempt ended. `envelope_id` is None when the bytes did not decode."""

    stream_seq: int
    attempt: int
    outcome: Outcome
    envelope_id: str | None = None
    kind: str | None = None
    handler_ms: float = 0.0
    error: str | None = None
    # The failed attempt's traceback (bounded, its last frames kept); None when it did not raise.
    traceback: str | None = None


class DeliveryReport(Payload, frozen=True, kw_only=True, tag="delivery.report"):
    """Settlements of one consumer, recorded *before* the acks they describe are sent, so the
    log never shows fewer outcomes than the broker has settled."""

    agent: str
    consumer: str
    settlements: list[Settlement]


class DeadLettered(Payload, frozen=True, kw_only=True, tag="delivery.dead_lettered"):
    """A message that will not be handled, with why and the exact original bytes.

    A dead letter always fits in one message: an original too large to carry is left out
    (`original` empty) and referred to by its stream sequence, size and SHA-256; it stays in
    the log at `original_seq`. (Dead letters written before size and hash were recorded carry
    their original and have neither.)"""

    reason: str
    agent: str
    consumer: str
    original_subject: str
    original_seq: int
    original: bytes
    deliveries: int
    original_id: str | None = None
    original_kind: str | None = None
    error: str | None = None
    original_size: int | None = None
    original_sha256: str | None = None
    # The last attempt's traceback, when a handler raised (bounded, its last frames kept).
    traceback: str | None = None

    @property
    def carries_original(self) -> bool:
        """False when the original was too large to carry and is only referred to."""
        return self.original_size is None or len(self.original) == self.original_size


class DeliveryExpired(Payload, frozen=True, kw_only=True, tag="delivery.expired"):
    """An envelope that reached its agent after `expires_at` and was therefore not handled."""

    agent: str
    original_id: str
    original_kind: str
    original_seq: int
    expired_at: datetime


class DeadLetterRetried(Payload, frozen=True, kw_only=True, tag="delivery.dead_letter.retried"):
    """A dead letter's original sent again (`bus dlq retry`): who did it, and as what. The new
    message is caused by the dead letter; if it fails again it is dead-lettered again."""

    agent: str  # whose consumer gave up on the original
    dead_letter_id: str
    original_id: str | None
    retried_as: str  # the new envelope's id
    retried_seq: int
    by: str  # the sender name of whoever retried it
