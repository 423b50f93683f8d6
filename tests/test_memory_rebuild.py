"""Memory rebuilt from the real log equals the memory that wrote it (a real nats-server)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import msgspec

from agents.llm import OfflineModel, call_model
from agents.memory import AgentMemory, ContextCompiler, ContextConfig, MemoryTools
from bus import Bus
from schemas.payloads.llm import LlmCallCompleted, TextBlock, ToolResultBlock, ToolUseBlock
from schemas.payloads.memory import Citation

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def _snapshot(memory: AgentMemory) -> dict[str, Any]:
    """Everything an agent would read from its memory, as plain data."""
    conv = memory.recall.conversation()
    facts = memory.facts.search(include_inactive=True, limit=10_000)
    return {
        "blocks": [msgspec.to_builtins(b) for b in memory.blocks.held()],
        "turns": [msgspec.to_builtins(e.event) for e in conv.entries],
        "window_start": conv.window_start,
        "summaries": [msgspec.to_builtins(s) for s in conv.summaries],
        "facts": sorted((s.fact_id, s.status, s.ended_by, s.ended_rule, tuple(s.contradictions)) for s in facts),
        "contradictions": sorted(
            (c.event.contradiction_id, c.resolved_by) for c in memory.facts.contradictions(open_only=False)
        ),
        "stats": msgspec.to_builtins(memory.stats()),
    }


async def _read_back(bus: Bus, seqs: list[int]) -> list[tuple[int, Any]]:
    out = []
    for seq in seqs:
        msg = await bus.js.get_msg(bus.subjects.stream, seq=seq)
        out.append((seq, bus.codec.decode(msg.data).payload))
    return out


async def test_memory_rebuilt_from_the_log_equals_live_memory(bus: Bus) -> None:
    """Every tier's events are recorded through the bus, read back from the stream and folded
    into a fresh AgentMemory: blocks, turns, window, summaries, facts and contradictions equal
    the live memory's."""
    live = AgentMemory("alice")
    seqs: list[int] = []

    async def keep(event: Any) -> None:
        seqs.append((await bus.record("alice", event)).ack.seq)
        live.apply(event)

    await keep(live.blocks.create("notes", limit=300, actor="alice", value="start"))
    await keep(live.blocks.append("notes", "read day 1", actor="alice"))
    await keep(live.blocks.replace("notes", "start", "begun", actor="alice"))
    await keep(live.recall.record("user", at=T0, text="read the papers", sender="lead"))
    use = ToolUseBlock(id="t1", name="archival_insert", input={"subject": "s"})
    await keep(live.recall.record("assistant", at=T0, content=[TextBlock(text="ok"), use]))
    await keep(live.recall.record("user", at=T0, content=[ToolResultBlock(tool_use_id="t1", content="recorded")]))
    a = live.facts.record(subject="fec:retention", statement="FEC helps.", source=Citation(ref="p01.f1"),
                          confidence=0.7, recorded_by="alice", value="increases")
    await keep(a)
    b = live.facts.record(subject="fec:retention", statement="FEC does nothing.", source=Citation(ref="p17.f1"),
                          confidence=0.8, recorded_by="alice", value="no-effect", valid_from=T0)
    await keep(b)
    flagged = live.facts.flag(a.fact_id, b.fact_id, rule="same-subject-different-effect", actor="alice")
    await keep(flagged)
    await keep(live.facts.supersede(a.fact_id, by=b.fact_id, rule="controlled-study", actor="lead",
                                    contradiction_id=flagged.contradiction_id))
    for i in range(30):
        await keep(live.recall.record("user" if i % 2 == 0 else "assistant", at=T0, text=f"turn {i} " + "x" * 400))
    compiled = ContextCompiler(
        ContextConfig(model="offline", agent="alice", role="reader", system_prompt="p", budget_tokens=5000)
    ).compile(live, tools=MemoryTools().specs(), now=T0)
    assert compiled.evictions
    for event in compiled.evictions:
        await keep(event)

    rebuilt = AgentMemory.rebuild("alice", await _read_back(bus, seqs))
    assert _snapshot(rebuilt) == _snapshot(live)
    assert rebuilt.last_seq == seqs[-1] and not rebuilt.anomalies


async def test_unfenced_concurrent_block_writers_are_caught_on_rebuild(bus: Bus, bus_config) -> None:
    """Two processes append to one shared block from the same version without fencing: both
    events reach the log, and the rebuilt memory keeps the first and reports the second as a
    stale write instead of losing an update silently."""
    created = AgentMemory("lead").blocks.create(
        "digest", limit=200, actor="lead", holders=["lead", "critic"], block_id="team/digest"
    )
    first_seq = (await bus.record("lead", created)).ack.seq
    writers = []
    for name in ("lead", "critic"):
        memory = AgentMemory(name)
        memory.apply(created)
        writers.append(memory.blocks.append("digest", f"note by {name}", actor=name))
    async with Bus(msgspec.structs.replace(bus_config, name="critic-process")) as other:
        s1 = (await bus.record("lead", writers[0])).ack.seq
        s2 = (await other.record("critic", writers[1])).ack.seq
    rebuilt = AgentMemory.rebuild("critic", await _read_back(bus, [first_seq, s1, s2]))
    assert rebuilt.blocks.get("digest").value == "note by lead"
    assert [(a.kind, a.seq) for a in rebuilt.anomalies] == [("stale_write", s2)]


async def test_llm_call_survives_the_log_byte_for_byte(bus: Bus) -> None:
    """An llm.call.completed event (full request and response) decodes from the stream equal to
    what was recorded, so the call can be audited and replayed."""
    memory = AgentMemory("alice")
    memory.apply(memory.recall.record("user", at=T0, text="hello"))
    request = ContextCompiler(ContextConfig(model="offline", agent="alice", role="x", system_prompt="p")).compile(
        memory, tools=MemoryTools().specs(), now=T0
    ).request
    call = await call_model(OfflineModel(), request, agent="alice", call_id="c1", step="llm:1")
    sent = await bus.record("alice", call)
    [(_, payload)] = await _read_back(bus, [sent.ack.seq])
    assert isinstance(payload, LlmCallCompleted)
    assert payload == call
    assert msgspec.json.encode(payload.request) == msgspec.json.encode(request)
