"""Core memory blocks: limits on every write path, versions that expose stale writers, sharing."""

from __future__ import annotations

import pytest

from agents.memory import (
    AgentMemory,
    BlockEditError,
    BlockExists,
    BlockLimitExceeded,
    BlockNotFound,
    BlockReadOnly,
)
from schemas.payloads.memory import (
    BlockAppended,
    BlockAttached,
    BlockCreated,
    BlockDetached,
    BlockReplaced,
    BlockSet,
)


def _memory(value: str = "likes tea", limit: int = 40) -> AgentMemory:
    memory = AgentMemory("alice")
    memory.apply(memory.blocks.create("persona", limit=limit, actor="alice", value=value))
    return memory


def test_writes_are_decided_as_events_with_the_next_version_and_full_value() -> None:
    """append/replace/rethink return events (version + 1, whole new value) and change nothing
    until applied."""
    memory = _memory()
    appended = memory.blocks.append("persona", "reads papers", actor="alice")
    assert isinstance(appended, BlockAppended)
    assert (appended.version, appended.value) == (2, "likes tea\nreads papers")
    assert memory.blocks.get("persona").value == "likes tea"
    memory.apply(appended)
    replaced = memory.blocks.replace("persona", "tea", "coffee", actor="alice")
    assert isinstance(replaced, BlockReplaced) and replaced.value == "likes coffee\nreads papers"
    memory.apply(replaced)
    rethought = memory.blocks.rethink("persona", "short", actor="bob", reason="condense")
    assert isinstance(rethought, BlockSet) and rethought.version == 4
    memory.apply(rethought)
    block = memory.blocks.get("persona")
    assert (block.value, block.version, block.updated_by) == ("short", 4, "bob")


@pytest.mark.parametrize(
    "write",
    [
        lambda m: m.blocks.append("persona", "x" * 40, actor="alice"),
        lambda m: m.blocks.replace("persona", "tea", "t" * 40, actor="alice"),
        lambda m: m.blocks.rethink("persona", "y" * 41, actor="alice"),
        lambda m: m.blocks.create("other", limit=5, actor="alice", value="too long"),
    ],
    ids=["append", "replace", "rethink", "create"],
)
def test_limit_is_enforced_on_every_write_path(write) -> None:
    """Every way of writing a block raises BlockLimitExceeded (with label, limit and size)
    before an event exists; the block is unchanged."""
    memory = _memory()
    with pytest.raises(BlockLimitExceeded) as info:
        write(memory)
    assert info.value.size > info.value.limit
    assert memory.blocks.get("persona").value == "likes tea"


def test_fold_refuses_an_over_limit_event() -> None:
    """An event whose value exceeds the limit (from a faulty writer) is not applied; the refusal
    is an anomaly, not a crash."""
    memory = _memory()
    memory.apply(BlockSet(block_id="alice/persona", value="z" * 41, version=2, actor="rogue"))
    assert memory.blocks.get("persona").value == "likes tea"
    assert [a.kind for a in memory.anomalies] == ["over_limit"]


def test_replace_needs_one_exact_occurrence() -> None:
    """Replacing empty, absent or repeated text is a BlockEditError saying what to do."""
    memory = _memory(value="a b a")
    with pytest.raises(BlockEditError, match="empty"):
        memory.blocks.replace("persona", "", "x", actor="alice")
    with pytest.raises(BlockEditError, match="does not occur"):
        memory.blocks.replace("persona", "zzz", "x", actor="alice")
    with pytest.raises(BlockEditError, match="occurs 2 times"):
        memory.blocks.replace("persona", "a", "x", actor="alice")


def test_unknown_label_and_read_only_blocks_are_refused() -> None:
    """Writes to a missing label list the labels there are; read-only blocks cannot be written."""
    memory = _memory()
    memory.apply(memory.blocks.create("rules", limit=100, actor="operator", value="be kind", read_only=True))
    with pytest.raises(BlockNotFound, match="persona, rules"):
        memory.blocks.append("nope", "x", actor="alice")
    with pytest.raises(BlockReadOnly):
        memory.blocks.rethink("rules", "be rude", actor="alice")
    with pytest.raises(BlockExists):
        memory.blocks.create("persona", limit=10, actor="alice")


def test_concurrent_writers_cannot_silently_lose_an_update() -> None:
    """Two writers decide from the same version; the first write applies, the second is a stale
    write: refused and reported, so the first writer's update is not overwritten."""
    memory = _memory()
    first = memory.blocks.append("persona", "from alice", actor="alice")
    second = memory.blocks.append("persona", "from bob", actor="bob")
    assert first.version == second.version == 2
    memory.apply(first)
    memory.apply(second)
    assert memory.blocks.get("persona").value == "likes tea\nfrom alice"
    assert [a.kind for a in memory.anomalies] == ["stale_write"]
    assert "bob" in memory.anomalies[0].detail


def test_redelivered_event_is_a_silent_duplicate() -> None:
    """Applying the same event twice changes nothing and reports nothing."""
    memory = _memory()
    event = memory.blocks.append("persona", "again", actor="alice")
    memory.apply(event)
    memory.apply(event)
    assert memory.blocks.get("persona").version == 2 and not memory.anomalies


def test_version_gap_is_applied_and_reported() -> None:
    """A write that skips versions (events missing) still applies, since it carries the whole
    value, and the gap is reported."""
    memory = _memory()
    memory.apply(BlockSet(block_id="alice/persona", value="later", version=5, actor="alice"))
    assert memory.blocks.get("persona").value == "later"
    assert [a.kind for a in memory.anomalies] == ["version_gap"]


def test_shared_block_is_held_by_every_holder() -> None:
    """A block created for several holders shows in each holder's memory; attach adds a holder,
    detach removes one, and a label clash on attach is refused."""
    lead, critic, reader = AgentMemory("lead"), AgentMemory("critic"), AgentMemory("reader")
    created = lead.blocks.create("digest", limit=100, actor="lead", holders=["lead", "critic"], block_id="team/digest")
    for memory in (lead, critic, reader):
        memory.apply(created)
    assert critic.blocks.get("digest").shared and len(reader.blocks) == 0
    write = critic.blocks.rethink("digest", "day 1: quiet", actor="critic")
    for memory in (lead, critic, reader):
        memory.apply(write)
    assert lead.blocks.get("digest").value == "day 1: quiet"
    attach = lead.blocks.attach("team/digest", "reader", actor="lead")
    assert isinstance(attach, BlockAttached)
    reader.apply(attach)
    assert reader.blocks.get("digest").value == "day 1: quiet"
    reader.apply(BlockDetached(block_id="team/digest", agent="reader", actor="lead"))
    with pytest.raises(BlockNotFound):
        reader.blocks.get("digest")
    other = AgentMemory("critic")
    other.apply(other.blocks.create("digest", limit=10, actor="critic"))
    other.apply(BlockCreated(block_id="lead/digest", label="digest", limit=10, actor="lead", holders=["lead"]))
    other.apply(BlockAttached(block_id="lead/digest", agent="critic", actor="lead"))
    assert other.blocks.get("digest").block_id == "critic/digest"
    assert [a.kind for a in other.anomalies] == ["label_taken"]
