"""Reading a range of the log back, in stream order, with batched direct gets.

    async for seq, subject, envelope in read_range(bus, "default.event.*.memory.>", after=120):
        ...

One request per batch (`{"seq": N, "next_by_subj": filter, "batch": B}` on
`$JS.API.DIRECT.GET.<stream>`); the server answers with up to B messages and then a `Status: 204`
end-of-batch marker (`404` when nothing matches). No consumer is created, so an agent can catch
up on every message it handles without leaving server state behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats.errors

from bus.client import Bus
from bus.errors import BusUnavailable
from schemas import DecodeError, Envelope

BATCH = 256

_encode = msgspec.json.encode


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
                envelope = bus.codec.decode(data)
            except DecodeError:
                continue
            yield StoredEvent(seq, subject, envelope)
        if len(batch) < BATCH:
            return
        next_seq = batch[-1][0] + 1


async def _batch(bus: Bus, subject_filter: str, start: int, timeout_s: float) -> list[tuple[int, str, bytes]]:
    nc = bus.nc
    inbox = nc.new_inbox()
    request = _encode({"seq": start, "next_by_subj": subject_filter, "batch": BATCH})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    out: list[tuple[int, str, bytes]] = []
    try:
        sub = await nc.subscribe(inbox)
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{bus.subjects.stream}", request, reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=max(0.001, deadline - loop.time()))
                headers = dict(msg.headers or {})
                status = headers.get("Status")
                if status in ("204", "404"):
                    return out
                if status:
                    raise BusUnavailable(
                        f"direct get of {subject_filter} refused: {status} {headers.get('Description', '')}"
                    )
                out.append((int(headers.get("Nats-Sequence", "0")), headers.get("Nats-Subject", ""), msg.data))
                if len(out) >= BATCH:
                    # The end-of-batch marker follows; not waiting for it saves a round trip.
                    return out
        finally:
            await sub.unsubscribe()
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise BusUnavailable(f"direct get of {subject_filter} not answered within {timeout_s}s") from exc
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
        raise BusUnavailable(f"not connected to NATS: {exc}") from exc
