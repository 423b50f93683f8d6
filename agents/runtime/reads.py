"""Point reads from the log with JetStream direct get (`allow_direct` is on for the log stream).

    last_by_subject  the last message on one subject (an agent's state)
    by_seq           the message at one stream sequence
    multi_last       the last message of every subject matching filters, in one request
                     (every recorded step of one inbound message)
    batch            any batched get (e.g. `next_by_subj` ranges), up to a limit

Direct get replies are plain messages with `Nats-Subject`/`Nats-Sequence` headers; a batch ends
with a `Status: 204` message, and `Status: 404` means nothing matched (ADR-31). nats-py has no
helper for batched or multi-subject gets, so these speak the API directly.
"""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors

from bus.client import Bus
from bus.errors import BusUnavailable

# The server refuses (413) a multi-subject get matching more subjects than this.
MULTI_LAST_LIMIT = 1024

_encode = msgspec.json.encode


class StoredMsg(msgspec.Struct, frozen=True, kw_only=True):
    """One message read back from the log."""

    subject: str
    seq: int
    headers: dict[str, str]
    data: bytes


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
    nc = bus.nc
    inbox = nc.new_inbox()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    out: list[StoredMsg] = []
    try:
        sub = await nc.subscribe(inbox)
        try:
            # Same connection: the server sees the SUB before the request, no flush needed.
            await nc.publish(_api(bus), _encode(request), reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=max(0.001, deadline - loop.time()))
                headers = dict(msg.headers or {})
                status = headers.get("Status")
                if status in ("204", "404"):
                    return out
                if status:
                    raise BusUnavailable(f"direct get {request} refused: {status} {headers.get('Description', '')}")
                out.append(_stored(headers, msg.data))
                if len(out) >= limit:
                    # The end-of-batch marker follows; not waiting for it saves a round trip.
                    return out
        finally:
            await sub.unsubscribe()
    except (nats.errors.TimeoutError, asyncio.TimeoutError) as exc:
        raise BusUnavailable(f"direct get {request} not answered within {timeout_s}s") from exc
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
        raise BusUnavailable(f"not connected to NATS: {exc}") from exc


async def _single(bus: Bus, request: dict[str, object], timeout_s: float) -> StoredMsg | None:
    try:
        msg = await bus.nc.request(_api(bus), _encode(request), timeout=timeout_s)
    except (nats.errors.TimeoutError, asyncio.TimeoutError) as exc:
        raise BusUnavailable(f"direct get {request} not answered within {timeout_s}s") from exc
    except nats.errors.NoRespondersError as exc:
        raise BusUnavailable(f"direct get is not enabled on {bus.subjects.stream}") from exc
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
        raise BusUnavailable(f"not connected to NATS: {exc}") from exc
    headers = dict(msg.headers or {})
    status = headers.get("Status")
    if status == "404":
        return None
    if status:
        raise BusUnavailable(f"direct get {request} refused: {status} {headers.get('Description', '')}")
    return _stored(headers, msg.data)


def _api(bus: Bus) -> str:
    return f"$JS.API.DIRECT.GET.{bus.subjects.stream}"


def _stored(headers: dict[str, str], data: bytes) -> StoredMsg:
    return StoredMsg(
        subject=headers.get("Nats-Subject", ""),
        seq=int(headers.get("Nats-Sequence", "0")),
        headers=headers,
        data=data,
    )
