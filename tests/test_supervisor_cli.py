"""`bus agent start|ps|stop|logs` as a user runs them: real CLI processes, a detached supervisor,
real replica processes, state and logs under --home."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus import Bus, BusConfig
from bus.agent_control import request_stop
from bus.errors import ConfigurationError
from schemas.payloads import AgentStarted, AgentStopped, AgentStopRequested, Note, Ping, Pong
from conftest import wait_for
from fixtures_agents.helpers import payloads

TESTS = Path(__file__).resolve().parent


class Cli:
    def __init__(self, config: BusConfig, home: Path) -> None:
        self.env = {**os.environ, "BUS_URL": config.url, "BUS_HOME": str(home), "BUS_NAMESPACE": "default"}
        if config.monitor_url:
            self.env["BUS_MONITOR_URL"] = config.monitor_url
        if config.credentials:
            self.env["BUS_CREDS"] = config.credentials

    async def __call__(self, *args: str, timeout_s: float = 60) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bus.cli.main", "agent", *args, cwd=TESTS, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
        assert proc.returncode is not None
        return proc.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def cli(bus_config: BusConfig, tmp_path: Path) -> AsyncIterator[Cli]:
    """The CLI against the test server; whatever it left running is stopped afterwards."""
    home = tmp_path / "home"
    runner = Cli(bus_config, home)
    yield runner
    await runner("stop", "--all", "--wait", "10")
    for state_file in home.glob("agents/*/*/state.json"):
        pid = json.loads(state_file.read_text())["supervisor_pid"]
        try:
            os.killpg(pid, signal.SIGKILL)  # only if `stop` could not end it
        except ProcessLookupError:
            pass


async def test_start_ps_stop_round_trip(cli: Cli, bus: Bus) -> None:
    """start launches K replica processes behind a detached supervisor and returns once they are
    ready; ps lists them with pid, state, restarts, heartbeat and in-flight; stop ends them
    gracefully; every step is an event in the log."""
    code, stdout, stderr = await cli("start", "fixtures_agents.basic:Echo", "--name", "greeter", "--replicas", "2")
    assert code == 0, stderr
    assert "started greeter: 2 replica(s)" in stdout
    reply = await bus.request("greeter", Ping(text="hi"), timeout_s=10)
    assert isinstance(reply.payload, Pong)

    code, stdout, _ = await cli("ps")
    assert code == 0
    header, *rows = stdout.strip().splitlines()
    assert header.split()[:4] == ["AGENT", "REPLICA", "PID", "STATE"] and "IN-FLIGHT" in header
    assert [row.split()[:2] for row in rows] == [["greeter", "0"], ["greeter", "1"]]
    assert all(row.split()[3] == "running" for row in rows)
    pids = {int(row.split()[2]) for row in rows}

    code, stdout, stderr = await cli("start", "fixtures_agents.basic:Echo", "--name", "greeter")
    assert code == 2 and "already running" in stderr

    code, stdout, _ = await cli("logs", "greeter", "-n", "5")
    assert code == 0 and "==> replica-0.log <==" in stdout

    code, stdout, stderr = await cli("stop", "greeter")
    assert code == 0 and "stopped greeter" in stdout, stderr
    code, stdout, _ = await cli("ps")
    assert [row.split()[3] for row in stdout.strip().splitlines()[1:]] == ["stopped", "stopped"]
    assert {s.pid for s in await payloads(bus, "default.event.greeter.agent.started", AgentStarted)} == pids
    stopped = await payloads(bus, "default.event.greeter.agent.stopped", AgentStopped)
    assert {s.pid for s in stopped} == pids and all(s.graceful for s in stopped)


async def test_an_operator_stops_an_agent_through_the_bus(cli: Cli, bus: Bus) -> None:
    """`request_stop` reaches the detached supervisor through the bus: bytes that are not a stop
    request are answered with an error and stop nothing; a stop request is answered at once
    with the supervisor's pid and replica count, recorded, and the replicas stop gracefully."""
    code, _, stderr = await cli("start", "fixtures_agents.basic:Echo", "--name", "greeter", "--replicas", "2")
    assert code == 0, stderr
    garbage = await bus.transport.request(bus.subjects.control("greeter"), b"\xff{not json", timeout_s=5)
    assert b"not a stop request" in garbage.data
    assert isinstance((await bus.request("greeter", Ping(text="still there"), timeout_s=10)).payload, Pong)

    answer = await request_stop(bus, "greeter", by="ops", reason="end of the test")
    assert answer.stopping and answer.replicas == 2 and answer.pid > 0

    async def stopped() -> bool:
        _, stdout, _ = await cli("ps")
        return [row.split()[3] for row in stdout.strip().splitlines()[1:]] == ["stopped", "stopped"]

    await wait_for(stopped, timeout_s=30, interval_s=0.2, what="both replicas to stop")
    [asked] = await payloads(bus, "default.event.greeter.agent.stop.requested", AgentStopRequested)
    assert asked.by == "ops" and asked.reason == "end of the test"
    replicas = await payloads(bus, "default.event.greeter.agent.stopped", AgentStopped)
    assert len(replicas) == 2 and all(r.graceful for r in replicas)
    with pytest.raises(ConfigurationError, match="no supervisor of 'greeter' is listening"):
        await request_stop(bus, "greeter", by="ops")


async def test_agent_stop_asks_through_the_bus_for_an_agent_supervised_elsewhere(
    cli: Cli, bus_config: BusConfig, bus: Bus, tmp_path: Path
) -> None:
    """`bus agent stop NAME` with no supervisor of NAME under its --home (it runs on another
    machine, under another home) asks through the bus, and says so; with nobody listening
    either, one line says both."""
    code, _, stderr = await cli("start", "fixtures_agents.basic:Echo", "--name", "faraway")
    assert code == 0, stderr
    elsewhere = Cli(bus_config, tmp_path / "another-home")
    code, stdout, stderr = await elsewhere("stop", "faraway")
    assert code == 0, stderr
    assert "stopping faraway: its supervisor" in stdout and "asked through the bus" in stdout

    async def stopped() -> bool:
        _, out, _ = await cli("ps")
        return [row.split()[3] for row in out.strip().splitlines()[1:]] == ["stopped"]

    await wait_for(stopped, timeout_s=30, interval_s=0.2, what="the replica to stop")
    code, _, stderr = await elsewhere("stop", "faraway")
    assert code == 2 and "no supervisor of 'faraway' is listening" in stderr and len(stderr.strip().splitlines()) == 1


async def test_agent_logs_show_a_failing_handlers_traceback(cli: Cli, bus: Bus) -> None:
    """A handler that raises: its replica's log (what `bus agent logs` prints) holds the failed
    attempt with the full traceback, down to the helper's line."""
    code, _, stderr = await cli("start", "fixtures_agents.basic:Grumpy", "--name", "grumpy")
    assert code == 0, stderr
    sent = await bus.send("grumpy", Note(text="no amount here"))
    shown = ""

    async def logged() -> bool:
        nonlocal shown
        code, shown, _ = await cli("logs", "grumpy", "-n", "200")
        return code == 0 and "in _parse_amount" in shown

    await wait_for(logged, timeout_s=30, what="the traceback in the replica log")
    assert f"note at seq {sent.ack.seq} failed on attempt 1" in shown
    assert "Traceback (most recent call last):" in shown and "IndexError: list index out of range" in shown


async def test_bad_targets_and_unknown_agents_are_clear_errors(cli: Cli) -> None:
    """A target that does not import or is not an Agent, and stopping an agent that is not
    running, fail with exit code 2 and a message saying what to do."""
    code, _, stderr = await cli("start", "no_such_module:Agent")
    assert code == 2 and "cannot import module 'no_such_module'" in stderr
    code, _, stderr = await cli("start", "fixtures_agents.helpers:read_log")
    assert code == 2 and "not a subclass" in stderr
    code, _, stderr = await cli("stop", "nobody")
    assert code == 2 and "not running" in stderr


async def test_a_crash_looping_agent_fails_start_with_its_log(cli: Cli) -> None:
    """An agent that crashes at every start opens its circuit; `start` reports it with the end
    of the replica's log instead of hanging."""
    code, _, stderr = await cli("start", "fixtures_agents.basic:NeverStarts", "--max-crashes", "2", "--wait", "30")
    assert code == 2
    assert "keeps crashing" in stderr and "this agent cannot start" in stderr


async def test_replicas_stop_when_their_supervisor_dies(cli: Cli, tmp_path: Path) -> None:
    """Killing the supervisor (SIGKILL) breaks its replicas' status pipes: they stop gracefully
    instead of running on unsupervised, and `ps` says the supervisor is gone."""
    from agents.supervisor.state import pid_alive

    code, _, stderr = await cli("start", "fixtures_agents.basic:Echo", "--replicas", "2")
    assert code == 0, stderr
    state = json.loads((tmp_path / "home" / "agents" / "default" / "echo" / "state.json").read_text())
    replicas = [r["pid"] for r in state["replicas"]]
    os.kill(state["supervisor_pid"], signal.SIGKILL)

    async def replicas_gone() -> bool:
        return not any(pid_alive(pid) for pid in replicas)

    await wait_for(replicas_gone, timeout_s=20, what="orphaned replicas to stop")
    code, stdout, _ = await cli("ps")
    assert [row.split()[3:5] for row in stdout.strip().splitlines()[1:]] == [["no", "supervisor"]] * 2
