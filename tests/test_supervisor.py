"""The supervisor with real agent processes: start, restart with backoff, the circuit breaker,
graceful and forced stop, liveness, and a poison message that kills its process every time."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agents.errors import SupervisorError
from agents.supervisor import AgentSpec, EventRecorder, RestartPolicy, Supervisor, SupervisorSettings
from bus import Bus, BusConfig
from schemas.payloads import (
    AgentCircuitOpened,
    AgentCrashed,
    AgentRestarted,
    AgentStarted,
    AgentStopped,
    DeadLettered,
    Note,
    Ping,
    Pong,
    TaskRequested,
)
from conftest import wait_for
from fixtures_agents.helpers import payloads, read_log

TESTS = Path(__file__).resolve().parent
QUICK = RestartPolicy(backoff_initial_s=0.05, backoff_max_s=0.2, max_crashes=20, window_s=60.0)


def agent_spec(config: BusConfig, target: str, name: str, **fields: object) -> AgentSpec:
    return AgentSpec(target=f"fixtures_agents.{target}", name=name, bus=config, workdir=str(TESTS), **fields)  # type: ignore[arg-type]


@asynccontextmanager
async def supervised(bus: Bus, spec: AgentSpec, settings: SupervisorSettings) -> AsyncIterator[Supervisor]:
    """A supervisor recording its events through `bus`, stopped (gracefully) at the block's end."""
    recorder = EventRecorder(bus)
    supervisor = Supervisor(spec, settings, recorder=recorder)
    async with asyncio.TaskGroup() as tasks:
        recording = tasks.create_task(recorder.run())
        async with supervisor.running():
            yield supervisor
        assert await recorder.flush(5.0)
        recording.cancel()


async def sink_texts(bus: Bus) -> list[str]:
    return [env.payload.text for _, env in await read_log(bus, "default.inbox.sink.*")]


async def test_replicas_run_as_processes_and_handle_requests(bus_config: BusConfig, bus: Bus) -> None:
    """Each replica is its own OS process, reported ready with its pid; requests are answered."""
    spec = agent_spec(bus_config, "basic:Echo", "echo", replicas=2)
    async with supervised(bus, spec, SupervisorSettings(restart=QUICK)) as sup:
        status = await sup.wait_ready(20)
        pids = {r.pid for r in status.replicas}
        assert len(pids) == 2 and os.getpid() not in pids
        assert all(r.state == "running" and r.start_ms > 0 for r in status.replicas)
        replies = await asyncio.gather(*(bus.request("echo", Ping(text=str(i)), timeout_s=10) for i in range(20)))
        responders = {int(r.payload.responder.split(":")[1]) for r in replies if isinstance(r.payload, Pong)}
        assert responders <= pids and len(replies) == 20
    started = await payloads(bus, "default.event.echo.agent.started", AgentStarted)
    assert {s.pid for s in started} == pids and sorted(s.replica for s in started) == [0, 1]
    stopped = await payloads(bus, "default.event.echo.agent.stopped", AgentStopped)
    assert sorted(s.replica for s in stopped) == [0, 1] and all(s.graceful for s in stopped)


async def test_a_killed_replica_is_restarted_and_both_are_events(bus_config: BusConfig, bus: Bus) -> None:
    """SIGKILL a replica: the supervisor records agent.crashed, waits its backoff, launches a
    replacement (agent.restarted), and the agent answers again."""
    spec = agent_spec(bus_config, "basic:Echo", "echo")
    async with supervised(bus, spec, SupervisorSettings(restart=QUICK)) as sup:
        old = (await sup.wait_ready(20)).replicas[0].pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        status = await sup.wait_until(
            lambda s: s.replicas[0].restarts == 1 and s.replicas[0].state == "running", 20
        )
        new = status.replicas[0].pid
        assert new not in (None, old)
        reply = await bus.request("echo", Ping(), timeout_s=10)
        assert reply.payload.responder == f"echo:{new}"
    (crash,) = await payloads(bus, "default.event.echo.agent.crashed", AgentCrashed)
    assert (crash.pid, crash.signal, crash.exit_code) == (old, "SIGKILL", None)
    (restart,) = await payloads(bus, "default.event.echo.agent.restarted", AgentRestarted)
    assert (restart.previous_pid, restart.pid, restart.restarts) == (old, new, 1)
    assert restart.delay_s == pytest.approx(QUICK.backoff_initial_s)


async def test_a_crash_loop_opens_the_circuit(bus_config: BusConfig, bus: Bus) -> None:
    """A replica that crashes max_crashes times within the window is left down: state
    circuit_open, an agent.circuit_opened event, and wait_ready says it keeps crashing."""
    policy = RestartPolicy(backoff_initial_s=0.01, backoff_max_s=0.05, max_crashes=3, window_s=60.0)
    spec = agent_spec(bus_config, "basic:NeverStarts", "never-starts")
    async with supervised(bus, spec, SupervisorSettings(restart=policy)) as sup:
        with pytest.raises(SupervisorError, match="keeps crashing"):
            await sup.wait_ready(30)
        status = sup.status()
        assert status.replicas[0].state == "circuit_open" and status.replicas[0].restarts == 2
        assert sup.pid_of(0) is None
    crashes = await payloads(bus, "default.event.never-starts.agent.crashed", AgentCrashed)
    assert [c.exit_code for c in crashes] == [1, 1, 1] and [c.recent_crashes for c in crashes] == [1, 2, 3]
    (opened,) = await payloads(bus, "default.event.never-starts.agent.circuit_opened", AgentCircuitOpened)
    assert opened.crashes == 3 and "exited with code 1" in opened.last_exit


async def test_stop_lets_in_flight_work_finish(bus_config: BusConfig, bus: Bus) -> None:
    """Stopping sends SIGTERM: the replica stops fetching, finishes the handler it is running
    (its message is acked, not redelivered), records agent.stopped and exits."""
    spec = agent_spec(bus_config, "faulty:Slow", "slow")
    async with supervised(bus, spec, SupervisorSettings(restart=QUICK, stop_grace_s=20)) as sup:
        await sup.wait_ready(20)
        await bus.send("slow", TaskRequested(title="t1", input={"seconds": 1.0}))

        async def started() -> bool:
            return "started:t1" in await sink_texts(bus)

        await wait_for(started, timeout_s=20, what="handler started")
    assert (await sink_texts(bus)) == ["started:t1", "finished:t1"]
    info = await bus.js.consumer_info(bus.subjects.stream, "slow__inbox")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0
    (stopped,) = await payloads(bus, "default.event.slow.agent.stopped", AgentStopped)
    assert stopped.graceful and stopped.handled == 1


async def test_stop_kills_a_replica_that_overruns_the_grace_period(bus_config: BusConfig, bus: Bus) -> None:
    """A handler still running after stop_grace_s is killed (SIGKILL): agent.stopped with
    graceful=False, and the message stays pending for redelivery."""
    spec = agent_spec(bus_config, "faulty:Slow", "slow")
    async with supervised(bus, spec, SupervisorSettings(restart=QUICK, stop_grace_s=0.5)) as sup:
        await sup.wait_ready(20)
        pid = sup.pid_of(0)
        await bus.send("slow", TaskRequested(title="long", input={"seconds": 60.0}))

        async def started() -> bool:
            return "started:long" in await sink_texts(bus)

        await wait_for(started, timeout_s=20, what="handler started")
        began = time.monotonic()
    assert time.monotonic() - began < 10
    (stopped,) = await payloads(bus, "default.event.slow.agent.stopped", AgentStopped)
    assert (stopped.pid, stopped.graceful) == (pid, False) and "grace period" in stopped.reason
    info = await bus.js.consumer_info(bus.subjects.stream, "slow__inbox")
    assert info.num_ack_pending == 1


async def test_a_replica_without_heartbeats_is_killed_and_restarted(bus_config: BusConfig, bus: Bus) -> None:
    """A replica whose event loop is blocked sends no status for liveness_timeout_s: it is
    presumed hung, killed, recorded as crashed, and replaced."""
    spec = agent_spec(bus_config, "faulty:Blocker", "blocker")
    settings = SupervisorSettings(restart=QUICK, liveness_timeout_s=1.0, status_interval_s=0.2, stop_grace_s=0.5)
    async with supervised(bus, spec, settings) as sup:
        first = (await sup.wait_ready(20)).replicas[0].pid
        await bus.send("blocker", TaskRequested(title="block", input={"seconds": 60.0}))
        status = await sup.wait_until(lambda s: s.replicas[0].restarts >= 1, 20)
        assert status.replicas[0].last_exit == "was killed: no heartbeat"
    crashes = await payloads(bus, "default.event.blocker.agent.crashed", AgentCrashed)
    assert crashes[0].pid == first and crashes[0].signal == "SIGKILL"


async def test_a_replica_slower_to_start_than_the_liveness_timeout_is_not_killed(
    bus_config: BusConfig, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Liveness applies once a replica has spoken: one whose start (here a slow import) takes
    longer than liveness_timeout_s is not presumed hung; it becomes ready, answers, and is never
    killed or restarted."""
    monkeypatch.setenv("CONTINUUM_TEST_IMPORT_S", "2.0")
    spec = agent_spec(bus_config, "slow_start:SlowStart", "slow-start")
    settings = SupervisorSettings(restart=QUICK, liveness_timeout_s=1.0, status_interval_s=0.2)
    async with supervised(bus, spec, settings) as sup:
        status = await sup.wait_ready(30)
        assert status.replicas[0].restarts == 0 and status.replicas[0].start_ms >= 2000
        reply = await bus.request("slow-start", Ping(), timeout_s=10)
        assert reply.payload.responder == f"slow-start:{status.replicas[0].pid}"
    assert not await payloads(bus, "default.event.slow-start.agent.crashed")


async def test_a_replica_silent_since_launch_is_killed_after_the_start_timeout(
    bus_config: BusConfig, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that sends no status line within start_timeout_s of its launch (stuck before
    its event loop runs) is killed and restarted like a hung one, and says why."""
    monkeypatch.setenv("CONTINUUM_TEST_IMPORT_S", "60")
    spec = agent_spec(bus_config, "slow_start:SlowStart", "slow-start")
    settings = SupervisorSettings(restart=QUICK, start_timeout_s=1.0, stop_grace_s=0.5)
    async with supervised(bus, spec, settings) as sup:
        status = await sup.wait_until(lambda s: s.replicas[0].restarts >= 1, 20)
        assert status.replicas[0].last_exit == "was killed: no status within 1.0s of its launch"
    crashes = await payloads(bus, "default.event.slow-start.agent.crashed", AgentCrashed)
    assert crashes[0].signal == "SIGKILL" and crashes[0].uptime_s >= 1.0


async def test_a_poison_message_is_dead_lettered_and_the_agent_goes_on(bus_config: BusConfig, bus: Bus) -> None:
    """A message that kills the process on every attempt ends in the dead letters after
    max_deliver (3) attempts, via the server's advisory; the agent handles what comes next and
    its circuit stays closed."""
    spec = agent_spec(bus_config, "faulty:Poison", "poison")
    async with supervised(bus, spec, SupervisorSettings(restart=QUICK)) as sup:
        await sup.wait_ready(20)
        poison = await bus.send("poison", Note(text="poison"))
        await bus.send("poison", Note(text="after"))

        async def dead_lettered() -> bool:
            return bool(await payloads(bus, "default.dead.poison", DeadLettered))

        await wait_for(dead_lettered, timeout_s=40, what="dead letter of the poison message")
        await bus.send("poison", Note(text="later"))

        async def went_on() -> bool:
            return {"handled:after", "handled:later"} <= set(await sink_texts(bus))

        await wait_for(went_on, timeout_s=20, what="the following messages handled")
        status = sup.status()
        assert status.replicas[0].state == "running" and status.replicas[0].restarts == 3
    (letter,) = await payloads(bus, "default.dead.poison", DeadLettered)
    assert letter.original_id == poison.envelope.id and letter.reason == "max_deliveries"
    assert letter.deliveries == 3
    assert len(await payloads(bus, "default.event.poison.agent.crashed", AgentCrashed)) == 3
    assert not await payloads(bus, "default.event.poison.agent.circuit_opened")
