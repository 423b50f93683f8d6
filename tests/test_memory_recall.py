"""Recall memory: turn numbering, duplicates and gaps, the window, and search."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from agents.memory import AgentMemory
from schemas.payloads.llm import TextBlock, ToolResultBlock, ToolUseBlock
from schemas.payloads.memory import ConversationSummarised, TurnRecorded

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def _say(memory: AgentMemory, role: str, text: str = "", minute: int = 0, **kw) -> TurnRecorded:
    event = memory.recall.record(role, at=T0 + timedelta(minutes=minute), text=text, **kw)
    memory.apply(event)
    return event


def test_turns_are_numbered_and_duplicates_ignored() -> None:
    """record() numbers turns 1, 2, ...; a redelivered turn is ignored; a gap is applied and
    reported; another agent's turn is not this agent's recall."""
    memory = AgentMemory("alice")
    first = _say(memory, "user", "hello", sender="bob")
    second = _say(memory, "assistant", "hi bob")
    assert (first.turn, second.turn) == (1, 2)
    memory.apply(first)
    memory.apply(TurnRecorded(agent="alice", turn=5, role="user", at=T0, text="late"))
    memory.apply(TurnRecorded(agent="carol", turn=1, role="user", at=T0, text="not mine"))
    conv = memory.recall.conversation()
    assert [e.turn for e in conv.entries] == [1, 2, 5]
    assert [a.kind for a in memory.anomalies] == ["turn_gap"]


def test_content_turns_keep_exact_blocks_and_searchable_text() -> None:
    """A turn given content blocks keeps them exactly; its text names the tools and holds the
    results, so search finds it; a single plain text block is stored as text alone."""
    memory = AgentMemory("alice")
    use = ToolUseBlock(id="t1", name="archival_search", input={"query": "fec"})
    turn = memory.recall.record("assistant", at=T0, content=[TextBlock(text="Looking."), use])
    assert turn.content == [TextBlock(text="Looking."), use]
    assert "[called archival_search]" in turn.text
    plain = memory.recall.record("user", at=T0, content=[TextBlock(text="just text")])
    assert plain.text == "just text" and plain.content == []
    memory.apply(turn)
    result = ToolResultBlock(tool_use_id="t1", content="2 facts on sodium")
    memory.apply(memory.recall.record("user", at=T0, content=[result]))
    assert [t.turn for t in memory.recall.search("sodium")] == [2]
    with pytest.raises(ValueError):
        memory.recall.record("user", at=T0)
    with pytest.raises(ValueError):
        memory.recall.record("system", at=T0, text="x")


def test_summary_moves_the_window_but_keeps_turns_searchable() -> None:
    """A summary of turns 1-3 takes them out of the window; they stay searchable in recall."""
    memory = AgentMemory("alice")
    for i in range(6):
        _say(memory, "user" if i % 2 == 0 else "assistant", f"turn about topic{i}", minute=i)
    memory.apply(
        ConversationSummarised(
            agent="alice", summary_id="s1", first_turn=1, last_turn=3, summary="...", method="m", turns=3,
            tokens_evicted=30, at=T0,
        )
    )
    conv = memory.recall.conversation()
    assert [e.turn for e in conv.window()] == [4, 5, 6]
    assert [t.turn for t in memory.recall.search("topic1")] == [2]
    stats = memory.stats()
    assert (stats.turns, stats.turns_in_window, stats.summaries) == (6, 3, 1)


def test_search_filters_by_role_and_prefers_more_matches_then_newer() -> None:
    """Search ranks turns by matched words, then recency; role filters; empty query = newest."""
    memory = AgentMemory("alice")
    _say(memory, "user", "sodium electrolyte", minute=0)
    _say(memory, "assistant", "sodium", minute=1)
    _say(memory, "user", "sodium again", minute=2)
    assert [t.turn for t in memory.recall.search("sodium electrolyte")] == [1, 3, 2]
    assert [t.turn for t in memory.recall.search("sodium", role="assistant")] == [2]
    assert [t.turn for t in memory.recall.search("", limit=2)] == [3, 2]
