"""An agent's own state is fenced: a second writer gets ConcurrencyConflict, never an interleaving;
inside a handler, load and save are steps, so a redelivery does not apply an update twice."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from agents.errors import UnreadableRecord
from agents.runtime import Context, StateStore
from bus import Bus, BusConfig, ConcurrencyConflict, PermanentError
from schemas import Envelope, derived_id
from schemas.payloads import AgentHeartbeat, AgentStateSaved, Note
from fixtures_agents.helpers import delivery, payloads


class Account(msgspec.Struct, frozen=True):
    balance: int
    owner: str = "ada"


async def test_two_writers_one_wins_the_other_gets_a_typed_conflict(bus_config: BusConfig) -> None:
    """Two processes' connections load the same version and both save: the first save wins,
    the second raises ConcurrencyConflict naming the winner's version; nothing interleaves."""
    async with Bus(bus_config) as one, Bus(msgspec.structs.replace(bus_config, name="other")) as two:
        first, second = StateStore(one, "acct"), StateStore(two, "acct")
        seen_a = await first.load(type=Account, default=Account(balance=0))
        seen_b = await second.load(type=Account, default=Account(balance=0))
        assert seen_a.version == seen_b.version == 0
        won = await first.save(Account(balance=seen_a.value.balance + 10), version=seen_a.version)
        with pytest.raises(ConcurrencyConflict) as info:
            await second.save(Account(balance=seen_b.value.balance + 5), version=seen_b.version)
        assert (info.value.expected, info.value.actual) == (0, won)
        fresh = await second.load(type=Account)
        assert fresh == type(fresh)(value=Account(balance=10), version=won)
        await second.save(Account(balance=fresh.value.balance + 5), version=fresh.version)
        assert (await first.load(type=Account)).value.balance == 15


async def test_other_events_of_the_agent_do_not_conflict_with_its_state(bus: Bus) -> None:
    """The fence covers the state subject only: heartbeats recorded between load and save do
    not make the save fail."""
    store = StateStore(bus, "acct")
    current = await store.load(type=int, default=0)
    await bus.record("acct", AgentHeartbeat(agent="acct", pid=1))
    await store.save(current.value + 1, version=current.version)
    assert (await store.load(type=int)).value == 1


async def test_concurrent_updates_lose_nothing(bus_config: BusConfig) -> None:
    """`update` re-reads and retries on conflict: 2 writers x 15 increments end at 30."""
    async with Bus(bus_config) as one, Bus(msgspec.structs.replace(bus_config, name="other")) as two:
        stores = [StateStore(one, "ctr"), StateStore(two, "ctr")]

        async def bump(store: StateStore) -> None:
            for _ in range(15):
                await store.update(lambda n: n + 1, type=int, default=0, max_attempts=100)

        await asyncio.gather(*(bump(s) for s in stores))
        assert (await stores[0].load(type=int)).value == 30
        saves = await payloads(one, "default.event.ctr.agent.state", AgentStateSaved)
        assert len(saves) == 30


def handler_context(bus: Bus, envelope: Envelope[Any], attempt: int) -> Context:
    return Context(bus=bus, agent="acct", envelope=envelope, delivery=delivery(attempt))


async def test_in_a_handler_a_redelivery_does_not_apply_the_update_twice(bus: Bus) -> None:
    """Load and save are steps: replaying the handler gets the recorded versions back, so the
    state is updated once and one state event is stored."""
    env = bus.envelope(Note(text="deposit"), to="acct", sender="tester")
    for attempt in (1, 2):
        ctx = handler_context(bus, env, attempt)
        await ctx.state.update(lambda n: n + 10, type=int, default=0)
    assert (await StateStore(bus, "acct").load(type=int)).value == 10
    assert len(await payloads(bus, "default.event.acct.agent.state", AgentStateSaved)) == 1


async def test_a_save_stored_just_before_a_crash_is_recognised_on_replay(bus: Bus) -> None:
    """The process died after its save was stored and before the step was recorded: the replay
    sees a conflict caused by its own write (same id) and takes it as saved."""
    env = bus.envelope(Note(text="deposit"), to="acct", sender="tester")
    first = handler_context(bus, env, 1)
    loaded = await first.state.load(type=int, default=0)  # step 0, recorded
    save_id = derived_id(first.journal.step_id(1, "state.save"), "state")
    own = await StateStore(bus, "acct")._write(loaded.value + 10, loaded.version, save_id)  # stored, unrecorded
    replay = handler_context(bus, env, 2)
    result = await replay.state.update(lambda n: n + 10, type=int, default=0)
    assert result.version == own and result.value == 10
    assert len(await payloads(bus, "default.event.acct.agent.state", AgentStateSaved)) == 1


async def test_a_conflict_inside_a_handler_replays_the_same_retry_path(bus: Bus) -> None:
    """A conflict is recorded as the save step's result: the replay sees the same conflict and
    retries the same way, ending at the same version."""
    env = bus.envelope(Note(text="deposit"), to="acct", sender="tester")
    rival = StateStore(bus, "acct")
    first = handler_context(bus, env, 1)
    seen = await first.state.load(type=int, default=0)
    await rival.save(100, version=0)  # another writer gets in between
    with pytest.raises(ConcurrencyConflict):
        await first.state.save(seen.value + 1, version=seen.version)
    retried = await first.state.update(lambda n: n + 1, type=int, default=0)
    replay = handler_context(bus, env, 2)
    again = await replay.state.load(type=int, default=0)
    with pytest.raises(ConcurrencyConflict):
        await replay.state.save(again.value + 1, version=again.version)
    assert await replay.state.update(lambda n: n + 1, type=int, default=0) == retried
    assert retried.value == 101


async def test_replicas_updating_one_state_lose_no_update(bus_config: BusConfig, bus: Bus) -> None:
    """Two replica processes (4 handlers each) increment the agent's state for 40 messages:
    writes that collide get conflicts and retry, so the counter ends at exactly 40."""
    from agents.supervisor import SupervisorSettings
    from conftest import wait_for
    from test_supervisor import QUICK, agent_spec, supervised

    spec = agent_spec(bus_config, "counter:Counter", "counter", replicas=2)
    async with supervised(bus, spec, SupervisorSettings(restart=QUICK)) as sup:
        await sup.wait_ready(20)
        for i in range(40):
            await bus.send("counter", Note(text=str(i)))

        async def counted() -> bool:
            return (await StateStore(bus, "counter").load(type=int, default=0)).value >= 40

        await wait_for(counted, timeout_s=30, what="40 increments")
    assert (await StateStore(bus, "counter").load(type=int)).value == 40
    assert len(await payloads(bus, "default.event.counter.agent.state", AgentStateSaved)) == 40


@pytest.mark.parametrize("stored", [
    pytest.param(b"\xff not an envelope", id="not-an-envelope"),
    pytest.param(b'{"id":"x","sender":"acct","created_at":"2026-01-02T03:04:05Z","payload":{"kind":"note","text":"x"}}',
                 id="another-kind"),
    pytest.param(b'{"id":"x","sender":"acct","created_at":"2026-01-02T03:04:05Z","payload":'
                 b'{"kind":"agent.state","agent":"acct","value":' + b"[" * 60 + b"]" * 60 + b',"previous_version":0}}',
                 id="value-of-another-type"),
])
async def test_a_state_record_that_does_not_decode_is_a_permanent_error(bus: Bus, stored: bytes) -> None:
    """Anyone can publish on an agent's state subject: bytes there that are not this agent's
    state raise UnreadableRecord (a PermanentError: the message needing it is dead-lettered
    at once), naming the subject and sequence, instead of failing every retry the same way."""
    store = StateStore(bus, "acct")
    ack = await bus.js.publish(store.subject, stored)
    with pytest.raises(UnreadableRecord) as info:
        await store.load(type=int, default=0)
    assert isinstance(info.value, PermanentError)
    assert f"seq {ack.seq}" in str(info.value) and store.subject in str(info.value)
