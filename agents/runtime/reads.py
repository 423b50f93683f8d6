"""Point reads from the log with JetStream direct get (`allow_direct` is on for the log stream).

    last_by_subject  the last message on one subject (an agent's state)
    by_seq           the message at one stream sequence
    multi_last       the last message of every subject matching filters, in one request
                     (every recorded step of one inbound message)
    batch            any batched get (e.g. `next_by_subj` ranges), up to a limit

The reads themselves are the transport's (`bus.transport.direct_get`, `direct_get_batch`); this
module names the ones the agent runtime makes.
"""

from __future__ import annotations

from bus.client import Bus
from bus.transport import StoredMessage

# The server refuses (413) a multi-subject get matching more subjects than this.
MULTI_LAST_LIMIT = 1024

# One message read back from the log.
StoredMsg = StoredMessage


async def last_by_subject(bus: Bus, subject: str, *, timeout_s: float = 5.0) -> StoredMsg | None:
    """The last message stored on `subject`, or None. Raises BusUnavailable."""
    return await _single(bus, {"last_by_subj": subject}, timeout_s)


async def by_seq(bus: Bus, seq: int, *, timeout_s: float = 5.0) -> StoredMsg | None:
    """The message at stream sequence `seq`, or None if there is none. Raises BusUnavailable."""
    return await _single(bus, {"seq": seq}, timeout_s)


async def multi_last(bus: Bus, filters: list[str], *, timeout_s: float = 5.0) -> list[StoredMsg]:
    """The last message of each subject matching `filters` (wildcards allowed), in stream order.

    Raises BusUnavailable on a timeout or a server refusal (413: more than MULTI_LAST_LIMIT
    subjects matched).
    """
    request = {"multi_last": filters, "batch": MULTI_LAST_LIMIT}
    return await batch(bus, request, limit=MULTI_LAST_LIMIT, timeout_s=timeout_s)


async def batch(bus: Bus, request: dict[str, object], *, limit: int, timeout_s: float = 5.0) -> list[StoredMsg]:
    """One batched direct get (`request` holds `"batch": limit` and what to read): up to
    `limit` messages in stream order, empty when nothing matched.

    Raises BusUnavailable on a timeout, a lost connection or a server refusal.
    """
    return await bus.transport.direct_get_batch(bus.subjects.stream, request, limit=limit, timeout_s=timeout_s)


async def _single(bus: Bus, request: dict[str, object], timeout_s: float) -> StoredMsg | None:
    return await bus.transport.direct_get(bus.subjects.stream, request, timeout_s=timeout_s)
