"""An agent's memory kept in step with the log: what it folds, and how it writes.

    log = MemoryLog(bus, "writer")
    await log.catch_up()                          # fold every memory event not seen yet
    stored = await log.record(event, id=..., causation=envelope)   # append, then fold

What an agent folds (one subject filter, `<ns>.event.*.memory.>`): every fact and contradiction
(archival memory is shared by the team), every block event (the fold keeps the blocks the agent
holds), and its own conversation only.

Block events are stored on a subject of their own per block,
`<ns>.event.<writer>.<kind>.<block token>`, and appended with an expected last sequence on
`<ns>.event.*.memory.block.*.<block token>`: the server refuses a write made against a version
another agent has already replaced (`ConcurrencyConflict`), so concurrent writers of a shared
block never lose an update; the loser catches up and decides again on the fresh value. Every
other memory event goes through `bus.record`.

A write is stored once: ids are derived by the caller from the step, so a write retried after a
crash is a JetStream duplicate, and then the event stored first is adopted (read back by its
sequence) instead of the one decided now.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from agents.llm_agent.logread import read_range
from agents.llm_agent.snapshot import entry_envelope, load_snapshot, write_snapshot
from agents.memory import AgentMemory
from agents.memory.errors import BlockLimitExceeded
from agents.runtime.reads import by_seq, last_by_subject
from bus.client import Bus
from bus.errors import BusUnavailable
from schemas import Envelope
from agents.memory.state import BLOCK_EVENTS, RECALL_EVENTS
from schemas.payloads.memory import (
    BlockAppended,
    BlockCreated,
    BlockReplaced,
    BlockSet,
    ContradictionFlagged,
    FactRecorded,
)

BLOCK_WRITES = (BlockSet, BlockAppended, BlockReplaced)
# Conversation events concern only the agent that recorded them.
_OWN_ONLY = RECALL_EVENTS


def block_token(block_id: str) -> str:
    """A subject token naming a block (block ids may hold '/' and '.')."""
    return "b" + hashlib.blake2b(block_id.encode(), digest_size=8).hexdigest()


def memory_filter(bus: Bus) -> str:
    """The subject filter of every memory event of every agent."""
    return f"{bus.subjects.ns}.event.*.memory.>"


def block_fence(bus: Bus, block_id: str) -> str:
    """The subject filter holding every event of one block, whoever wrote it."""
    return f"{bus.subjects.ns}.event.*.memory.block.*.{block_token(block_id)}"


def concerns(agent: str, payload: Any) -> bool:
    """True if `agent`'s memory folds `payload` (its own turns only; all facts and blocks)."""
    if isinstance(payload, _OWN_ONLY):
        return payload.agent == agent
    return True


class MemoryLog:
    """One agent's memory and its position in the log."""

    def __init__(self, bus: Bus, agent: str) -> None:
        self.bus = bus
        self.agent = agent
        self.memory = AgentMemory(agent)
        self.position = 0  # the last stream sequence read from the memory filter
        # block_id -> stream sequence of the block's last stored event (the fence's expectation)
        self.block_seq: dict[str, int] = {}
        # message id -> the facts and contradictions its handling recorded (by any attempt)
        self._caused: dict[str, dict[str, Any]] = {}
        self._started = False
        # The position of the latest snapshot this memory was started from or wrote (0: none),
        # and how many entries it holds.
        self.snapshot_position = 0
        self.snapshot_entries = 0

    async def _restore(self, up_to: int | None) -> None:
        """Fold the latest snapshot's entries (not past `up_to`), if there is one."""
        snapshot = await load_snapshot(self.bus, self.agent)
        if snapshot is None or (up_to is not None and snapshot.position > up_to):
            return
        for entry in snapshot.entries:
            envelope = entry_envelope(self.bus, entry)
            if envelope is not None:
                self.fold(entry.seq, envelope.payload, cause=envelope.causation_id)
        self.position = self.snapshot_position = snapshot.position
        self.snapshot_entries = len(snapshot.entries)

    async def snapshot(self) -> int:
        """Record a snapshot of this memory up to `position` (nothing when the latest snapshot
        reaches it already); return the position the latest snapshot reaches. Raises
        BusUnavailable."""
        written = await write_snapshot(self.bus, self.agent, position=self.position)
        if written is not None:
            self.snapshot_position = written.position
            self.snapshot_entries = len(written.entries)
        return max(self.snapshot_position, written.position if written is not None else 0)

    def caused_by(self, message_id: str, kind: type | None = None) -> list[Any]:
        """The facts and contradictions recorded while handling `message_id`, in log order,
        whichever attempt recorded them (so a retry that finds its fact already stored still
        knows it recorded it)."""
        found = self._caused.get(message_id, {})
        return [e for e in found.values() if kind is None or isinstance(e, kind)]

    def fold(self, seq: int, payload: Any, *, cause: str | None = None) -> None:
        """Fold one stored event (ignored unless this agent's memory concerns it); `cause` is
        the id of the message whose handling recorded it."""
        if cause is not None and isinstance(payload, (FactRecorded, ContradictionFlagged)):
            key = payload.fact_id if isinstance(payload, FactRecorded) else payload.contradiction_id
            self._caused.setdefault(cause, {}).setdefault(key, payload)
        if isinstance(payload, BLOCK_EVENTS):
            self.block_seq[payload.block_id] = max(self.block_seq.get(payload.block_id, 0), seq)
        if concerns(self.agent, payload):
            self.memory.apply(payload, seq=seq)

    async def catch_up(self, *, up_to: int | None = None) -> int:
        """Fold every memory event stored after `position` (up to `up_to`); return the new
        position. The first catch-up starts from the agent's latest memory snapshot when it has
        one (agents.llm_agent.snapshot): its entries, then the log after it. Raises BusUnavailable."""
        if self.position == 0 and not self._started:
            self._started = True
            await self._restore(up_to)
        async for stored in read_range(self.bus, memory_filter(self.bus), after=self.position, up_to=up_to):
            self.fold(stored.seq, stored.envelope.payload, cause=stored.envelope.causation_id)
            self.position = max(self.position, stored.seq)
        return self.position

    async def record(self, event: Any, *, id: str, cause: Envelope[Any] | None = None) -> Any:
        """Append `event`, fold it, and return the event as stored (the first one stored under
        `id` when this is a retry). Block writes are fenced (see the module docstring).

        Raises ConcurrencyConflict (a block changed since this agent last read it),
        BlockLimitExceeded (a block value over its limit: never stored), BusUnavailable.
        """
        fields: dict[str, Any] = {"id": id}
        if cause is not None:
            fields.update(correlation_id=cause.correlation_id, causation_id=cause.id)
        if isinstance(event, BLOCK_EVENTS):
            self._check_limit(event)
            sent = await self._record_block(event, fields)
        else:
            sent = await self.bus.record(self.agent, event, **fields)
        seq = sent.ack.seq
        if sent.ack.duplicate:
            event = await self._stored(seq)
        self.fold(seq, event, cause=None if cause is None else cause.id)
        return event

    async def recorded_call(self, call_id: str) -> Any | None:
        """The `llm.call.completed` event stored under `call_id`, when it is this agent's latest
        call (an attempt that died right after its model call left it there); else None."""
        stored = await last_by_subject(self.bus, self.bus.subjects.event(self.agent, "llm.call.completed"))
        if stored is None:
            return None
        envelope = await self.bus.open_record(stored.data)
        return envelope.payload if envelope.id == call_id else None

    async def _record_block(self, event: Any, fields: dict[str, Any]) -> Any:
        bus = self.bus
        expected = self.block_seq.get(event.block_id, 0)
        envelope = bus.envelope(event, sender=self.agent, **fields)
        envelope = msgspec.structs.replace(envelope, headers={**envelope.headers, "Bus-Prev-Seq": str(expected)})
        subject = f"{bus.subjects.event(self.agent, envelope.kind)}.{block_token(event.block_id)}"
        return await bus.publish(
            envelope, subject,
            expected_last_subject_seq=expected, expected_last_subject=block_fence(bus, event.block_id),
        )

    def _check_limit(self, event: Any) -> None:
        # The size limit holds on every path into the log, not only through the tools.
        if isinstance(event, BlockCreated):
            limit, label = event.limit, event.label
        elif isinstance(event, BLOCK_WRITES):
            block = self.memory.blocks.by_id(event.block_id)
            if block is None:
                return  # unknown block: the fold reports it
            limit, label = block.limit, block.label
        else:
            return
        if len(event.value) > limit:
            raise BlockLimitExceeded(
                f"block {label!r} would hold {len(event.value)} characters; its limit is {limit}",
                label=label, limit=limit, size=len(event.value),
            )

    async def _stored(self, seq: int) -> Any:
        stored = await by_seq(self.bus, seq)
        if stored is None:
            raise BusUnavailable(f"event at seq {seq} reported as stored but not readable")
        return (await self.bus.open_record(stored.data)).payload
