"""`ctx.step` and the outbound steps: recorded once, replayed on redelivery, fenced per step.

Contexts are driven directly with synthetic deliveries (attempt 1, then attempt 2 for the same
inbound envelope) against a real server, so each replay path is pinned without timing; the
last tests go through the consumer engine's real redelivery.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from agents.errors import NondeterminismError, StepError
from agents.runtime import AgentRuntime, Context, SendOptions
from agents.runtime.journal import inbound_key
from bus import Bus, BusConfig, PermanentError
from schemas import Envelope, derived_id
from schemas.payloads import Note, Ping, Pong, StepRecorded
from conftest import wait_for
from fixtures_agents.basic import Echo
from fixtures_agents.helpers import delivery, payloads, read_log, subject_counts


class Score(msgspec.Struct, frozen=True):
    name: str
    points: int


def inbound(bus: Bus, text: str = "work") -> Envelope[Any]:
    return bus.envelope(Note(text=text), to="worker", sender="tester")


def context(bus: Bus, envelope: Envelope[Any], attempt: int) -> Context:
    return Context(bus=bus, agent="worker", envelope=envelope, delivery=delivery(attempt))


async def test_replay_returns_the_recorded_result_without_running_fn(bus: Bus) -> None:
    """The first run records each step's result; a redelivery (attempt 2) gets the recorded
    results back in order and never calls fn again."""
    env = inbound(bus)
    calls: list[str] = []

    def work(label: str) -> str:
        calls.append(label)
        return f"{label}-{len(calls)}"

    first = context(bus, env, attempt=1)
    assert await first.step("a", work, "a") == "a-1"
    assert await first.step("b", work, "b") == "b-2"
    replay = context(bus, env, attempt=2)
    assert await replay.step("a", work, "a") == "a-1"
    assert await replay.step("b", work, "b") == "b-2"
    assert calls == ["a", "b"]
    counts = await subject_counts(bus, f"default.event.worker.step.{inbound_key(env.id)}.*")
    assert counts == {
        f"default.event.worker.step.{env.id}.0": 1,
        f"default.event.worker.step.{env.id}.1": 1,
    }


async def test_a_step_beyond_the_recorded_ones_runs(bus: Bus) -> None:
    """A redelivery replays the steps recorded before the crash and runs the rest."""
    env = inbound(bus)
    first = context(bus, env, attempt=1)
    await first.step("a", lambda: 1)
    replay = context(bus, env, attempt=3)
    assert await replay.step("a", lambda: 100) == 1
    assert await replay.step("b", lambda: 2) == 2


async def test_struct_results_come_back_typed_on_both_paths(bus: Bus) -> None:
    """A step's result is decoded as fn's return annotation, identically on run and replay."""
    env = inbound(bus)

    async def score() -> Score:
        return Score(name="x", points=3)

    first = await context(bus, env, attempt=1).step("score", score)
    again = await context(bus, env, attempt=2).step("score", score)
    assert first == again == Score(name="x", points=3)
    untyped = await context(bus, env, attempt=2).step("score", lambda: None, type=dict)
    assert untyped == {"name": "x", "points": 3}


async def test_step_called_under_another_name_on_replay_is_nondeterminism(bus: Bus) -> None:
    """Replaying into a different step order raises NondeterminismError, a PermanentError
    (the message is dead-lettered rather than fed the wrong recorded result)."""
    env = inbound(bus)
    await context(bus, env, attempt=1).step("fetch", lambda: 1)
    with pytest.raises(NondeterminismError) as info:
        await context(bus, env, attempt=2).step("charge", lambda: 2)
    assert isinstance(info.value, PermanentError)
    assert (info.value.index, info.value.recorded, info.value.called) == (0, "fetch", "charge")


async def test_second_recorder_of_a_step_adopts_the_first_result(bus: Bus) -> None:
    """Two runs of one message that both think they are first (e.g. a redelivery racing a slow
    handler): the first record wins, the second gets its result, one record is stored."""
    env = inbound(bus)
    winner = await context(bus, env, attempt=1).step("pick", lambda: "first")
    loser = await context(bus, env, attempt=1).step("pick", lambda: "second")
    assert winner == loser == "first"
    records = await payloads(bus, "default.event.worker.step.>", StepRecorded)
    assert len(records) == 1


async def test_steps_must_be_awaited_one_at_a_time(bus: Bus) -> None:
    """Concurrent steps would replay in a random order, so starting one while another runs
    raises StepError."""
    ctx = context(bus, inbound(bus), attempt=1)
    release = asyncio.Event()

    async def slow() -> int:
        await release.wait()
        return 1

    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(ctx.step("slow", slow))
        await wait_for(lambda: ctx.current_step is not None, what="first step running")
        with pytest.raises(StepError, match="one at a time"):
            await ctx.step("other", lambda: 2)
        release.set()
    assert running.result() == 1


async def test_step_id_is_stable_across_attempts_and_defined_only_inside_a_step(bus: Bus) -> None:
    """ctx.step_id, the idempotency key of a step's side effect, is the same on every attempt."""
    env = inbound(bus)
    seen: list[str] = []
    first = context(bus, env, attempt=1)

    def crash_after_effect() -> None:
        seen.append(first.step_id)
        raise RuntimeError("died before the step was recorded")

    with pytest.raises(RuntimeError):
        await first.step("effect", crash_after_effect)
    second = context(bus, env, attempt=2)
    await second.step("effect", lambda: seen.append(second.step_id))
    assert seen == [derived_id(env.id, "step/0/effect")] * 2
    with pytest.raises(StepError):
        _ = second.step_id


async def test_unencodable_result_is_a_clear_step_error(bus: Bus) -> None:
    """A result msgspec cannot encode fails the step with StepError naming it; nothing is recorded."""
    ctx = context(bus, inbound(bus), attempt=1)
    with pytest.raises(StepError, match="cannot encode"):
        await ctx.step("bad", lambda: object())
    assert await subject_counts(bus, "default.event.worker.step.>") == {}


async def test_send_is_a_step_with_a_derived_id(bus: Bus) -> None:
    """ctx.send publishes once per inbound message: a replay returns the recorded reference and
    publishes nothing; the outbound id is derived from the inbound id and the step."""
    env = inbound(bus)
    first = await context(bus, env, attempt=1).send("bob", Note(text="hi"))
    again = await context(bus, env, attempt=2).send("bob", Note(text="hi"))
    assert first == again
    assert first.id == derived_id(env.id, "out/0/send:bob")
    assert await subject_counts(bus, "default.inbox.bob.*") == {"default.inbox.bob.worker": 1}
    (stored,) = [e for _, e in await read_log(bus, "default.inbox.bob.*")]
    assert (stored.causation_id, stored.correlation_id) == (env.id, env.correlation_id)


async def test_outbound_options_are_carried(bus: Bus) -> None:
    """SendOptions set the outbound envelope's priority, expiry and headers."""
    env = inbound(bus)
    options = SendOptions(priority=9, expires_in_s=60.0, headers={"trace": "t1"})
    await context(bus, env, attempt=1).broadcast("team", Note(text="all"), options=options)
    ((subject, stored),) = await read_log(bus, "default.group.team.*")
    assert subject == "default.group.team.worker"
    assert (stored.priority, stored.headers["trace"]) == (9, "t1") and stored.expires_at is not None


async def test_send_repeated_after_a_crash_before_its_record_is_stored_once(bus: Bus) -> None:
    """The window between publishing and recording the step is closed by JetStream dedup: the
    re-sent envelope has the same id and is stored once (within the duplicate window)."""
    env = inbound(bus)
    # The first attempt published and died before recording the step.
    lost = bus.envelope(Note(text="hi"), to="bob", sender="worker", id=derived_id(env.id, "out/0/send:bob"))
    await bus.publish(lost)
    ref = await context(bus, env, attempt=2).send("bob", Note(text="hi"))
    assert ref.id == lost.id
    assert await subject_counts(bus, "default.inbox.bob.*") == {"default.inbox.bob.worker": 1}


async def test_request_is_a_step_and_its_reply_is_replayed(bus_config: BusConfig, bus: Bus) -> None:
    """ctx.request records the reply: a replay returns it without asking again."""
    runtime = AgentRuntime(Echo(), bus_config)
    stop, ready = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(runtime.run(stop, on_ready=ready.set))
        await asyncio.wait_for(ready.wait(), 10)
        env = inbound(bus)
        async with Bus(msgspec.structs.replace(bus_config, name="worker")) as worker_bus:
            reply = await context(worker_bus, env, attempt=1).request("echo", Ping(text="q"), timeout_s=5)
            assert isinstance(reply.payload, Pong) and reply.payload.text == "q"
            again = await context(worker_bus, env, attempt=2).request("echo", Ping(text="q"), timeout_s=5)
        assert again == reply
        assert await subject_counts(bus, "default.inbox.echo.*") == {"default.inbox.echo.worker": 1}
        stop.set()
