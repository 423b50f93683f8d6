"""Reading a range of the log back, in stream order, with batched direct gets.

    async for seq, subject, envelope in read_range(bus, "default.event.*.memory.>", after=120):
        ...

One request per batch (`{"seq": N, "next_by_subj": filter, "batch": B}` on
`$JS.API.DIRECT.GET.<stream>`); the server answers with up to B messages and then a `Status: 204`
end-of-batch marker (`404` when nothing matches). No consumer is created, so an agent can catch
up on every message it handles without leaving server state behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from agents.runtime import reads
from bus.client import Bus
from schemas import DecodeError, Envelope

BATCH = 256



class StoredEvent(msgspec.Struct, frozen=True):
    """One envelope read back, with where it is stored."""

    seq: int
    subject: str
    envelope: Envelope[Any]


async def read_range(
    bus: Bus,
    subject_filter: str,
    *,
    after: int = 0,
    up_to: int | None = None,
    timeout_s: float = 5.0,
) -> AsyncIterator[StoredEvent]:
    """Every envelope stored on `subject_filter` with a sequence above `after` (and at most
    `up_to`), in stream order. Bytes that do not decode are skipped (a projection reports them;
    a reader of memory cannot use them). Raises BusUnavailable."""
    next_seq = after + 1
    while up_to is None or next_seq <= up_to:
        batch = await _batch(bus, subject_filter, next_seq, timeout_s)
        for seq, subject, data in batch:
            if up_to is not None and seq > up_to:
                return
            try:
                envelope = await bus.open_record(data)
            except DecodeError:
                continue
            yield StoredEvent(seq, subject, envelope)
        if len(batch) < BATCH:
            return
        next_seq = batch[-1][0] + 1


async def _batch(bus: Bus, subject_filter: str, start: int, timeout_s: float) -> list[tuple[int, str, bytes]]:
    request = {"seq": start, "next_by_subj": subject_filter, "batch": BATCH}
    stored = await reads.batch(bus, request, limit=BATCH, timeout_s=timeout_s)
    return [(msg.seq, msg.subject, msg.data) for msg in stored]
