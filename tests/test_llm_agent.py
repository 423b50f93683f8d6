"""LLMAgent on a real server: the tool loop as recorded steps, memory rebuilt from the log,
shared core blocks pushed to every holder and fenced against lost updates, the size limit on every
write path, and the Claude request path over a faked HTTP transport."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import msgspec
import pytest
from conftest import wait_for
from fixtures_agents.helpers import delivery, payloads

from agents.llm import AnthropicModel, AnthropicSettings, OfflineModel
from agents.llm.offline import Decision, RequestView, ToolCall
from agents.llm_agent import BlockSpec, LLMAgent, choose_model
from agents.memory.errors import BlockLimitExceeded
from agents.runtime import AgentRuntime, Context
from bus import Bus, BusConfig, ConcurrencyConflict
from schemas import Envelope, new_id
from schemas.payloads import LlmCallCompleted, Note, StepRecorded
from schemas.payloads.memory import BlockAppended, BlockSet, FactRecorded, TurnRecorded

SHARED = BlockSpec(label="shared", limit=4000, block_id="team/shared", holders=("alpha", "beta"))


class AppendPolicy:
    """Appends the task's word to the "shared" block once, then ends its turn."""

    def decide(self, view: RequestView) -> Decision | None:
        word = re.sub(r"^\[from [\w-]+\] ", "", view.task_text).strip()
        if word.startswith("append ") and "core_memory_append" not in view.names_called:
            return Decision(calls=[ToolCall("core_memory_append", {"label": "shared", "text": word[7:]})])
        if word.startswith("fact "):
            if "archival_insert" not in view.names_called:
                return Decision(calls=[ToolCall("archival_insert", {
                    "subject": "x:y", "statement": word, "source": word.replace(" ", "-"), "value": "increases"})])
            return Decision(text="recorded")
        return Decision(text="done")


class CountingModel(OfflineModel):
    def __init__(self) -> None:
        super().__init__([AppendPolicy()])
        self.calls = 0

    async def complete(self, request: Any) -> Any:
        self.calls += 1
        return await super().complete(request)


class Holder(LLMAgent):
    role = "holder"
    tool_names = ("core_memory_append", "archival_insert")
    core_blocks = (SHARED,)


class Solo(Holder):
    core_blocks = (BlockSpec(label="shared", limit=4000),)


def holder(model: Any = None, cls: type[Holder] = Holder) -> Holder:
    return cls(model=model or OfflineModel([AppendPolicy()]), model_name="offline")


@asynccontextmanager
async def running(agent: LLMAgent, config: BusConfig, name: str) -> AsyncIterator[AgentRuntime]:
    runtime = AgentRuntime(agent, config, name=name)
    stop, ready = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(runtime.run(stop, on_ready=ready.set))
        await asyncio.wait_for(ready.wait(), 10)
        try:
            yield runtime
        finally:
            stop.set()


async def started(bus: Bus, agent: LLMAgent) -> LLMAgent:
    await agent.on_start(bus)
    return agent


def ctx_for(bus: Bus, envelope: Envelope[Any], attempt: int) -> Context:
    return Context(bus=bus, agent=bus.config.name, envelope=envelope, delivery=delivery(attempt))


async def test_a_redelivered_message_replays_every_step_without_calling_the_model(bus: Bus) -> None:
    """The first attempt calls the model twice (tool use, then end) and records the calls, the
    turns and the fact; a second attempt of the same message gets the same result from the
    recorded steps: no model call, no new event."""
    model = CountingModel()
    agent = await started(bus, Holder(model=model, model_name="offline"))
    envelope = bus.envelope(Note(text="fact alpha one"), to="tester", sender="tester")
    first = await agent.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
    assert model.calls == 2 and first.text == "recorded" and first.rounds == 2
    assert [type(e) for e in first.events] == [FactRecorded]
    before = await bus.last_seq()
    again = await agent.converse(ctx_for(bus, envelope, 2), envelope.payload.text)
    assert model.calls == 2 and again == first
    assert await bus.last_seq() == before
    calls = await payloads(bus, "default.event.tester.llm.>", LlmCallCompleted)
    assert len(calls) == 2 and len({c.request_sha256 for c in calls}) == 2
    assert calls[0].response.stop_reason == "tool_use" and calls[1].request.messages[-1].role == "user"
    turns = await payloads(bus, "default.event.tester.memory.turn.>", TurnRecorded)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]


async def test_memory_is_rebuilt_from_the_log_on_start(bus: Bus) -> None:
    """A new instance (a restarted process) folds the same memory from the log alone."""
    first = await started(bus, holder(cls=Solo))
    envelope = bus.envelope(Note(text="append hello"), to="tester", sender="tester")
    await first.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
    second = await started(bus, holder(cls=Solo))
    assert second.memory.blocks.get("shared").value == first.memory.blocks.get("shared").value == "hello"
    assert second.memory.recall.total_turns == first.memory.recall.total_turns == 4
    assert not second.memory.anomalies


async def test_a_stale_block_writer_is_refused_and_retries_on_the_fresh_value(bus_config: BusConfig) -> None:
    """Two holders decide a write against the same version: the server refuses the second
    (ConcurrencyConflict, nothing stored); after catching up it decides again, under the same
    id, and both lines are kept."""
    async with Bus(msgspec.structs.replace(bus_config, name="alpha")) as a_bus, \
            Bus(msgspec.structs.replace(bus_config, name="beta")) as b_bus:
        alpha, beta = await started(a_bus, holder()), await started(b_bus, holder())
        a_write = alpha.memory.blocks.append("shared", "from alpha", actor="alpha")
        b_write = beta.memory.blocks.append("shared", "from beta", actor="beta")
        assert a_write.version == b_write.version == 2
        await alpha.log.record(a_write, id=new_id())
        b_id = new_id()
        with pytest.raises(ConcurrencyConflict):
            await beta.log.record(b_write, id=b_id)
        await beta.log.catch_up()
        # The retry keeps the refused write's id: a refused append was not stored, so it is no
        # duplicate (a step re-run after a crash relies on exactly that).
        retry = beta.memory.blocks.append("shared", "from beta", actor="beta")
        assert await beta.log.record(retry, id=b_id) == retry and retry.version == 3
        await alpha.log.catch_up()
        assert alpha.memory.blocks.get("shared").value == "from alpha\nfrom beta"
        assert beta.memory.blocks.get("shared").value == "from alpha\nfrom beta"
        assert not alpha.memory.anomalies and not beta.memory.anomalies


async def test_concurrent_writers_of_a_shared_block_lose_nothing_and_holders_see_it_at_once(
    bus_config: BusConfig, bus: Bus
) -> None:
    """Two agents append to one shared block concurrently, 12 words each, through their tool
    loops: the block ends with all 24 words (version 25), every write fenced; each write is
    pushed to the other holder, whose memory shows it without handling any task."""
    alpha, beta = holder(), holder()
    async with running(alpha, bus_config, "alpha"), running(beta, bus_config, "beta"):
        words = [f"{who}{i}" for i in range(12) for who in ("a", "b")]
        await asyncio.gather(*(bus.send("alpha" if w[0] == "a" else "beta", Note(text=f"append {w}")) for w in words))

        def complete(agent: LLMAgent) -> bool:
            value = agent.memory.blocks.get("shared").value
            return sorted(value.splitlines()) == sorted(words)

        await wait_for(lambda: complete(alpha) and complete(beta), timeout_s=30, what="both holders to see 24 words")
    writes = await payloads(bus, "default.event.*.memory.block.>", BlockAppended)
    assert sorted(w.version for w in writes) == list(range(2, 26))
    assert not alpha.memory.anomalies and not beta.memory.anomalies


async def test_the_block_size_limit_holds_on_every_write_path(bus: Bus) -> None:
    """Over the limit: the tool answers with an error and records nothing; a direct record of a
    decided event is refused before it reaches the log."""
    agent = await started(bus, holder(cls=Solo))
    before = await bus.last_seq()
    block = agent.memory.blocks.get("shared")
    with pytest.raises(BlockLimitExceeded):
        await agent.log.record(
            BlockSet(block_id=block.block_id, value="x" * (block.limit + 1), version=block.version + 1, actor="tester"),
            id=new_id(),
        )
    assert await bus.last_seq() == before
    envelope = bus.envelope(Note(text="append " + "y" * 4001), to="tester", sender="tester")
    await agent.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
    steps = await payloads(bus, "default.event.tester.step.>", StepRecorded)
    tool = next(s for s in steps if s.name.startswith("tool:"))
    result = msgspec.json.decode(bytes(tool.result))["result"]
    assert result["is_error"] and "limit is 4000" in result["content"]
    assert agent.memory.blocks.get("shared").value == ""


def test_the_environment_chooses_claude_or_the_offline_model() -> None:
    """No key: offline. A key: Claude, with the model named by CONTINUUM_MODEL."""
    assert choose_model({}).provider == "offline"
    choice = choose_model({"ANTHROPIC_API_KEY": "k", "CONTINUUM_MODEL": "claude-haiku-5-5"})
    assert choice.provider == "anthropic" and choice.model == "claude-haiku-5-5"
    assert choice.anthropic is not None and choice.anthropic.api_key == "k"


async def test_on_claude_the_tool_loop_posts_the_compiled_context_and_records_each_call(bus: Bus) -> None:
    """Through the real Anthropic SDK over a faked HTTP transport: the first request carries the
    role, the core blocks and the tools; Claude's tool_use is executed and answered with a
    tool_result in the second request; both calls are recorded with provider anthropic."""
    bodies: list[dict] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if len(bodies) == 1:
            content = [{"type": "tool_use", "id": "toolu_1", "name": "core_memory_append",
                        "input": {"label": "shared", "text": "from claude"}}]
            stop = "tool_use"
        else:
            content, stop = [{"type": "text", "text": "appended"}], "end_turn"
        return httpx2.Response(200, json={
            "id": f"msg_{len(bodies)}", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 100, "output_tokens": 10},
        })

    model = AnthropicModel(
        AnthropicSettings(api_key="test-key", max_retries=0),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    agent = await started(bus, Solo(model=model, model_name="claude-sonnet-5-5"))
    envelope = bus.envelope(Note(text="please append"), to="tester", sender="tester")
    result = await agent.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
    await agent.on_stop()
    assert result.text == "appended" and agent.memory.blocks.get("shared").value == "from claude"
    first, second = bodies
    assert first["model"] == "claude-sonnet-5-5"
    assert "Role: holder" in first["system"][0]["text"] and 'label="shared"' in first["system"][1]["text"]
    assert {t["name"] for t in first["tools"]} == {"core_memory_append", "archival_insert"}
    assert second["messages"][-1]["content"][0]["type"] == "tool_result"
    assert second["messages"][-1]["content"][0]["tool_use_id"] == "toolu_1"
    calls = await payloads(bus, "default.event.tester.llm.>", LlmCallCompleted)
    assert [c.provider for c in calls] == ["anthropic", "anthropic"] and calls[0].cost_usd is not None


class Died(Exception):
    """Stands for the process dying at a precise point."""


async def test_a_retry_after_dying_between_the_model_answer_and_the_step_record_asks_no_model(bus: Bus) -> None:
    """The process dies after the model answered and the call and assistant turn were stored,
    before the step's record: the redelivery adopts the stored call instead of asking again (a
    fresh compile would even end on the assistant turn, which the API refuses), keeps one turn per
    call, and ends like an uninterrupted run."""
    model = CountingModel()
    first = await started(bus, holder(model, cls=Solo))
    record = first.log.record

    async def dying_record(event: Any, **kwargs: Any) -> Any:
        stored = await record(event, **kwargs)
        if isinstance(event, TurnRecorded) and event.role == "assistant":
            raise Died
        return stored

    first.log.record = dying_record  # type: ignore[method-assign]
    envelope = bus.envelope(Note(text="fact beta two"), to="tester", sender="tester")
    with pytest.raises(Died):
        await first.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
    assert model.calls == 1

    second = await started(bus, holder(model, cls=Solo))
    result = await second.converse(ctx_for(bus, envelope, 2), envelope.payload.text)
    assert result.text == "recorded" and model.calls == 2
    calls = await payloads(bus, "default.event.tester.llm.>", LlmCallCompleted)
    assert len(calls) == 2 and len({c.request_sha256 for c in calls}) == 2
    turns = await payloads(bus, "default.event.tester.memory.turn.>", TurnRecorded)
    assert [(t.turn, t.role) for t in turns] == [(1, "user"), (2, "assistant"), (3, "user"), (4, "assistant")]
