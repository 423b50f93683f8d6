"""The Agent class and its runtime: typed handler discovery, dispatch through the consumer
engine, replies, lifecycle events and heartbeats, and redelivery replaying recorded steps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from agents.errors import AgentDefinitionError, AgentLoadError
from agents.runtime import Agent, AgentRuntime, Context, HandlerTable, handler, load_agent_class
from bus import Bus, BusConfig, ConsumerSettings, RemoteError, RetryableError, RetryPolicy
from schemas.payloads import (
    AgentHeartbeat,
    AgentStarted,
    AgentStopped,
    DeadLettered,
    Note,
    Notice,
    Ping,
    Pong,
    TaskRequested,
)
from conftest import wait_for
from schemas.payloads.messaging import NO_REPLY
from fixtures_agents.basic import Echo
from fixtures_agents.helpers import payloads, subject_counts

# -- handler discovery ------------------------------------------------------------------------


class Multi(Agent):
    @handler
    async def on_text(self, msg: Note | Notice, ctx: Context) -> None: ...

    @handler
    async def on_task(self, task: TaskRequested, ctx: Context) -> None: ...

    async def helper(self, x: Ping, ctx: Context) -> None: ...  # not marked: not a handler


def test_handlers_are_found_from_their_annotations() -> None:
    """Each @handler's first argument annotation names the payload type(s) it handles; unions
    handle several; unmarked methods are ignored; the default name is the class name."""
    agent = Multi()
    table = HandlerTable.of(agent)
    assert table.kinds() == ["note", "notice", "task.requested"]
    assert table.get(Note) == agent.on_text and table.get(Notice) == agent.on_text
    assert table.get(Ping) is None
    assert Multi.default_name() == "multi" and Echo.default_name() == "echo"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("@handler\nasync def a(self, n: Note, ctx): ...\n@handler\nasync def b(self, n: Note, ctx): ...", "both a and b"),
        ("@handler\nasync def a(self, n, ctx): ...", "annotate its payload"),
        ("@handler\nasync def a(self, n: int, ctx): ...", "not a schemas.Payload"),
        ("@handler\nasync def a(self, n: Note): ...", r"must take \(self, payload, ctx\)"),
        ("async def a(self, n: Note, ctx): ...", "has no handlers"),
    ],
)
def test_malformed_agents_are_rejected_with_the_reason(body: str, message: str) -> None:
    """Duplicate types, missing or non-payload annotations, wrong arity and no handlers at all
    are AgentDefinitionErrors naming the method."""
    namespace: dict[str, object] = {"handler": handler, "Note": Note, "Agent": Agent}
    exec(f"class Bad(Agent):\n" + "\n".join("    " + line for line in body.splitlines()), namespace)  # noqa: S102
    with pytest.raises(AgentDefinitionError, match=message):
        HandlerTable.of(namespace["Bad"]())  # type: ignore[operator]


def test_a_sync_handler_is_rejected_at_once() -> None:
    """@handler on a plain def fails when the class is defined."""
    with pytest.raises(AgentDefinitionError, match="async def"):

        class Bad(Agent):
            @handler  # type: ignore[arg-type]
            def on_note(self, note: Note, ctx: Context) -> None: ...


def test_agent_specs_load_or_say_what_is_wrong() -> None:
    """module:Class loads an Agent subclass; anything else is an AgentLoadError."""
    assert load_agent_class("fixtures_agents.basic:Echo") is Echo
    for spec, message in [
        ("fixtures_agents.basic", "module:Class"),
        ("no_such_module_here:X", "cannot import"),
        ("fixtures_agents.basic:Missing", "no attribute"),
        ("fixtures_agents.helpers:read_log", "not a subclass"),
    ]:
        with pytest.raises(AgentLoadError, match=message):
            load_agent_class(spec)


# -- running in-process -------------------------------------------------------------------------


@asynccontextmanager
async def running(agent: Agent, config: BusConfig, **options: object) -> AsyncIterator[AgentRuntime]:
    runtime = AgentRuntime(agent, config, **options)  # type: ignore[arg-type]
    stop, ready = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(runtime.run(stop, on_ready=ready.set))
        await asyncio.wait_for(ready.wait(), 10)
        try:
            yield runtime
        finally:
            stop.set()


async def test_a_handler_returning_a_payload_answers_the_request(bus_config: BusConfig, bus: Bus) -> None:
    """A request reaches the handler for its payload type; the returned payload is the reply."""
    async with running(Echo(), bus_config):
        reply = await bus.request("echo", Ping(text="hello"), timeout_s=5)
    assert isinstance(reply.payload, Pong) and reply.payload.text == "hello"
    assert reply.sender == "echo"


class Silent(Agent):
    """Handles notes and returns None, requests included."""

    name = "silent"

    @handler
    async def on_note(self, note: Note, ctx: Context) -> None:
        return None


async def test_a_request_whose_handler_returns_none_is_answered_at_once(bus_config: BusConfig, bus: Bus) -> None:
    """The requester learns at once that the request was handled without an answer, instead of
    waiting out its timeout to be told it "will still be handled"."""
    async with running(Silent(), bus_config):
        started = asyncio.get_running_loop().time()
        with pytest.raises(RemoteError) as failed:
            await bus.request("silent", Note(text="anyone?"), timeout_s=20)
        elapsed = asyncio.get_running_loop().time() - started
    assert failed.value.error_type == NO_REPLY
    assert "handled the 'note' request but gave no reply" in str(failed.value)
    assert elapsed < 10  # well inside the timeout: answered, not timed out


async def test_lifecycle_and_heartbeats_are_events(bus_config: BusConfig, bus: Bus) -> None:
    """Ready → agent.started (with tags and handled kinds); heartbeats at the configured rate;
    stop → agent.stopped after in-flight work, with the count handled."""
    async with running(Echo(), bus_config, heartbeat_s=0.1, replica=3):
        await bus.request("echo", Ping(), timeout_s=5)

        async def beats() -> int:
            return len(await payloads(bus, "default.event.echo.agent.heartbeat"))

        await wait_for(lambda: _at_least(beats, 2), what="two heartbeats")
    (started,) = await payloads(bus, "default.event.echo.agent.started", AgentStarted)
    assert (started.replica, started.tags, started.kinds) == (3, ["echoes"], ["note", "ping"])
    (stopped,) = await payloads(bus, "default.event.echo.agent.stopped", AgentStopped)
    assert stopped.graceful and stopped.handled == 1
    beat = (await payloads(bus, "default.event.echo.agent.heartbeat", AgentHeartbeat))[-1]
    assert beat.handled == 1 and beat.in_flight == 0 and beat.interval_s == 0.1


async def _at_least(count, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await count() >= n


async def test_a_kind_without_handler_is_dead_lettered_with_the_reason(bus_config: BusConfig, bus: Bus) -> None:
    """A payload the agent has no handler for is a permanent failure: dead-lettered at once,
    the reason naming what the agent does handle."""
    async with running(Echo(), bus_config):
        await bus.send("echo", TaskRequested(title="not for echo"))

        async def dead() -> bool:
            return bool(await subject_counts(bus, "default.dead.echo"))

        await wait_for(dead, what="dead letter")
    (letter,) = await payloads(bus, "default.dead.echo", DeadLettered)
    assert letter.reason == "permanent" and "no handler for 'task.requested'" in (letter.error or "")
    assert "note, ping" in (letter.error or "")


class FlakyOnce(Agent):
    """Runs a counted step, then fails its first attempt: the redelivery must replay the step."""

    name = "flaky"
    consumer = ConsumerSettings(ack_wait_s=5.0, retry=RetryPolicy(backoff_s=(0.05,), max_deliver=3))
    calls: list[int] = []

    @handler
    async def on_note(self, note: Note, ctx: Context) -> None:
        value = await ctx.step("expensive", lambda: FlakyOnce.calls.append(ctx.attempt) or len(FlakyOnce.calls))
        await ctx.send("sink", Note(text=f"value={value}"))
        if ctx.attempt == 1:
            raise RetryableError("fail after the side effects", delay_s=0.05)


async def test_a_redelivered_message_replays_recorded_steps(bus_config: BusConfig, bus: Bus) -> None:
    """Through the real consumer engine: attempt 1 runs the step and the send, then fails;
    attempt 2 gets both back from the log, so the step ran once and the sink got one message."""
    FlakyOnce.calls.clear()
    async with running(FlakyOnce(), bus_config):
        await bus.send("flaky", Note(text="go"))

        async def handled() -> bool:
            info = await bus.js.consumer_info(bus.subjects.stream, "flaky__inbox")
            return info.num_ack_pending == 0 and info.num_pending == 0 and info.delivered.consumer_seq == 2

        await wait_for(handled, what="second attempt acked")
    assert FlakyOnce.calls == [1]
    assert await subject_counts(bus, "default.inbox.sink.*") == {"default.inbox.sink.flaky": 1}


def test_the_agent_process_imports_no_heavy_libraries() -> None:
    """An agent replica's start time is mostly imports: its entry point must not pull in DuckDB,
    Arrow, the Anthropic SDK or the projections layer."""
    import subprocess
    import sys

    probe = (
        "import sys, agents.runtime.process, agents.supervisor.main; "
        "print(','.join(m for m in ('duckdb', 'pyarrow', 'anthropic', 'projections') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == ""
