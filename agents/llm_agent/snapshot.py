"""Snapshots of an agent's memory, as events: a restart after the early memory events were trimmed
from the log folds the same memory from the latest snapshot plus what follows.

    written = await write_snapshot(bus, "writer", position=log.position)
    loaded = await load_snapshot(bus, "writer")        # None: no whole snapshot

A snapshot holds every memory event the agent's memory is folded from up to `position` (every
fact, contradiction and block event, the agent's own conversation), each as its stored envelope
with its log sequence: folding its entries, then the log after `position`, is the same fold as
reading the log from the start, so the memory (and the context compiled from it) is the same.
It is built from the previous snapshot plus the log read after it, so it never needs what a trim
removed. It is recorded at `<ns>.event.<agent>.agent.memory.snapshot` in parts of at most
PART_BYTES of entries (the server's message limit), one after another; the last part closes it.
A snapshot a crash left without its last part is not used: the one before it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from agents.llm_agent.logread import read_range
from agents.runtime.reads import last_by_subject
from bus.client import Bus
from schemas import DecodeError, Envelope, stable_id
from schemas.payloads import MemorySnapshotted, SnapshotEntry

SNAPSHOT_KIND = "agent.memory.snapshot"
# Entries' bytes per part at most: a part stays well under nats-server's default 1 MiB limit.
PART_BYTES = 512 * 1024


@dataclass(frozen=True)
class Snapshot:
    """A whole snapshot: its entries in log order and the position they reach."""

    snapshot_id: str
    position: int
    entries: list[SnapshotEntry]
    seq: int  # the log sequence of its last part


def snapshot_subject(bus: Bus, agent: str) -> str:
    return bus.subjects.event(agent, SNAPSHOT_KIND)


def concerns_entry(agent: str, payload: Any) -> bool:
    from agents.llm_agent.memory_log import concerns  # (memory_log folds snapshots: imported late)

    return concerns(agent, payload)


async def write_snapshot(bus: Bus, agent: str, *, position: int) -> Snapshot | None:
    """Record a snapshot of `agent`'s memory up to log sequence `position` (the latest snapshot
    plus the memory events after it); None when the latest already reaches `position`. Its id
    is derived from the agent and the position, so a snapshot written again is stored once
    within the duplicate window. Raises BusUnavailable."""
    from agents.llm_agent.memory_log import memory_filter

    latest = await load_snapshot(bus, agent)
    if latest is not None and latest.position >= position:
        return None
    entries = list(latest.entries) if latest is not None else []
    after = latest.position if latest is not None else 0
    async for stored in read_range(bus, memory_filter(bus), after=after, up_to=position):
        if concerns_entry(agent, stored.envelope.payload):
            entries.append(SnapshotEntry(seq=stored.seq, envelope=msgspec.Raw(bus.codec.encode(stored.envelope))))
    snapshot_id = stable_id("memory.snapshot", bus.subjects.ns, agent, str(position))
    parts = _split(entries)
    first_part_seq = 0
    seq = 0
    for index, part in enumerate(parts):
        payload = MemorySnapshotted(
            agent=agent, snapshot_id=snapshot_id, position=position, part=index, parts=len(parts),
            entries=part, first_part_seq=first_part_seq,
        )
        sent = await bus.record(agent, payload, id=stable_id("memory.snapshot.part", snapshot_id, str(index)))
        seq = sent.ack.seq
        if index == 0:
            first_part_seq = seq
    return Snapshot(snapshot_id=snapshot_id, position=position, entries=entries, seq=seq)


async def load_snapshot(bus: Bus, agent: str) -> Snapshot | None:
    """`agent`'s latest whole snapshot, or None when it has none. Raises BusUnavailable."""
    subject = snapshot_subject(bus, agent)
    last = await last_by_subject(bus, subject)
    if last is None:
        return None
    closing = _decode(bus, last.data)
    if closing is not None and closing.part == closing.parts - 1:
        after = (closing.first_part_seq or last.seq) - 1
        found = await _parts(bus, subject, after=after, up_to=last.seq)
        whole = _whole(found.get(closing.snapshot_id, []))
        if whole is not None:
            return whole
    # The last snapshot was left unfinished (or unreadable): the latest whole one before it.
    found = await _parts(bus, subject, after=0, up_to=last.seq)
    wholes = [w for w in (_whole(parts) for parts in found.values()) if w is not None]
    return max(wholes, key=lambda w: w.seq, default=None)


async def _parts(bus: Bus, subject: str, *, after: int, up_to: int) -> dict[str, list[tuple[int, MemorySnapshotted]]]:
    found: dict[str, list[tuple[int, MemorySnapshotted]]] = {}
    async for stored in read_range(bus, subject, after=after, up_to=up_to):
        payload = stored.envelope.payload
        if isinstance(payload, MemorySnapshotted):
            found.setdefault(payload.snapshot_id, []).append((stored.seq, payload))
    return found


def _whole(parts: list[tuple[int, MemorySnapshotted]]) -> Snapshot | None:
    by_index = {p.part: (seq, p) for seq, p in parts}
    if not parts:
        return None
    count = parts[0][1].parts
    if sorted(by_index) != list(range(count)):
        return None
    ordered = [by_index[i][1] for i in range(count)]
    entries = [e for p in ordered for e in p.entries]
    return Snapshot(snapshot_id=ordered[0].snapshot_id, position=ordered[0].position, entries=entries,
                    seq=by_index[count - 1][0])


def _decode(bus: Bus, data: bytes) -> MemorySnapshotted | None:
    try:
        payload = bus.codec.decode(data).payload
    except DecodeError:
        return None
    return payload if isinstance(payload, MemorySnapshotted) else None


def _split(entries: list[SnapshotEntry]) -> list[list[SnapshotEntry]]:
    parts: list[list[SnapshotEntry]] = [[]]
    size = 0
    for entry in entries:
        length = len(entry.envelope) + 32
        if parts[-1] and size + length > PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(entry)
        size += length
    return parts


def entry_envelope(bus: Bus, entry: SnapshotEntry) -> Envelope[Any] | None:
    """The envelope of a snapshot entry (None: bytes that no longer decode, skipped as a log
    read skips them)."""
    try:
        return bus.codec.decode(bytes(entry.envelope))
    except DecodeError:
        return None
