"""Fault-injection proof of exactly-once effects on an at-least-once bus.

The ledger agent (fixtures_agents/ledger.py) handles each task with three steps that append a
line to a ledger file outside the bus, then a send to `sink`. Its process is killed with SIGKILL
at random points while it works (after a random amount of ledger progress, plus a random delay
of up to 4 ms); the supervisor restarts it and the bus redelivers what was in flight.

Afterwards, for every task:
  - handled: exactly one TaskCompleted in the sink's inbox (outbound dedup by derived id), and
    the agent's consumer has nothing pending;
  - each ledger side effect exactly once: the ledger holds exactly the expected lines, once each;
  - each step recorded exactly once in the log;
  - nothing in the dead letters.

What is guaranteed, exactly: a step's *record* is written once and every later attempt gets the
recorded result; outbound messages are stored once. The step's function itself runs at least
once: a kill after the ledger write and before the step's record is stored makes it run again on
the redelivery. The ledger write is therefore idempotent by the step id (stable across attempts);
`<ledger>.attempts` counts every call, so the test shows how often that window was hit.

The seed is printed; set CONTINUUM_FAULT_SEED to replay a run. The full run (500 messages, 100
kills) is `-m soak`; the default run (60 messages, 10 kills) runs in CI.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import pytest

from agents.supervisor import AgentSpec, RestartPolicy, SupervisorSettings
from bus import Bus, BusConfig
from schemas.payloads import AgentCrashed, DeliveryReport, TaskCompleted, TaskRequested
from conftest import wait_for
from fixtures_agents.helpers import payloads, read_log, subject_counts
from fixtures_agents.ledger import STEPS
from test_supervisor import supervised

TESTS = Path(__file__).resolve().parent
SEED_ENV = "CONTINUUM_FAULT_SEED"


def ledger_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


async def run_with_kills(
    bus: Bus, config: BusConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, messages: int, kills: int
) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"fault injection: {messages} messages, {kills} kills, seed {seed} (replay: {SEED_ENV}={seed})")
    rng = random.Random(seed)
    ledger = tmp_path / "ledger.txt"
    monkeypatch.setenv("CONTINUUM_TEST_LEDGER", str(ledger))
    monkeypatch.setenv("CONTINUUM_TEST_STEP_MS", "2")
    tasks = [await bus.send("ledger", TaskRequested(title=f"task {n}", input={"n": n})) for n in range(messages)]
    # Kill points: after these many ledger lines (sorted random sample), plus a random delay.
    thresholds = sorted(rng.sample(range(1, messages * STEPS), kills))
    spec = AgentSpec(target="fixtures_agents.ledger:LedgerAgent", name="ledger", bus=config, workdir=str(TESTS))
    settings = SupervisorSettings(
        restart=RestartPolicy(backoff_initial_s=0.02, backoff_max_s=0.1, max_crashes=100_000, window_s=1.0),
        stop_grace_s=10.0,
    )
    async with supervised(bus, spec, settings) as sup:
        progress = 0
        for killed, threshold in enumerate(thresholds, start=1):

            def due(threshold: int = threshold, progress: int = progress) -> bool:
                lines = len(ledger_lines(ledger))
                return sup.status().replicas[0].state == "running" and lines >= threshold and lines > progress

            await wait_for(due, timeout_s=60, interval_s=0.002, what=f"progress before kill {killed}")
            await asyncio.sleep(rng.uniform(0, 0.004))  # the kill point: a random moment of work
            pid = sup.pid_of(0)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            progress = len(ledger_lines(ledger))
            await wait_for(lambda pid=pid: sup.pid_of(0) not in (None, pid), timeout_s=30, what="replacement")

        async def all_handled() -> bool:
            info = await bus.js.consumer_info(bus.subjects.stream, "ledger__inbox")
            sent = (await subject_counts(bus, "default.inbox.sink.ledger")).get("default.inbox.sink.ledger", 0)
            return sent >= messages and info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(all_handled, timeout_s=180, interval_s=0.1, what="every task handled")

    # Every message handled, once: one completion per task, none twice.
    completions = [env.payload for _, env in await read_log(bus, "default.inbox.sink.ledger")]
    assert all(isinstance(c, TaskCompleted) for c in completions)
    assert sorted(c.task_id for c in completions) == sorted(t.envelope.id for t in tasks)
    # Every side effect exactly once: exactly the expected ledger lines, none repeated.
    lines = ledger_lines(ledger)
    texts = [line.split(" ", 1)[1] for line in lines]
    expected = {f"{t.envelope.id}:{i}" for t in tasks for i in range(STEPS)}
    assert len(texts) == len(set(texts)) == len(expected) and set(texts) == expected
    assert len({line.split(" ", 1)[0] for line in lines}) == len(lines)
    # Every step recorded exactly once.
    steps = await subject_counts(bus, "default.event.ledger.step.>")
    assert len(steps) == messages * (STEPS + 1) and set(steps.values()) == {1}
    # Nothing dead-lettered; every kill seen as a crash.
    assert await subject_counts(bus, "default.dead.ledger") == {}
    crashes = await payloads(bus, "default.event.ledger.agent.crashed", AgentCrashed)
    assert len(crashes) == kills and all(c.signal == "SIGKILL" for c in crashes)
    calls = len(ledger_lines(Path(f"{ledger}.attempts")))
    reports = await payloads(bus, "default.event.ledger.delivery.report", DeliveryReport)
    redelivered = sum(1 for r in reports for s in r.settlements if s.attempt > 1 and s.outcome == "handled")
    print(
        f"fault injection ok: {kills} kills, {redelivered} messages handled on a redelivery, "
        f"{calls - len(lines)} step functions re-run after a kill (absorbed by the idempotent ledger)"
    )


async def test_exactly_once_effects_under_random_kills(
    bus_config: BusConfig, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 messages, 10 SIGKILLs at random points: every message handled, every ledger effect
    and step record exactly once, nothing dead-lettered."""
    await run_with_kills(bus, bus_config, tmp_path, monkeypatch, messages=60, kills=10)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_exactly_once_effects_under_random_kills_soak(
    bus_config: BusConfig, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 messages, 100 SIGKILLs at random points: the same guarantees as the CI variant."""
    await run_with_kills(bus, bus_config, tmp_path, monkeypatch, messages=500, kills=100)
