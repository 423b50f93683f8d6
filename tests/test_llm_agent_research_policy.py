"""The offline research roles beyond the happy path: the reviewer flags a claim that does not
match its cited source, and the writer applies the correction (the loop the agents run, in
process, over memory folded from decided events)."""

from __future__ import annotations

from datetime import UTC, datetime

from agents.llm import OfflineModel
from agents.llm.offline.research import claim_line, parse_claims, parse_corrections
from agents.memory import (
    AgentMemory,
    ContextCompiler,
    ContextConfig,
    MemoryTools,
    ToolContext,
)
from schemas.payloads.memory import Citation

NOW = datetime(2026, 3, 3, 9, 0, tzinfo=UTC)


async def run_turn(memory: AgentMemory, role: str, tools: MemoryTools, text: str) -> str:
    compiler = ContextCompiler(ContextConfig(model="offline", agent=memory.agent, role=role, system_prompt=""))
    memory.apply(memory.recall.record("user", at=NOW, text=text))
    model = OfflineModel()
    for _ in range(8):
        response = await model.complete(compiler.compile(memory, tools=tools.specs(), now=NOW).request)
        memory.apply(memory.recall.record_message(response.as_message(), at=NOW))
        if not response.tool_uses:
            return response.text
        results = []
        for use in response.tool_uses:
            outcome = tools.execute(use, memory, ToolContext(agent=memory.agent, now=NOW))
            for event in outcome.events:
                memory.apply(event)
            results.append(outcome.result)
        memory.apply(memory.recall.record("user", at=NOW, content=results))
    raise AssertionError("the tool loop did not end")


async def test_reviewer_corrects_a_claim_and_writer_applies_it() -> None:
    """A claim whose effect and statement differ from the cited fact gets one correction line
    with the source's subject, effect and statement; a correct claim gets none; a claim citing an
    unknown source is reported unsupported. The writer's revision replaces exactly the corrected
    claim."""
    reviewer = AgentMemory("reviewer")
    for ref, value, statement in (("p01.f1", "increases", "FEC raised retention."),
                                  ("p02.f1", "decreases", "NaF lowered impedance.")):
        reviewer.apply(reviewer.facts.record(
            subject=f"s{ref[2]}:x", statement=statement, source=Citation(ref=ref), confidence=0.7,
            recorded_by="researcher", value=value,
        ))
    report = "\n".join([
        "Report for day 1: 3 new findings",
        claim_line("s1:x", "decreases", "FEC lowered retention.", "p01.f1"),
        claim_line("s2:x", "decreases", "NaF lowered impedance.", "p02.f1"),
        claim_line("s9:x", "increases", "Unfounded.", "p99.f1"),
    ])
    review = await run_turn(reviewer, "reviewer", MemoryTools(["archival_search"]), f"Review.\n\n{report}")
    assert review.startswith("Review: 3 claims checked") and "2 need correcting" in review
    (fix,) = parse_corrections(review)
    assert fix == {"ref": "p01.f1", "subject": "s1:x", "effect": "increases", "statement": "FEC raised retention."}
    assert "- unsupported [p99.f1]" in review

    writer = AgentMemory("writer")
    revised = await run_turn(writer, "writer", MemoryTools(["core_memory_append"]),
                             f"Revise the report of day 1.\n\nReport:\n{report}\n\nCorrections:\n{review}")
    claims = {c["ref"]: c for c in parse_claims(revised)}
    assert claims["p01.f1"]["effect"] == "increases" and claims["p01.f1"]["statement"] == "FEC raised retention."
    assert claims["p02.f1"]["statement"] == "NaF lowered impedance." and "p99.f1" in claims
