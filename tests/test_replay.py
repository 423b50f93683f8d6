"""`bus replay`: recorded handlings re-run on the recorded model responses give the same events;
a log that does not match, or an agent whose decisions changed, is reported as different, and no
model is ever called."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from test_llm_agent import CountingModel, Solo, ctx_for, started

from agents.research.replay import replay_workflow
from bus import Bus
from schemas import derived_id
from schemas.payloads import Note
from schemas.payloads.memory import Citation, FactRecorded

BUS = Path(sys.executable).with_name("bus")
TESTS = Path(__file__).resolve().parent


class Reworded(Solo):
    system_prompt = "A different prompt: every request differs from the recorded ones."


async def handled(bus: Bus, text: str) -> Any:
    """Publish a note to "tester" and handle it like the runtime would (attempt 1)."""
    agent = await started(bus, Solo(model=CountingModel(), model_name="offline"))
    sent = await bus.send("tester", Note(text=text), sender="coordinator")
    await agent.on_note(sent.envelope.payload, ctx_for(bus, sent.envelope, 1))
    return sent.envelope, agent.model


async def test_replay_reproduces_the_recorded_events_without_a_model(bus: Bus) -> None:
    """Two handlings of one workflow (a fact, a block append) replay to the same content hash,
    using every recorded response, while the live model is not called again."""
    first, model = await handled(bus, "fact one")
    agent = await started(bus, Solo(model=model, model_name="offline"))
    second = bus.envelope(Note(text="append two"), to="tester", sender="coordinator",
                          correlation_id=first.correlation_id)
    await bus.publish(second)
    await agent.on_note(second.payload, ctx_for(bus, second, 1))
    calls_before = model.calls
    report = await replay_workflow(bus, first.correlation_id, {"tester": Solo})
    assert model.calls == calls_before == 4
    assert report.same and [h.llm_calls for h in report.handlings] == [2, 2]
    assert all(h.recorded == h.replayed > 0 and h.unused_responses == 0 for h in report.handlings)


async def test_an_event_the_handler_would_not_produce_is_a_difference(bus: Bus) -> None:
    """A fact in the log attributed to the handling, which the replay does not produce, changes
    the recorded hash: the replay says the events differ."""
    envelope, _ = await handled(bus, "fact one")
    await bus.record("tester", FactRecorded(
        fact_id="fforged000000", subject="x:y", statement="forged", source=Citation(ref="forged"),
        confidence=0.5, recorded_by="tester",
    ), id=derived_id(envelope.id, "forged"), causation_id=envelope.id, correlation_id=envelope.correlation_id)
    report = await replay_workflow(bus, envelope.correlation_id, {"tester": Solo})
    (handling,) = report.handlings
    assert not report.same and handling.recorded == handling.replayed + 1
    assert handling.recorded_sha256 != handling.replayed_sha256 and not handling.error


async def test_changed_decisions_are_a_replay_mismatch_not_a_model_call(bus: Bus) -> None:
    """An agent whose prompt changed asks requests that were never recorded: the handling is
    reported with ReplayMismatch (no model answers in a replay)."""
    envelope, _ = await handled(bus, "fact one")
    report = await replay_workflow(bus, envelope.correlation_id, {"tester": Reworded})
    (handling,) = report.handlings
    assert not report.same and handling.error.startswith("ReplayMismatch")


async def test_bus_replay_prints_both_hashes_and_exits_by_the_verdict(bus: Bus) -> None:
    """`bus replay <id>` lists each handling with recorded == replayed hashes and exits 0; an
    unknown correlation id is an error (exit 2)."""
    envelope, _ = await handled(bus, "fact one")

    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            str(BUS), "replay", *args, "--url", bus.config.url, "--creds", str(bus.config.credentials), "--agent", "tester=test_llm_agent:Solo",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=TESTS,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode()

    code, out = await run(envelope.correlation_id)
    assert code == 0, out
    assert "tester" in out and "==" in out and out.strip().endswith("same events: yes")
    code, out = await run("no-such-workflow")
    assert code == 2 and "no handled messages" in out


async def test_a_handling_whose_records_were_forgotten_says_what_it_cannot_reproduce(bus: Bus) -> None:
    """After `bus forget agent tester`, its model calls and turns are sealed under an erased key:
    the replay of its handling reports how many records of which kinds it cannot reproduce
    (and under which key) instead of running the handler on a partial memory."""
    from bus.privacy.forget import forget_agent

    envelope, _ = await handled(bus, "fact one")
    before = await replay_workflow(bus, envelope.correlation_id, {"tester": Solo})
    assert before.same
    await forget_agent(bus, "tester", why="test", actor="admin")
    report = await replay_workflow(bus, envelope.correlation_id, {"tester": Solo})
    assert not report.same and len(report.handlings) == 1
    error = report.handlings[0].error
    assert error.startswith("cannot reproduce: ") and "agent.tester" in error and "forgotten" in error
    assert "llm.call.completed" in error and "memory.turn.recorded" in error
