"""Every guarantee holds after a trim: fenced appends, recorded steps on redelivery, an LLM agent's
memory restarted from a snapshot, duplicate detection within its window.

Real nats-server, real archive files; the LLM is Claude through the real SDK over a faked HTTP
transport (its seam), as in test_llm_agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import pytest

from agents.llm import AnthropicModel, AnthropicSettings
from agents.llm_agent import LLMAgent, read_range
from agents.llm_agent.memory_log import memory_filter
from agents.llm_agent.snapshot import load_snapshot
from agents.runtime import Context
from agents.runtime.journal import inbound_key
from agents.runtime.state import StateStore
from bus import Bus, ConcurrencyConflict, RetryableError
from projections.archive.archiver import run_archive
from projections.archive.config import ArchiveSettings
from projections.archive.trim import run_trim
from schemas import Delivery, Envelope
from schemas.payloads import Note, TurnRecorded

from conftest import wait_for
from fixtures_agents.helpers import subject_counts
from test_archive import publish_notes
from test_archive_trim import NOW, assert_nothing_lost
from test_identity import Secured, secured  # noqa: F401 - the fixture is used by name
from test_llm_agent import Solo, ctx_for


def archive_all(tmp_path: Path) -> ArchiveSettings:
    return ArchiveSettings(directory=tmp_path / "archive" / "default", segment_records=500, seal_partial=True)


async def archive_and_trim(bus: Bus, tmp_path: Path) -> int:
    """Seal the whole log, trim it by the default policy (nothing too young); return the log's
    first sequence after the trim."""
    settings = archive_all(tmp_path)
    await run_archive(bus, settings)
    await run_trim(bus, settings, NOW)
    await assert_nothing_lost(bus, settings.directory)
    return (await bus.log_bounds())[0]


async def test_a_fenced_append_conflicts_and_succeeds_as_before_after_its_subject_was_trimmed(bus: Bus, tmp_path: Path) -> None:
    """Agent state saved twice, then far below the archive's end: the trim purges the older save
    and keeps the last (purging it would make the server read the subject as empty, seq 0, and
    let a writer with version 0 overwrite it). A stale writer still conflicts, naming the kept
    version; the current one still succeeds; version 0 is refused."""
    state = StateStore(bus, "fenced")
    first = await state.save({"n": 1}, version=0)
    current = await state.save({"n": 2}, version=first)
    await publish_notes(bus, 1_200)
    log_first = await archive_and_trim(bus, tmp_path)
    assert log_first > first  # the first save went with the trim
    assert await subject_counts(bus, state.subject) == {state.subject: 1}
    loaded = await state.load()
    assert (loaded.value, loaded.version) == ({"n": 2}, current)
    with pytest.raises(ConcurrencyConflict) as stale:
        await state.save({"n": 99}, version=first)
    assert stale.value.actual == current
    with pytest.raises(ConcurrencyConflict):
        await state.save({"n": 0}, version=0)
    after = await state.save({"n": 3}, version=current)
    assert (await state.load()).version == after and (await state.load()).value == {"n": 3}


async def test_a_redelivered_message_still_finds_its_recorded_steps_after_a_trim(bus: Bus, tmp_path: Path) -> None:
    """A handler records a step, and while its message waits for redelivery the log is
    archived and trimmed: the message and its step record stay (a delivery still pending holds
    the trim), the redelivery gets the recorded result without running the step again. Once the
    message is acknowledged, the next trim purges both."""
    await bus.prepare_agent("worker")
    await publish_notes(bus, 600)
    runs: list[int] = []
    attempts: list[int] = []
    trimmed = asyncio.Event()
    settled = asyncio.Event()

    def work() -> str:
        runs.append(1)
        return f"result {len(runs)}"

    async def handle(envelope: Envelope[Any], delivered: Delivery) -> None:
        ctx = Context(bus=bus, agent="worker", envelope=envelope, delivery=delivered)
        result = await ctx.step("work", work)
        attempts.append(delivered.attempt)
        if delivered.attempt == 1:
            await trimmed.wait()  # the trim runs while this delivery is pending
            raise RetryableError("try again after the trim")
        assert result == "result 1"
        settled.set()

    sent = await bus.send("worker", Note(text="do it"), sender="tester")
    step_subject = f"default.event.worker.step.{inbound_key(sent.envelope.id)}.0"
    async with bus.consumer("worker", handle):
        await wait_for(lambda: attempts == [1], timeout_s=60, what="the first attempt to record its step")
        await publish_notes(bus, 600, start=600)
        log_first = await archive_and_trim(bus, tmp_path)
        assert log_first > 600  # the notes before the message went
        assert log_first <= sent.ack.seq
        assert await subject_counts(bus, step_subject) == {step_subject: 1}
        trimmed.set()
        await asyncio.wait_for(settled.wait(), 60)
    assert attempts == [1, 2] and runs == [1]
    await publish_notes(bus, 10, start=1_200)
    after = await archive_and_trim(bus, tmp_path)
    assert after > sent.ack.seq and await subject_counts(bus, step_subject) == {}


def claude(bodies: list[dict[str, Any]]) -> AnthropicModel:
    """Claude over a faked HTTP transport: for a task "remember X" it appends X to the shared
    block and records a fact, then answers; otherwise it answers at once."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        bodies.append(body)
        last = body["messages"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(
            b.get("text", "") for b in last if isinstance(b, dict) and b.get("type") == "text")
        if "remember " in text:
            word = text.split("remember ", 1)[1].strip()
            content: list[dict[str, Any]] = [
                {"type": "tool_use", "id": f"toolu_{len(bodies)}a", "name": "core_memory_append",
                 "input": {"label": "shared", "text": word}},
                {"type": "tool_use", "id": f"toolu_{len(bodies)}b", "name": "archival_insert",
                 "input": {"subject": f"topic:{word}", "statement": f"{word} matters", "source": f"note-{word}",
                           "value": "increases"}},
            ]
            stop = "tool_use"
        else:
            content, stop = [{"type": "text", "text": "noted"}], "end_turn"
        return httpx2.Response(200, json={
            "id": f"msg_{len(bodies)}", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 100, "output_tokens": 10},
        })

    return AnthropicModel(AnthropicSettings(api_key="test-key", max_retries=0),
                          http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))


AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def context_hash(agent: LLMAgent) -> str:
    """The SHA-256 of the model request the agent's memory compiles to (a fixed clock)."""
    compiled = agent.compiler.compile(agent.memory, tools=agent.tool_specs(), now=AT)
    return hashlib.sha256(msgspec.json.encode(compiled.request)).hexdigest()


async def started(bus: Bus, bodies: list[dict[str, Any]]) -> Solo:
    agent = Solo(model=claude(bodies), model_name="claude-sonnet-5-5")
    await agent.on_start(bus)
    return agent


async def test_an_llm_agent_restarted_from_a_snapshot_after_a_trim_has_the_same_memory(bus: Bus, tmp_path: Path) -> None:
    """An LLM agent converses (block appends, facts, turns), snapshots its memory; the log is
    archived and trimmed, taking its early memory events; a new instance (a restart) loads the
    snapshot plus what follows and compiles the same context (hash) with the same blocks, facts
    and turns. Its next fenced block write succeeds on the kept last block record. Before the
    snapshot, a trim leaves every memory event in the log."""
    bodies: list[dict[str, Any]] = []
    agent = await started(bus, bodies)
    for word in ("alpha", "beta", "gamma"):
        envelope = bus.envelope(Note(text=f"remember {word}"), to="tester", sender="tester")
        await agent.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
    await agent.log.catch_up()
    before = context_hash(agent)
    turns_before = agent.memory.recall.total_turns
    await publish_notes(bus, 600)
    await archive_and_trim(bus, tmp_path)  # no snapshot yet: the memory is kept whole
    assert len([e async for e in read_range(bus, memory_filter(bus))
                if isinstance(e.envelope.payload, TurnRecorded)]) == turns_before
    position = await agent.log.snapshot()
    assert position == agent.log.position and (await load_snapshot(bus, "tester")) is not None
    await agent.on_stop()
    first_turn = await _first_turn_seq(bus)
    await publish_notes(bus, 1_200)
    await archive_and_trim(bus, tmp_path)
    left = [e async for e in read_range(bus, memory_filter(bus)) if isinstance(e.envelope.payload, TurnRecorded)]
    assert not left and first_turn < position  # every turn the snapshot holds went with the trim

    restarted = await started(bus, bodies)
    assert restarted.log.snapshot_position == position
    assert context_hash(restarted) == before
    assert restarted.memory.recall.total_turns == turns_before
    assert restarted.memory.blocks.get("shared").value == agent.memory.blocks.get("shared").value
    assert restarted.memory.facts.stats() == agent.memory.facts.stats()
    envelope = bus.envelope(Note(text="remember delta"), to="tester", sender="tester")
    await restarted.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
    await restarted.on_stop()
    assert restarted.memory.blocks.get("shared").value.endswith("delta")


async def _first_turn_seq(bus: Bus) -> int:
    async for stored in read_range(bus, memory_filter(bus)):
        if isinstance(stored.envelope.payload, TurnRecorded):
            return stored.seq
    raise AssertionError("no turn recorded")





async def test_duplicate_detection_holds_within_its_window_after_a_trim(bus: Bus, tmp_path: Path) -> None:
    """An envelope whose record was trimmed, sent again within the duplicate window, is still
    stored once: the server's duplicate window outlives a purge."""
    sent = await bus.send("keeper", Note(text="once"))
    await publish_notes(bus, 600)
    assert await archive_and_trim(bus, tmp_path) > sent.ack.seq
    last = await bus.last_seq()
    again = await bus.publish(sent.envelope)
    assert again.ack.duplicate and await bus.last_seq() == last


async def test_a_snapshot_too_large_for_one_message_is_recorded_in_parts_and_an_unfinished_one_is_skipped(
    bus: Bus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A snapshot larger than a part is recorded in several parts and loads whole; a snapshot a
    crash left without its last part is not used: the latest whole one before it is."""
    from agents.llm_agent import snapshot as snapshots
    from schemas.payloads import MemorySnapshotted

    bodies: list[dict[str, Any]] = []
    agent = await started(bus, bodies)
    for word in ("alpha", "beta"):
        envelope = bus.envelope(Note(text=f"remember {word}"), to="tester", sender="tester")
        await agent.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
    await agent.on_stop()
    await agent.log.catch_up()
    monkeypatch.setattr(snapshots, "PART_BYTES", 2_000)
    written = await snapshots.write_snapshot(bus, "tester", position=agent.log.position)
    assert written is not None
    parts = await subject_counts(bus, snapshots.snapshot_subject(bus, "tester"))
    assert sum(parts.values()) >= 3
    loaded = await load_snapshot(bus, "tester")
    assert loaded is not None and loaded.entries == written.entries and loaded.position == written.position
    assert [e.seq for e in loaded.entries] == sorted(e.seq for e in loaded.entries)
    # A crash after the first part of a newer snapshot.
    await bus.record("tester", MemorySnapshotted(agent="tester", snapshot_id="unfinished", position=written.position + 5,
                                                 part=0, parts=2, entries=[]))
    again = await load_snapshot(bus, "tester")
    assert again is not None and again.snapshot_id == written.snapshot_id and again.entries == written.entries


async def test_only_an_operators_credential_may_trim(secured: Secured, tmp_path: Path) -> None:
    """The projection service's and an agent's credentials are refused (PermissionDenied) both a
    trim and a purge of their own; the log is untouched."""
    from bus.errors import PermissionDenied
    from bus.identity import Role
    from bus.log_trim import purge_below

    settings = archive_all(tmp_path)
    async with Bus(secured.admin()) as admin:
        await publish_notes(admin, 600)
        await run_archive(admin, settings)
    await secured.reload()
    service = secured.config("projections", secured.registry.credential_path(Role.SERVICE, "projections"))
    agent = secured.agent("clerk")
    await secured.reload()
    for config in (service, agent):
        async with Bus(config) as refused:
            with pytest.raises(PermissionDenied):
                await run_trim(refused, settings, NOW)
            with pytest.raises(PermissionDenied):
                await purge_below(refused, refused.subjects.all, 500)
    async with Bus(secured.admin()) as admin:
        assert (await admin.log_bounds())[0] == 1
        assert (await run_trim(admin, settings, NOW)).purged >= 600


async def test_snapshots_are_written_as_memory_grows_and_the_interval_grows_with_the_snapshot(bus: Bus) -> None:
    """With `snapshot_every` small, an agent snapshots before a turn once its memory log grew by
    that much, and next only once it grew by as many sequences as the last snapshot holds."""
    from agents.llm_agent import snapshot as snapshots

    class Eager(Solo):
        snapshot_every = 4

    bodies: list[dict[str, Any]] = []
    agent = Eager(model=claude(bodies), model_name="claude-sonnet-5-5")
    await agent.on_start(bus)
    taken: list[tuple[int, int]] = []
    for word in ("a", "b", "c", "d", "e", "f"):
        envelope = bus.envelope(Note(text=f"remember {word}"), to="tester", sender="tester")
        await agent.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
        if not taken or taken[-1][0] != agent.log.snapshot_position:
            taken.append((agent.log.snapshot_position, agent.log.snapshot_entries))
    await agent.on_stop()
    taken = [t for t in taken if t[0]]
    assert len(taken) >= 2
    for (before, entries), (after, _) in zip(taken, taken[1:]):
        assert after - before >= max(Eager.snapshot_every, entries)
    latest = await snapshots.load_snapshot(bus, "tester")
    assert latest is not None and (latest.position, len(latest.entries)) == taken[-1]
