"""What trimming the log needs from the server: purges below a sequence, the subjects a filter
holds, the first sequence stored at or after a time, and how far every consumer has settled.

    purged = await purge_below(bus, "default.event.*.agent.heartbeat", below_seq=1200)
    last = await last_seq_by_subject(bus, "default.event.*.agent.state")   # {subject: seq}
    at = await first_seq_since(bus, cutoff)        # the first record stored at or after cutoff
    floors = await consumer_floors(bus)            # below them, nothing left to deliver or settle

The log denies single-message deletes (`deny_delete`) but allows purges: a purge removes a
prefix of the log (on one subject filter), which is what retention is. Only an operator's credential may
purge (the service's, the agents' and the console's grants deny `$JS.API.STREAM.PURGE`).
Purging does not clear the server's duplicate window: an id stored within it is still refused
as a duplicate after its record was purged (checked against nats-server 2.15).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js.api import AckPolicy

from bus.cancellation import cancellation_kept
from bus.errors import BusUnavailable, ConfigurationError, PermissionDenied
from bus.transport import translate

if TYPE_CHECKING:
    from bus.client import Bus

# The server lists at most this many subjects in one stream info answer.
SUBJECTS_PER_ANSWER = 100_000


async def purge_below(bus: Bus, subject_filter: str, below_seq: int) -> int:
    """Purge the log's records on `subject_filter` with a sequence below `below_seq`; return how
    many went. Nothing is asked of the server when `below_seq` <= 1. Raises BusUnavailable,
    PermissionDenied (a credential that may not purge)."""
    if below_seq <= 1:
        return 0
    stream = bus.subjects.stream
    what = f"purging {subject_filter} below seq {below_seq} from {stream}"
    request = msgspec.json.encode({"filter": subject_filter, "seq": below_seq})
    answer = await cancellation_kept(bus.transport.request(f"$JS.API.STREAM.PURGE.{stream}", request, timeout_s=10.0))
    try:
        reply = _purge_reply.decode(answer.data)
    except msgspec.DecodeError as exc:
        raise BusUnavailable(f"{what}: the server's answer is not a purge response: {exc}") from exc
    if reply.error is not None or not reply.success:
        description = (reply.error or {}).get("description", "refused")
        if "permission" in str(description).lower():
            raise PermissionDenied(f"{what}: {description}")
        raise BusUnavailable(f"{what}: {description}")
    return reply.purged


class _PurgeReply(msgspec.Struct):
    success: bool = False
    purged: int = 0
    error: dict[str, Any] | None = None


_purge_reply = msgspec.json.Decoder(_PurgeReply)


async def subject_counts(bus: Bus, subject_filter: str) -> dict[str, int]:
    """Every subject of the log matching `subject_filter` and how many records it holds. Raises
    BusUnavailable, ConfigurationError (more subjects than one answer lists)."""
    stream = bus.subjects.stream
    try:
        info = await cancellation_kept(
            bus.transport.guarded("$JS.API.", bus.js.stream_info(stream, subjects_filter=subject_filter))
        )
    except Exception as exc:
        raise translate(exc, f"listing the subjects {subject_filter} of {stream}") from exc
    subjects = dict(info.state.subjects or {})
    if len(subjects) >= SUBJECTS_PER_ANSWER:
        raise ConfigurationError(
            f"{subject_filter} matches {SUBJECTS_PER_ANSWER:,} subjects or more: more than one answer lists "
            "(narrow the retention class)"
        )
    return subjects


async def last_seq_by_subject(bus: Bus, subject_filter: str) -> dict[str, int]:
    """The sequence of the last record of every subject matching `subject_filter`. Raises
    BusUnavailable, ConfigurationError."""
    last: dict[str, int] = {}
    for subject in await subject_counts(bus, subject_filter):
        stored = await bus.transport.direct_get(bus.subjects.stream, {"last_by_subj": subject})
        if stored is not None:
            last[subject] = stored.seq
    return last


async def first_seq_since(bus: Bus, when: datetime) -> int:
    """The sequence of the first record stored at or after `when` (the log's last sequence + 1
    when none was). Raises BusUnavailable."""
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    stored = await bus.transport.direct_get(bus.subjects.stream, {"start_time": stamp})
    if stored is not None:
        return stored.seq
    return await bus.last_seq() + 1


class ConsumerFloors(msgspec.Struct, frozen=True):
    """How far every consumer of the log has got: below `settled`, no delivery is still waiting
    for its acknowledgement; below `delivered`, neither that nor a record still to deliver."""

    settled: int
    delivered: int


async def consumer_floors(bus: Bus) -> ConsumerFloors:
    """The floors of every consumer of the log (see ConsumerFloors; the log's last sequence + 1
    when nothing waits). A consumer counts when it has deliveries waiting for an
    acknowledgement (`settled`) or anything left to deliver (`delivered`); a consumer with
    neither does not count. Raises BusUnavailable."""
    stream = bus.subjects.stream
    settled = delivered = await bus.last_seq() + 1
    offset = 0
    while True:
        try:
            # Guarded: a credential that may not list consumers is refused at once, not after a timeout.
            infos = await cancellation_kept(
                bus.transport.guarded("$JS.API.", bus.js.consumers_info(stream, offset=offset or None))
            )
        except Exception as exc:
            raise translate(exc, f"listing the consumers of {stream}") from exc
        for info in infos:
            if info.config.ack_policy == AckPolicy.NONE:
                # A reader (the projections', an archive run's, the console's): nothing of it is
                # redelivered, and a dead one lingers until the server drops it. The views are
                # checked by the trim itself.
                continue
            waiting = (info.num_ack_pending or 0) + (info.num_redelivered or 0)
            if not waiting and not info.num_pending:
                continue
            lowest = await _first_unsettled(bus, info)
            if waiting:
                settled = min(settled, lowest)
            delivered = min(delivered, lowest)
        if len(infos) < CONSUMERS_PER_ANSWER:
            return ConsumerFloors(settled=settled, delivered=delivered)
        offset += len(infos)


async def _first_unsettled(bus: Bus, info: Any) -> int:
    """The sequence of the first record on the consumer's filters after its ack floor: every
    record it has still to deliver or see acknowledged is at or after it (the ack floor alone
    may lie far below, e.g. 0 for a consumer that never acknowledged anything)."""
    acked = (info.ack_floor.stream_seq or 0) if info.ack_floor is not None else 0
    config = info.config
    filters = list(config.filter_subjects or []) or ([config.filter_subject] if config.filter_subject else [])
    lowest = acked + 1
    if not filters:
        return lowest
    found = []
    for subject_filter in filters:
        stored = await bus.transport.direct_get(bus.subjects.stream, {"seq": acked + 1, "next_by_subj": subject_filter})
        if stored is not None:
            found.append(stored.seq)
    return min(found) if found else await bus.last_seq() + 1


# The server lists at most this many consumers in one answer.
CONSUMERS_PER_ANSWER = 256
