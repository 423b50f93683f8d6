"""The offline model: deterministic, Messages-API shaped, and able to run the research team.

The team is driven in-process here (compile → model → tools → record → apply), the loop the agent
runtime will run inside steps; every event goes through one list that stands in for the log.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from agents.llm import BadModelRequest, OfflineModel, ReplayMismatch, ReplayModel, call_model
from agents.llm.model import Model
from agents.llm.validate import request_problems
from agents.memory import AgentMemory, ContextCompiler, ContextConfig, MemoryTools, ToolContext
from agents.research.corpus import load_corpus, render_papers
from schemas.payloads.llm import LlmCallCompleted, Message, ModelRequest, TextBlock, ToolUseBlock
from schemas.payloads.memory import (
    ContradictionFlagged,
    ConversationSummarised,
    FactRecorded,
    FactRetracted,
    FactSuperseded,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
FACT_EVENTS = (FactRecorded, FactSuperseded, FactRetracted, ContradictionFlagged)

READER_TOOLS = MemoryTools(["archival_insert", "archival_search", "core_memory_append"])
CRITIC_TOOLS = MemoryTools(["archival_search", "flag_contradiction", "send_message"])
LEAD_TOOLS = MemoryTools(["core_memory_rethink", "broadcast"])


class Team:
    """Three agents sharing one event list; facts are seen by all, blocks by their holders."""

    def __init__(self, model: Model, *, budget_tokens: int = 12_000) -> None:
        self.model = model
        self.log: list[tuple[str, Any]] = []
        self.memory = {name: AgentMemory(name) for name in ("reader", "critic", "lead")}
        self.prompts = {
            "reader": "You read papers and record each key finding as a fact.",
            "critic": "You check new findings against what the team knows.\nReport to: lead",
            "lead": "You keep the team digest.\nTeam tag: team",
        }
        self.budget = budget_tokens
        self.record("reader", self.memory["reader"].blocks.create("notes", limit=2000, actor="reader"))
        self.record(
            "lead",
            self.memory["lead"].blocks.create(
                "digest", limit=1500, actor="lead", holders=["lead", "critic"], block_id="team/digest"
            ),
        )

    def record(self, agent: str, event: Any) -> None:
        self.log.append((agent, event))
        for name, memory in self.memory.items():
            if name == agent or isinstance(event, FACT_EVENTS) or hasattr(event, "block_id"):
                memory.apply(event)

    async def turn(self, agent: str, tools: MemoryTools, text: str, *, sender: str, now: datetime) -> tuple[str, list]:
        """One inbound message handled to the end of the tool loop: (final text, outbound)."""
        memory = self.memory[agent]
        compiler = ContextCompiler(
            ContextConfig(model="claude-sonnet-5-5", agent=agent, role=agent, system_prompt=self.prompts[agent],
                          budget_tokens=self.budget)
        )
        self.record(agent, memory.recall.record("user", at=now, text=text, sender=sender))
        outbound: list = []
        for step in range(12):
            compiled = compiler.compile(memory, tools=tools.specs(), now=now)
            for event in compiled.evictions:
                self.record(agent, event)
            assert request_problems(compiled.request) == []
            call = await call_model(self.model, compiled.request, agent=agent, call_id=f"{agent}-{now:%d}-{step}")
            self.record(agent, call)
            response = call.response
            self.record(agent, memory.recall.record_message(response.as_message(), at=now))
            if not response.tool_uses:
                return response.text, outbound
            results = []
            for use in response.tool_uses:
                outcome = tools.execute(use, memory, ToolContext(agent=agent, now=now))
                for event in outcome.events:
                    self.record(agent, event)
                outbound += outcome.messages
                results.append(outcome.result)
            self.record(agent, memory.recall.record("user", at=now, content=results))
        raise AssertionError(f"{agent} did not finish its tool loop")

    async def day(self, day: int) -> dict[str, Any]:
        now = T0 + timedelta(days=day - 1)
        papers = render_papers(load_corpus().day(day))
        reader_text, _ = await self.turn(
            "reader", READER_TOOLS, "Read today's papers and record their findings.\n\n" + papers,
            sender="coordinator", now=now,
        )
        critic_text, sent = await self.turn(
            "critic", CRITIC_TOOLS, "Check today's findings for contradictions.\n\n" + papers,
            sender="coordinator", now=now,
        )
        lead_out: list = []
        for message in sent:
            assert message.to == "lead"
            _, out = await self.turn("lead", LEAD_TOOLS, message.payload.text, sender="critic", now=now)
            lead_out += out
        return {"reader": reader_text, "critic": critic_text, "sent": sent, "lead_out": lead_out}

    def events(self, agent: str | None = None, kind: type | None = None) -> list[Any]:
        return [e for a, e in self.log if (agent is None or a == agent) and (kind is None or isinstance(e, kind))]


def _request(text: str, *, role: str = "reader", tools: MemoryTools = READER_TOOLS) -> ModelRequest:
    return ModelRequest(
        model="claude-sonnet-5-5",
        max_tokens=1024,
        system=[TextBlock(text=f"Agent: a1\nRole: {role}\n\nYou read papers.")],
        tools=tools.specs(),
        messages=[Message(role="user", content=[TextBlock(text=text)])],
    )


async def test_same_request_gives_the_same_response() -> None:
    """Two models answer one request with byte-identical responses, ids included."""
    request = _request(render_papers(load_corpus().day(1)[:3]))
    first = await OfflineModel().complete(request)
    second = await OfflineModel().complete(msgspec.json.decode(msgspec.json.encode(request), type=ModelRequest))
    assert msgspec.json.encode(first) == msgspec.json.encode(second)
    other = await OfflineModel().complete(_request(render_papers(load_corpus().day(1)[3:5])))
    assert other.id != first.id


async def test_answers_in_the_messages_api_shape() -> None:
    """A reader given papers answers with text plus one tool_use per finding, unique ids,
    stop_reason tool_use and non-zero usage; its model is "offline" and costs nothing."""
    papers = load_corpus().day(1)[:4]
    call = await call_model(OfflineModel(), _request(render_papers(papers)), agent="a1", call_id="c")
    response = call.response
    uses = response.tool_uses
    assert response.stop_reason == "tool_use" and response.text.startswith("Recording")
    assert [u.input["source"] for u in uses] == [f.id for p in papers for f in p.findings]
    assert {u.name for u in uses} == {"archival_insert"}
    assert len({u.id for u in uses}) == len(uses)
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert call.model == "offline" and call.cost_usd == 0.0


async def test_tools_not_offered_are_never_called() -> None:
    """Without archival_insert on offer the reader answers in text only (end_turn)."""
    response = await OfflineModel().complete(
        _request(render_papers(load_corpus().day(1)[:2]), tools=MemoryTools(["conversation_search"]))
    )
    assert response.tool_uses == [] and response.stop_reason == "end_turn"


async def test_unknown_role_is_acknowledged() -> None:
    """A role no policy knows gets a one-line acknowledgement naming the task."""
    response = await OfflineModel().complete(_request("Water the plants.", role="gardener"))
    assert response.stop_reason == "end_turn"
    assert response.text == "Noted (gardener): Water the plants."


async def test_malformed_conversation_is_refused_as_claude_would() -> None:
    """An orphaned tool_use (no result in the next message) is a BadModelRequest offline too."""
    request = ModelRequest(
        model="m",
        max_tokens=10,
        tools=READER_TOOLS.specs(),
        messages=[
            Message(role="user", content=[TextBlock(text="go")]),
            Message(role="assistant", content=[ToolUseBlock(id="t1", name="archival_search", input={})]),
            Message(role="user", content=[TextBlock(text="and?")]),
        ],
    )
    with pytest.raises(BadModelRequest, match="t1 not answered"):
        await OfflineModel().complete(request)


async def test_research_team_finds_exactly_the_corpus_contradictions() -> None:
    """Over three days the offline team records every finding once, flags exactly the
    contradictions the corpus declares (both claims kept, nothing deleted), reports the
    refinements, and the lead's digest (a block shared with the critic) holds the last review."""
    corpus = load_corpus()
    team = Team(OfflineModel())
    results = [await team.day(day) for day in (1, 2, 3)]

    facts = team.events(kind=FactRecorded)
    assert sorted(f.source.ref for f in facts) == sorted(corpus.findings)
    flagged = team.events(kind=ContradictionFlagged)
    declared = {frozenset(pair) for pair in corpus.contradictions()}
    by_id = {f.fact_id: f.source.ref for f in facts}
    assert {frozenset((by_id[c.claim_a.fact_id], by_id[c.claim_b.fact_id])) for c in flagged} == declared
    assert len(flagged) == len(declared)
    assert all(c.claim_a.value != c.claim_b.value and c.actor == "critic" for c in flagged)
    assert team.events(kind=FactSuperseded) == [] and team.events(kind=FactRetracted) == []

    assert "0 contradictions" in results[0]["critic"]
    assert "4 contradictions" in results[1]["critic"] and "4 contradictions" in results[2]["critic"]
    for later, earlier in corpus.refinements():
        assert f"refinement of {corpus.findings[earlier].subject.split('@')[0]}: {later}" in (
            results[1]["critic"] + results[2]["critic"]
        )
    digest = team.memory["critic"].blocks.get("digest")
    assert digest.value.startswith("Latest review: Review of p28–p40") and digest.updated_by == "lead"
    assert [m.tag for r in results for m in r["lead_out"]] == ["team", "team", "team"]
    assert "15 new findings" in team.memory["reader"].blocks.get("notes").value
    assert all(not m.anomalies for m in team.memory.values())


async def test_small_budget_evicts_and_every_request_stays_valid() -> None:
    """With a budget that forces eviction, reader and critic windows are summarised (events
    recorded), every request satisfies the Messages API rules (checked in Team.turn), no task is
    clipped, and the team still finds every contradiction."""
    team = Team(OfflineModel(), budget_tokens=10_000)
    for day in (1, 2, 3):
        await team.day(day)
    for agent in ("reader", "critic"):
        assert team.events(agent, kind=ConversationSummarised), f"{agent} should have evicted turns"
    requests = [c.request for c in team.events(kind=LlmCallCompleted)]
    assert not any("clipped to" in msgspec.json.encode(r).decode() for r in requests)
    assert len(team.events(kind=ContradictionFlagged)) == len(load_corpus().contradictions())


async def test_replay_reproduces_recorded_decisions_and_detects_divergence() -> None:
    """Replaying a day with the recorded responses (ReplayModel) yields the same events as the
    original run without calling any model; a changed input is a ReplayMismatch."""
    original = Team(OfflineModel())
    await original.day(1)
    calls = original.events(kind=LlmCallCompleted)

    replay = Team(ReplayModel(calls))
    await replay.day(1)
    strip = lambda events: [msgspec.json.encode(e) for e in events if not isinstance(e, LlmCallCompleted)]  # noqa: E731
    assert strip(replay.events()) == strip(original.events())
    assert replay.model.remaining == 0

    diverged = Team(ReplayModel(calls))
    with pytest.raises(ReplayMismatch):
        await diverged.turn("reader", READER_TOOLS, "Something else entirely.", sender="coordinator", now=T0)
