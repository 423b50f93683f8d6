"""The research team as four supervised agent processes on a real server, driven offline.

One day in CI: facts recorded once each with citations, the report cites every new finding,
the same day again finds nothing new. Day 2 reports only what is new and the contradictions
with day 1. SIGKILL an agent mid-day: the supervisor restarts it, the day completes with the
same report, and the log holds as many model calls as an uninterrupted run, none repeated.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fixtures_agents.helpers import payloads

from agents.llm.offline.research import parse_claims
from agents.research.corpus import load_corpus
from agents.research.demo import DayResult, DemoSettings, ResearchDemo
from agents.research.replay import replay_workflow
from agents.research.team import AGENT_CLASSES
from agents.runtime import AgentRuntime
from bus import Bus, BusConfig
from schemas.payloads import AgentCrashed, LlmCallCompleted, StepRecorded
from schemas.payloads.memory import ContradictionFlagged, FactRecorded

CORPUS = load_corpus()


def demo(bus: Bus, home: Path, lines: list[str]) -> ResearchDemo:
    return ResearchDemo(bus, DemoSettings(home=str(home), day_timeout_s=60), say=lines.append)


def ids(day: int) -> set[str]:
    return {f.id for p in CORPUS.day(day) for f in p.findings}


@asynccontextmanager
async def in_process_team(config: BusConfig) -> AsyncIterator[None]:
    """The four agents as runtimes in this process: an uninterrupted run to compare with."""
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        readies = []
        for name, cls in AGENT_CLASSES.items():
            ready = asyncio.Event()
            runtime = AgentRuntime(cls(), config, name=name)
            tasks.create_task(runtime.run(stop, on_ready=ready.set))
            readies.append(ready.wait())
        await asyncio.wait_for(asyncio.gather(*readies), 30)
        try:
            yield
        finally:
            stop.set()


async def test_a_day_records_every_finding_once_and_a_rerun_finds_nothing_new(
    bus_config: BusConfig, tmp_path: Path
) -> None:
    """(The agents run in this process here; the kill test below runs them as supervised processes.)
    Day 1: one fact per finding (cited, with confidence), a report with one cited claim per
    finding, each claim matching its source; the agents' work is printed as it happens. Day 1
    again: no new fact, and the report says nothing is new. Day 2: only day 2's findings, and
    exactly the contradictions the corpus declares between day 2 and day 1. Replaying day 2 from
    the log produces the same events without calling a model."""
    lines: list[str] = []
    config = msgspec.structs.replace(bus_config, name="coordinator")
    async with Bus(config) as bus:
        async with in_process_team(config):
            team = demo(bus, tmp_path, lines)
            first = await team.run_day(1)
            again = await team.run_day(1)
            second = await team.run_day(2)
        facts = await payloads(bus, "default.event.*.memory.fact.>", FactRecorded)
        flagged = await payloads(bus, "default.event.*.memory.contradiction.>", ContradictionFlagged)
        replay = await replay_workflow(bus, second.correlation_id)

    assert sorted(f.source.ref for f in facts) == sorted(ids(1) | ids(2))
    assert all(f.recorded_by == "researcher" and f.confidence > 0 and f.source.title for f in facts)
    claims = parse_claims(first.report)
    assert {c["ref"] for c in claims} == ids(1) and len(claims) == len(ids(1))
    assert first.new_findings == len(ids(1)) and first.contradictions == 0 and first.llm_calls > 0
    assert any("researcher" in line and "fact" in line and "p01.f1" in line for line in lines)
    assert any("→ coordinator" in line for line in lines)

    assert again.nothing_new and "Nothing new on day 1" in again.report and not parse_claims(again.report)

    assert {c["ref"] for c in parse_claims(second.report)} == ids(2)
    # The offline writer's day-2 slip (one direction reversed) is caught by the reviewer against
    # the cited source and corrected: the final report states every finding as its paper does.
    assert first.corrections == 0 and second.corrections == 1
    findings = CORPUS.findings
    assert all(c["effect"] == findings[c["ref"]].effect for c in parse_claims(second.report))
    assert any("- correction [" in line for line in lines)  # shown in the printed run
    declared = {frozenset(pair) for pair in CORPUS.contradictions() if pair[0] in ids(2)}
    assert {frozenset((c.claim_a.source, c.claim_b.source)) for c in flagged} == declared
    assert second.contradictions == len(declared) > 0
    assert all(f"{a}" in second.report and f"{b}" in second.report for a, b in map(tuple, declared))

    assert replay.same, [(h.agent, h.recorded, h.replayed, h.error, h.unused_responses, h.same) for h in replay.handlings]
    assert [h.agent for h in replay.handlings] == [
        "researcher", "synthesiser", "writer", "reviewer", "writer"
    ]
    assert sum(h.llm_calls for h in replay.handlings) == second.llm_calls


async def _baseline(bus_config: BusConfig, days: list[int]) -> tuple[list[DayResult], list[LlmCallCompleted]]:
    config = msgspec.structs.replace(bus_config, name="coordinator", namespace="baseline")
    async with Bus(config) as bus, in_process_team(config):
        results = [await ResearchDemo(bus, say=lambda _: None).run_day(day) for day in days]
        return results, await payloads(bus, "baseline.event.*.llm.>", LlmCallCompleted)


async def _day_with_kill(
    bus_config: BusConfig, home: Path, namespace: str, days: list[int], victims: dict[tuple[int, str], int]
) -> tuple[list[DayResult], list[LlmCallCompleted], list[int]]:
    """Run `days` in `namespace`; SIGKILL agent `name` on day `d` when its event count on
    memory/llm subjects reaches victims[(d, name)]. Returns results, calls, killed pids."""
    config = msgspec.structs.replace(bus_config, name="coordinator", namespace=namespace)
    killed: list[int] = []
    results = []
    async with Bus(config) as bus:
        async with demo(bus, home, []).team() as team:
            for day in days:
                counts: dict[str, int] = {}

                def watch(msg: Any, day: int = day, counts: dict[str, int] = counts) -> None:
                    agent = msg.subject.split(".")[2]
                    counts[agent] = counts.get(agent, 0) + 1
                    if victims.get((day, agent)) == counts[agent]:
                        pid = team.supervisors[agent].pid_of(0)
                        if pid is not None:
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)

                async def cb(msg: Any, watch: Any = watch) -> None:
                    watch(msg)

                sub = await bus.transport.subscribe(f"{namespace}.event.*.memory.>", cb)
                try:
                    results.append(await team.run_day(day))
                finally:
                    await sub.close()
        calls = await payloads(bus, f"{namespace}.event.*.llm.>", LlmCallCompleted)
        crashed = await payloads(bus, f"{namespace}.event.*.agent.crashed", AgentCrashed)
        steps = await payloads(bus, f"{namespace}.event.*.step.>", StepRecorded)
        facts = await payloads(bus, f"{namespace}.event.*.memory.fact.>", FactRecorded)
    if victims:
        assert {c.pid for c in crashed} == set(killed) and all(c.signal == "SIGKILL" for c in crashed)
        # The killed handlers were redelivered and replayed their recorded steps.
        assert any(s.attempt > 1 for s in steps)
    assert sorted(f.source.ref for f in facts) == sorted(set().union(*(ids(d) for d in days)))
    return results, calls, killed


async def _compare_with_baseline(bus_config: BusConfig, tmp_path: Path, days: list[int],
                                 victims: dict[tuple[int, str], int]) -> None:
    base, base_calls = await _baseline(bus_config, days)
    hit, hit_calls, killed = await _day_with_kill(bus_config, tmp_path / "hit", "killed", days, victims)
    assert len(killed) == len(victims)
    assert [r.report for r in hit] == [r.report for r in base]
    assert len(hit_calls) == len(base_calls)
    hashes = [c.request_sha256 for c in hit_calls]
    assert len(set(hashes)) == len(hashes), "a model call was repeated"
    assert len({c.call_id for c in hit_calls}) == len(hit_calls)


async def test_an_agent_killed_mid_day_loses_nothing_and_repeats_no_model_call(
    bus_config: BusConfig, tmp_path: Path
) -> None:
    """SIGKILL the researcher after its 6th memory event of day 1 (mid tool loop): the supervisor
    restarts it, the redelivered message replays its recorded steps, and the day ends with the
    report of an uninterrupted run, every finding recorded once, and as many llm.call.completed
    events as that run, with no request hash twice."""
    await _compare_with_baseline(bus_config, tmp_path, [1], {(1, "researcher"): 6})


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_every_agent_killed_mid_day_over_three_days(bus_config: BusConfig, tmp_path: Path) -> None:
    """Each of the four agents is killed once mid-handling across the three days; the reports,
    the facts and the model calls equal an uninterrupted run's."""
    victims = {(1, "researcher"): 9, (2, "synthesiser"): 3, (2, "writer"): 2, (3, "reviewer"): 2, (3, "researcher"): 4}
    await _compare_with_baseline(bus_config, tmp_path, [1, 2, 3], victims)
