"""An agent's working memory: core blocks, recall and archival, folded from its events.

    memory = AgentMemory.rebuild("reader", events)      # on restart: from the log
    event = memory.blocks.append("notes", "day 2 read", actor="reader")   # decide
    ...record the event..., then memory.apply(event)                       # fold

Which events reach the fold is the runtime's choice (its subscriptions). The fold keeps:
blocks this agent holds (and every block it has seen, so an attach can show it at once), the
agent's own conversation turns, and every fact and contradiction it is given (archival memory is
shared by whoever records into what the agent reads). Anything refused is kept in `anomalies`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec

from agents.memory.anomaly import Anomaly
from agents.memory.archival import FactIndex, FactStats
from agents.memory.blocks import BlockStore
from agents.memory.recall import RecallLog
from schemas.payloads.memory import (
    BlockAppended,
    BlockAttached,
    BlockCreated,
    BlockDetached,
    BlockReplaced,
    BlockSet,
    ContradictionFlagged,
    ConversationClosed,
    ConversationSummarised,
    FactRecorded,
    FactRetracted,
    FactSuperseded,
    TurnRecorded,
)

BLOCK_EVENTS = (BlockCreated, BlockSet, BlockAppended, BlockReplaced, BlockAttached, BlockDetached)
RECALL_EVENTS = (TurnRecorded, ConversationSummarised, ConversationClosed)
FACT_EVENTS = (FactRecorded, FactSuperseded, FactRetracted, ContradictionFlagged)

MEMORY_EVENT_TYPES: tuple[type, ...] = (*BLOCK_EVENTS, *RECALL_EVENTS, *FACT_EVENTS)


class MemoryStats(msgspec.Struct, frozen=True, kw_only=True):
    """Sizes of each tier, for the context's memory metadata and for metrics."""

    blocks: int
    turns: int
    turns_in_window: int
    summaries: int
    facts: FactStats
    anomalies: int


class AgentMemory:
    """The three memory tiers of one agent, rebuilt from events."""

    def __init__(self, agent: str, *, max_anomalies: int = 1000) -> None:
        self.agent = agent
        self.blocks = BlockStore(agent)
        self.recall = RecallLog(agent)
        self.facts = FactIndex()
        # The most recent anomalies (bounded); `anomaly_count` counts all of them.
        self.anomalies: deque[Anomaly] = deque(maxlen=max_anomalies)
        self.anomaly_count = 0
        self.applied = 0
        self.last_seq = 0

    @classmethod
    def rebuild(cls, agent: str, events: Iterable[Any]) -> "AgentMemory":
        """Memory folded from `events`: payloads, or (stream_seq, payload) pairs, in log order."""
        memory = cls(agent)
        memory.apply_all(events)
        return memory

    def apply_all(self, events: Iterable[Any]) -> None:
        """Fold each of `events` (payloads or (seq, payload) pairs)."""
        for item in events:
            if isinstance(item, tuple):
                self.apply(item[1], seq=item[0])
            else:
                self.apply(item)

    def apply(self, payload: Any, *, seq: int = 0) -> bool:
        """Fold one event. Returns False for a payload that is not a memory event. Never raises
        on an event's content: refusals are appended to `anomalies`."""
        if isinstance(payload, BLOCK_EVENTS):
            anomaly = self.blocks.apply(payload, seq)
        elif isinstance(payload, RECALL_EVENTS):
            anomaly = self.recall.apply(payload, seq)
        elif isinstance(payload, FACT_EVENTS):
            anomaly = self.facts.apply(payload, seq)
        else:
            return False
        if anomaly is not None:
            self.anomalies.append(anomaly)
            self.anomaly_count += 1
        self.applied += 1
        if seq:
            self.last_seq = max(self.last_seq, seq)
        return True

    def stats(self, conversation: str = "main") -> MemoryStats:
        conv = self.recall.conversation(conversation)
        return MemoryStats(
            blocks=len(self.blocks),
            turns=len(conv.entries),
            turns_in_window=len(conv.entries) - conv.window_start,
            summaries=len(conv.summaries),
            facts=self.facts.stats(),
            anomalies=self.anomaly_count,
        )
