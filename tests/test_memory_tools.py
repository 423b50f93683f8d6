"""Memory tools: schemas the model can use, pure executors that return events, and errors the
model can act on instead of exceptions."""

from __future__ import annotations

from datetime import datetime, timezone

import msgspec
import pytest

from agents.memory import TOOLS, AgentMemory, MemoryTools, ToolContext, ToolOutcome, apply_outcome
from schemas.payloads.llm import ToolUseBlock
from schemas.payloads.memory import BlockAppended, ContradictionFlagged, FactRecorded, FactSuperseded

NOW = datetime(2026, 3, 3, 9, 0, tzinfo=timezone.utc)
CTX = ToolContext(agent="critic", now=NOW)


def _call(name: str, **input_) -> ToolUseBlock:
    return ToolUseBlock(id=f"toolu_{name}", name=name, input=input_)


def _memory() -> AgentMemory:
    memory = AgentMemory("critic")
    memory.apply(memory.blocks.create("notes", limit=60, actor="critic", value="start"))
    return memory


def _run(memory: AgentMemory, name: str, **input_) -> ToolOutcome:
    outcome = MemoryTools().execute(_call(name, **input_), memory, CTX)
    apply_outcome(memory, outcome)
    return outcome


def test_at_most_twelve_tools_each_with_an_inline_object_schema() -> None:
    """There are at most 12 tools; each schema is a self-contained JSON object schema (no $ref)
    that rejects unknown properties and names its required fields."""
    specs = MemoryTools().specs()
    assert 8 <= len(specs) <= 12 and len(TOOLS) == len(specs)
    for spec in specs:
        schema = spec.input_schema
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert "$ref" not in msgspec.json.encode(schema).decode()
        assert spec.description and set(schema.get("required", [])) <= set(schema["properties"])
    required = {s.name: s.input_schema.get("required") for s in specs}
    assert required["archival_insert"] == ["subject", "statement", "source"]
    assert MemoryTools(["send_message"]).names == ["send_message"]
    with pytest.raises(ValueError, match="unknown memory tools"):
        MemoryTools(["delete_everything"])


def test_executors_are_pure_and_return_events_to_record() -> None:
    """Executing a call changes no memory; the outcome holds the event, and applying it makes
    the change. The result names the new block size."""
    memory = _memory()
    outcome = MemoryTools().execute(_call("core_memory_append", label="notes", text="day 1 done"), memory, CTX)
    assert memory.blocks.get("notes").value == "start"
    assert isinstance(outcome.events[0], BlockAppended) and outcome.events[0].actor == "critic"
    assert "16/60" in outcome.result.content and not outcome.result.is_error
    apply_outcome(memory, outcome)
    assert memory.blocks.get("notes").value == "start\nday 1 done"


@pytest.mark.parametrize(
    ("name", "input_", "message"),
    [
        ("core_memory_append", {"label": "notes"}, "invalid input"),
        ("core_memory_append", {"label": "notes", "text": "x", "extra": 1}, "invalid input"),
        ("core_memory_append", {"label": "notes", "text": "x" * 80}, "limit is 60"),
        ("core_memory_replace", {"label": "notes", "old": "absent", "new": "x"}, "does not occur"),
        ("core_memory_rethink", {"label": "missing", "value": "x"}, "no core memory block"),
        ("archival_search", {"limit": 500}, "invalid input"),
        ("send_message", {"to": "two words", "text": "hi"}, "invalid agent name"),
        ("flag_contradiction", {"fact_a": "f1", "fact_b": "f2", "rule": "r"}, "no fact"),
        ("not_a_tool", {}, "unknown tool"),
    ],
)
def test_misuse_is_an_error_result_with_no_events(name: str, input_: dict, message: str) -> None:
    """Bad input, an unknown label or tool, a limit overrun: the outcome is an is_error result
    explaining the problem, nothing to record, and no exception."""
    outcome = MemoryTools().execute(_call(name, **input_), _memory(), CTX)
    assert outcome.result.is_error and message in outcome.result.content
    assert outcome.result.tool_use_id == f"toolu_{name}"
    assert outcome.events == [] and outcome.messages == []


def test_archival_insert_is_idempotent_and_hints_at_conflicts() -> None:
    """Inserting the same fact twice records it once (the second says so, without events); a
    fact on the same subject with another value is listed in the result for the model."""
    memory = _memory()
    helps = dict(subject="fec:retention", statement="FEC helps.", source="p01.f1", value="increases")
    first = _run(memory, "archival_insert", **helps)
    assert isinstance(first.events[0], FactRecorded)
    again = _run(memory, "archival_insert", **helps)
    assert again.events == [] and again.result.content.startswith("already recorded as")
    other = _run(
        memory, "archival_insert", subject="fec:retention", statement="No effect.", source="p17.f1", value="no-effect"
    )
    assert "different value" in other.result.content and first.events[0].fact_id in other.result.content
    assert len(memory.facts) == 2


def test_contradiction_tools_keep_history() -> None:
    """flag_contradiction, supersede_fact and retract_fact record events; the facts remain
    searchable with include_inactive and carry their status."""
    memory = _memory()
    a = _run(memory, "archival_insert", subject="s", statement="A.", source="r1", value="up").events[0]
    b = _run(memory, "archival_insert", subject="s", statement="B.", source="r2", value="down").events[0]
    pair = dict(fact_a=a.fact_id, fact_b=b.fact_id, rule="same-subject-different-effect")
    flagged = _run(memory, "flag_contradiction", **pair)
    assert isinstance(flagged.events[0], ContradictionFlagged)
    cid = flagged.events[0].contradiction_id
    repeat = _run(memory, "flag_contradiction", **pair)
    assert repeat.events == [] and cid in repeat.result.content
    superseded = _run(memory, "supersede_fact", fact_id=a.fact_id, by=b.fact_id, rule="newer", contradiction_id=cid)
    assert isinstance(superseded.events[0], FactSuperseded)
    found = _run(memory, "archival_search", subject="s", include_inactive=True).result.content
    assert f"status=superseded by {b.fact_id}" in found
    assert memory.facts.stats().open_contradictions == 0
    retracted = _run(memory, "retract_fact", fact_id=b.fact_id, rule="erratum", reason="withdrawn by authors")
    assert retracted.events and "stays in history" in retracted.result.content


def test_messages_are_returned_for_the_runtime_to_send() -> None:
    """send_message and broadcast record nothing themselves; they return the outbound note."""
    memory = _memory()
    direct = _run(memory, "send_message", to="lead", text="review done")
    group = _run(memory, "broadcast", tag="team", text="digest updated")
    assert direct.events == [] and direct.messages[0].to == "lead" and direct.messages[0].payload.text == "review done"
    assert group.messages[0].tag == "team" and group.messages[0].to is None


def test_conversation_search_finds_earlier_turns() -> None:
    """conversation_search lists matching turns with number, role and sender."""
    memory = _memory()
    memory.apply(memory.recall.record("user", at=NOW, text="please check the sodium papers", sender="lead"))
    result = _run(memory, "conversation_search", query="sodium").result.content
    assert result.startswith("1 turns:") and "[turn 1 | user from lead |" in result


def test_two_edits_in_one_answer_must_be_applied_in_between() -> None:
    """Executed against the same state, two appends claim the same version and the fold keeps
    only the first; applied in between (as the runtime must), both land."""
    tools, memory = MemoryTools(), _memory()
    one = tools.execute(_call("core_memory_append", label="notes", text="a"), memory, CTX)
    two = tools.execute(_call("core_memory_append", label="notes", text="b"), memory, CTX)
    apply_outcome(memory, one)
    apply_outcome(memory, two)
    assert memory.blocks.get("notes").value == "start\na" and memory.anomalies[0].kind == "stale_write"

    memory = _memory()
    apply_outcome(memory, tools.execute(_call("core_memory_append", label="notes", text="a"), memory, CTX))
    apply_outcome(memory, tools.execute(_call("core_memory_append", label="notes", text="b"), memory, CTX))
    assert memory.blocks.get("notes").value == "start\na\nb" and not memory.anomalies


def test_outcome_round_trips_as_a_step_result() -> None:
    """A ToolOutcome encodes and decodes with msgspec unchanged (events keep their types)."""
    memory = _memory()
    outcome = MemoryTools().execute(
        _call("archival_insert", subject="s", statement="A.", source="r1", valid_from="2026-03-01T00:00:00Z"),
        memory,
        CTX,
    )
    decoded = msgspec.json.decode(msgspec.json.encode(outcome), type=ToolOutcome)
    assert decoded == outcome and isinstance(decoded.events[0], FactRecorded)
    assert decoded.events[0].valid_from == datetime(2026, 3, 1, tzinfo=timezone.utc)
