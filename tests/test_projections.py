"""The views: what each one shows for what is in the log, and that folding is deterministic."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import read_records, wait_for

from bus import Bus
from bus.log_reader import LogReader, LogRecord
from projections.batch import build_batch
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from projections.store import Store
from projections.views import VIEWS, ViewSpec, render
from projections.workload import append_batches, synthetic_log
from schemas import new_id, utcnow
from schemas.payloads import (
    AgentStarted,
    DeadLettered,
    DeliveryExpired,
    DeliveryReport,
    Note,
    Notice,
    Settlement,
    TaskCompleted,
    TaskRequested,
)


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


async def rows(bus: Bus, sql: str, *params: Any, min_seq: int | None = None) -> list[dict[str, Any]]:
    result = await bus.query(sql, list(params), min_seq=min_seq, timeout_s=10)
    return result.records()


async def raw_publish(bus: Bus, subject: str, data: bytes) -> int:
    """Store bytes as they are (no envelope checks) and return their stream sequence."""
    reply = await bus.transport.request(subject, data, headers={"Nats-Msg-Id": new_id()}, timeout_s=5)
    return int(msgspec.json.decode(reply.data)["seq"])


# -- events --------------------------------------------------------------------------------


async def test_events_view_keeps_every_record_even_unknown_and_undecodable(bus: Bus, service: ProjectionService) -> None:
    """Every stored message becomes an `events` row: a known kind, an unknown kind (payload kept
    as JSON), and bytes that are no envelope at all (kept in `raw`, with the decode error)."""
    conversation = new_id()
    sent = await bus.send("alice", Note(text="hello"), correlation_id=conversation)
    unknown = msgspec.json.encode({
        "id": new_id(), "sender": "martian", "to": "alice", "created_at": utcnow(),
        "payload": {"kind": "x.unknown", "depth": 3},
    })
    unknown_seq = await raw_publish(bus, bus.subjects.inbox("alice", "martian"), unknown)
    garbage_seq = await raw_publish(bus, bus.subjects.inbox("alice", "martian"), b"\x00not an envelope")

    events = await rows(bus, "SELECT * FROM events ORDER BY seq", min_seq=garbage_seq)

    assert [e["seq"] for e in events] == [sent.ack.seq, unknown_seq, garbage_seq]
    first, second, third = events
    assert (first["kind"], first["sender"], first["recipient"], first["category"]) == ("note", "tester", "alice", "inbox")
    assert first["id"] == sent.envelope.id and first["correlation_id"] == conversation
    assert first["payload"] == {"kind": "note", "text": "hello", "data": {}}
    assert first["stored_at"] is not None and first["error"] is None
    assert second["kind"] == "x.unknown" and second["payload"] == {"kind": "x.unknown", "depth": 3}
    assert third["kind"] is None and third["payload"] is None
    assert "invalid envelope" in third["error"]
    raw = await rows(bus, "SELECT raw FROM events WHERE seq = ?", garbage_seq)
    assert raw[0]["raw"]  # the bytes are kept (base64 on the wire)


# -- messages ------------------------------------------------------------------------------


async def test_messages_view_follows_each_envelope_through_its_lifecycle(bus: Bus, service: ProjectionService) -> None:
    """`messages` shows sent, delivered n times, handled (by whom), failed, dead-lettered and
    expired, from delivery reports, dead letters and expiry records about the envelopes."""
    retried = await bus.send("bob", TaskRequested(title="flaky"))
    broadcast = await bus.broadcast("team", Notice(text="all hands"))
    doomed = await bus.send("bob", TaskRequested(title="poison"))
    stale = await bus.send("bob", Note(text="too late"), expires_in_s=0.001)
    pending = await bus.send("bob", Note(text="not yet"))
    await bus.record("bob", DeliveryReport(agent="bob", consumer="bob__inbox", settlements=[
        Settlement(stream_seq=retried.ack.seq, attempt=1, outcome="retried", error="TimeoutError: slow"),
        Settlement(stream_seq=doomed.ack.seq, attempt=1, outcome="retried", error="ValueError: bad"),
    ]))
    await bus.record("bob", DeliveryReport(agent="bob", consumer="bob__inbox", settlements=[
        Settlement(stream_seq=retried.ack.seq, attempt=2, outcome="handled", handler_ms=12.5),
        Settlement(stream_seq=doomed.ack.seq, attempt=2, outcome="dead_lettered", error="ValueError: bad"),
    ]))
    for agent in ("bob", "carol"):
        await bus.record(agent, DeliveryReport(agent=agent, consumer=f"{agent}__groups", settlements=[
            Settlement(stream_seq=broadcast.ack.seq, attempt=1, outcome="handled", handler_ms=1.0),
        ]))
    await bus.publish(bus.envelope(DeadLettered(
        reason="exhausted", agent="bob", consumer="bob__inbox", original_subject=bus.subject_for(doomed.envelope),
        original_seq=doomed.ack.seq, original=bus.codec.encode(doomed.envelope), deliveries=2,
        original_id=doomed.envelope.id, original_kind="task.requested", error="ValueError: bad",
    ), sender="bob"), bus.subjects.dead("bob"))
    last = await bus.record("bob", DeliveryExpired(
        agent="bob", original_id=stale.envelope.id, original_kind="note", original_seq=stale.ack.seq,
        expired_at=stale.envelope.expires_at,
    ))

    by_id = {m["id"]: m for m in await rows(bus, "SELECT * FROM messages", min_seq=last.ack.seq)}

    assert len(by_id) == 5  # reports, dead letters and expiries are facts about messages, not messages
    m = by_id[retried.envelope.id]
    assert (m["status"], m["deliveries"], m["max_attempt"], m["failures"]) == ("handled", 2, 2, 1)
    assert m["handled_by"] == ["bob"] and m["handler_ms"] == 12.5 and m["last_error"] == "TimeoutError: slow"
    assert m["handled_ms"] > 0 and m["settled_ms"] >= m["handled_ms"] - 1e-6 and m["publish_ms"] >= 0
    m = by_id[broadcast.envelope.id]
    assert (m["status"], m["deliveries"], m["handled_by"], m["tag"]) == ("handled", 2, ["bob", "carol"], "team")
    m = by_id[doomed.envelope.id]
    assert (m["status"], m["failures"], m["dead_reason"]) == ("dead_lettered", 2, "exhausted")
    assert m["dead_lettered_at"] is not None and m["handled_by"] == []
    m = by_id[stale.envelope.id]
    assert m["status"] == "expired" and m["expired_at"] is not None and m["deliveries"] == 0
    m = by_id[pending.envelope.id]
    assert (m["status"], m["deliveries"], m["status_at"]) == ("sent", 0, m["stored_at"])


async def test_a_later_retry_does_not_undo_a_terminal_status(bus: Bus, service: ProjectionService) -> None:
    """Once handled, a message stays handled even if another consumer later reports a retry."""
    sent = await bus.broadcast("team", Notice(text="hi"))
    await bus.record("bob", DeliveryReport(agent="bob", consumer="bob__groups", settlements=[
        Settlement(stream_seq=sent.ack.seq, attempt=1, outcome="handled")]))
    last = await bus.record("carol", DeliveryReport(agent="carol", consumer="carol__groups", settlements=[
        Settlement(stream_seq=sent.ack.seq, attempt=1, outcome="retried", error="busy")]))

    [m] = await rows(bus, "SELECT status, deliveries, failures, last_error FROM messages", min_seq=last.ack.seq)

    assert m == {"status": "handled", "deliveries": 2, "failures": 1, "last_error": "busy"}


# -- agents, dead letters, conversations ----------------------------------------------------


async def test_agents_view_lists_names_tags_and_when_they_were_seen(bus: Bus, service: ProjectionService) -> None:
    """Every name that sends, is sent to, or records events is an agent; tags come from the
    latest event declaring them; first/last seen follow the log's timestamps."""
    first = await bus.send("bob", Note(text="hi"), sender="alice")
    await bus.record("bob", AgentStarted(agent="bob", pid=10, tags=["team", "ops"]))
    await bus.record("bob", AgentStarted(agent="bob", pid=11, tags=["team"]))
    last = await bus.send("alice", Note(text="back"), sender="bob")

    agents = {a["name"]: a for a in await rows(bus, "SELECT * FROM agents", min_seq=last.ack.seq)}

    assert set(agents) == {"alice", "bob"}
    alice, bob = agents["alice"], agents["bob"]
    assert (alice["messages_sent"], alice["messages_received"], alice["tags"]) == (1, 1, [])
    assert (bob["messages_sent"], bob["messages_received"], bob["events_recorded"]) == (1, 1, 2)
    assert bob["tags"] == ["team"] and bob["lifecycle"] == "agent.started"
    assert alice["first_seen"] <= bob["first_seen"] <= bob["last_seen"]
    assert alice["last_seen"] < bob["last_seen"]
    stored = await rows(bus, "SELECT stored_at FROM events WHERE seq = ?", first.ack.seq, min_seq=last.ack.seq)
    assert alice["first_seen"] == stored[0]["stored_at"]


async def test_dead_letters_view_keeps_reason_attempts_and_the_original(bus: Bus, service: ProjectionService) -> None:
    """A dead letter shows why, after how many attempts, and the exact original envelope."""
    original = bus.envelope(TaskRequested(title="never"), to="bob")
    sent = await bus.publish(original)
    letter = await bus.publish(bus.envelope(DeadLettered(
        reason="permanent", agent="bob", consumer="bob__inbox", original_subject=bus.subject_for(original),
        original_seq=sent.ack.seq, original=bus.codec.encode(original), deliveries=1,
        original_id=original.id, original_kind="task.requested", error="PermanentError: no",
    ), sender="bob", correlation_id=original.correlation_id), bus.subjects.dead("bob"))

    [dead] = await rows(bus, "SELECT * FROM dead_letters", min_seq=letter.ack.seq)

    assert (dead["reason"], dead["attempts"], dead["agent"], dead["error"]) == ("permanent", 1, "bob", "PermanentError: no")
    assert (dead["original_seq"], dead["original_id"], dead["original_kind"]) == (sent.ack.seq, original.id, "task.requested")
    assert dead["original_envelope"]["payload"] == {"kind": "task.requested", "title": "never", "input": {}}
    assert dead["correlation_id"] == original.correlation_id


async def test_conversations_view_orders_the_causal_chain(bus: Bus, service: ProjectionService) -> None:
    """Per correlation id, the steps in log order, each with the step (and sender) that caused it."""
    ask = await bus.send("bob", TaskRequested(title="research"), sender="alice")
    corr = ask.envelope.correlation_id
    delegate = await bus.send("carol", TaskRequested(title="dig"), sender="bob",
                              correlation_id=corr, causation_id=ask.envelope.id)
    found = await bus.send("bob", TaskCompleted(task_id=delegate.envelope.id), sender="carol",
                           correlation_id=corr, causation_id=delegate.envelope.id)
    await bus.send("dave", Note(text="unrelated"))
    done = await bus.send("alice", TaskCompleted(task_id=ask.envelope.id), sender="bob",
                          correlation_id=corr, causation_id=found.envelope.id)

    chain = await rows(bus, "SELECT step, sender, recipient, kind, caused_by, cause_kind, cause_seq "
                            "FROM conversations WHERE correlation_id = ? ORDER BY step", corr, min_seq=done.ack.seq)

    assert [(c["step"], c["sender"], c["recipient"], c["caused_by"]) for c in chain] == [
        (1, "alice", "bob", None), (2, "bob", "carol", "alice"), (3, "carol", "bob", "bob"), (4, "bob", "alice", "carol"),
    ]
    assert chain[1]["cause_kind"] == "task.requested" and chain[3]["cause_seq"] == found.ack.seq


# -- determinism ---------------------------------------------------------------------------


def _fold(path: Path, records: list[LogRecord], sizes: list[int], views: tuple[ViewSpec, ...] = VIEWS) -> dict[str, str]:
    store = Store(path, stream="CONTINUUM_DEFAULT", views=views)
    store.open()
    try:
        at = 0
        for size in sizes:
            if at >= len(records):
                break
            store.apply(build_batch(records[at:at + size]))
            at += size
        assert at >= len(records) and store.applied_seq == records[-1].seq
        return store.content_hashes()
    finally:
        store.close()


async def test_folding_does_not_depend_on_batch_boundaries(bus: Bus, tmp_path: Path) -> None:
    """The same log folded in one batch, in tiny batches, and in random ones (replays of records
    already applied included) gives identical tables: folds are pure and batch-associative."""
    last = await append_batches(bus, list(synthetic_log(bus, 1500, seed=7)))
    records = await read_records(bus, last)
    rng = random.Random(7)

    whole = _fold(tmp_path / "whole.duckdb", records, [len(records)])
    tiny = _fold(tmp_path / "tiny.duckdb", records, [7] * (len(records) // 7 + 1))
    uneven = _fold(tmp_path / "uneven.duckdb", records, [rng.randrange(1, 400) for _ in range(len(records))])

    assert whole == tiny == uneven
    assert int(whole["events.events"].split(":")[0]) == 1500
    assert int(whole["messages.messages"].split(":")[0]) > 500


async def test_records_at_or_below_the_checkpoint_are_skipped(bus: Bus, tmp_path: Path) -> None:
    """Applying a batch again (a reader that re-delivers) changes nothing: exactly-once application."""
    last = await append_batches(bus, list(synthetic_log(bus, 300, seed=3)))
    records = await read_records(bus, last)
    store = Store(tmp_path / "views.duckdb", stream="CONTINUUM_DEFAULT")
    store.open()
    try:
        store.apply(build_batch(records[:200]))
        once = store.content_hashes()
        again = store.apply(build_batch(records[100:200]))
        assert again.events == 0 and store.content_hashes() == once
        store.apply(build_batch(records[150:]))
        assert store.applied_seq == last
        assert store.con.execute("SELECT count(*), count(DISTINCT seq) FROM events").fetchall() == [(300, 300)]
    finally:
        store.close()


async def test_an_event_a_view_cannot_fold_is_kept_with_the_reason(bus: Bus, tmp_path: Path) -> None:
    """An event that makes a view's fold fail is isolated (the rest of its batch is applied),
    skipped by that view only, recorded with the reason in `_continuum.fold_errors`, counted and
    shown by status; it never stops the views."""
    picky = ViewSpec(
        name="picky", version=1, tables="CREATE TABLE {s}.numbers (seq BIGINT, n INTEGER)",
        relations={"numbers": "SELECT * FROM {s}.numbers"},
        fold=lambda tx, s, batch: tx.run(render(
            "INSERT INTO {s}.numbers SELECT seq, CAST(payload->>'text' AS INTEGER) FROM batch "
            "WHERE kind = 'note' AND error IS NULL", s)),
    )
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    async with ProjectionService(bus, settings, views=(*VIEWS, picky)) as service:
        await bus.send("bob", Note(text="1"))
        bad = await bus.send("bob", Note(text="one"))
        last = await bus.send("bob", Note(text="3"))

        numbers = await rows(bus, "SELECT n FROM numbers ORDER BY seq", min_seq=last.ack.seq)
        [failure] = await rows(bus, "SELECT * FROM _continuum.fold_errors")
        status = await service.status()

        assert [r["n"] for r in numbers] == [1, 3]
        assert (failure["view"], failure["seq"]) == ("picky", bad.ack.seq)
        assert "Could not convert string 'one'" in failure["error"]
        assert service.metrics.poisoned._value.get() == 1 and status.fold_errors == {"picky": 1}
        assert len(await rows(bus, "SELECT * FROM messages")) == 3  # the other views fold it


# -- integrity -----------------------------------------------------------------------------


async def test_integrity_view_reports_missing_and_forked_chain_links(bus: Bus, service: ProjectionService) -> None:
    """A fenced chain that is intact shows nothing; an event whose Bus-Prev-Seq points past what
    the views saw is `missing`, one pointing before the agent's last event is a `fork`."""
    one = await bus.record("alice", Note(text="1"), expected_seq=0)
    two = await bus.record("alice", Note(text="2"), expected_seq=one.ack.seq)
    await bus.record("alice", Note(text="unfenced"))
    forged_gap = bus.envelope(Note(text="after a lost one"), sender="alice", headers={"Bus-Prev-Seq": str(two.ack.seq + 50)})
    gap = await bus.publish(forged_gap, bus.subjects.event("alice", "note"))
    forged_fork = bus.envelope(Note(text="rewritten"), sender="alice", headers={"Bus-Prev-Seq": str(one.ack.seq)})
    fork = await bus.publish(forged_fork, bus.subjects.event("alice", "note"))
    fine = await bus.record("bob", Note(text="own chain"), expected_seq=0)

    problems = await rows(bus, "SELECT * FROM integrity ORDER BY seq", min_seq=fine.ack.seq)

    assert [(p["seq"], p["problem"], p["agent"]) for p in problems] == [(gap.ack.seq, "missing", "alice"), (fork.ack.seq, "fork", "alice")]
    assert (problems[0]["claimed_prev"], problems[0]["seen_prev"]) == (two.ack.seq + 50, two.ack.seq + 1)
    assert (problems[1]["claimed_prev"], problems[1]["seen_prev"]) == (one.ack.seq, gap.ack.seq)
    assert problems[0]["chain"] == "default.event.alice.>"
    assert service.metrics.integrity_violations._value.get() == 2
    status = await service.status()
    assert status.integrity == {"fork": 1, "missing": 1}


async def test_a_narrower_fence_is_checked_on_its_own_subject(bus: Bus, service: ProjectionService) -> None:
    """With `fence`, Bus-Prev-Seq refers to the fenced subject only (heartbeats in between are not
    gaps); a forged link on that subject is still caught."""
    state = bus.subjects.event("alice", "note")
    one = await bus.record("alice", Note(text="s1"), expected_seq=0, fence=state)
    await bus.record("alice", TaskRequested(title="other kind, other subject"))
    two = await bus.record("alice", Note(text="s2"), expected_seq=one.ack.seq, fence=state)
    await bus.record("alice", TaskRequested(title="more noise"))
    # A writer that passes the server's check (it read the right head) but claims another link:
    forged = bus.envelope(Note(text="s3"), sender="alice", headers={"Bus-Prev-Seq": str(one.ack.seq)})
    bad = await bus.publish(forged, state, expected_last_subject_seq=two.ack.seq, expected_last_subject=state)

    problems = await rows(bus, "SELECT seq, problem, chain, claimed_prev, seen_prev FROM integrity", min_seq=bad.ack.seq)

    assert problems == [{"seq": bad.ack.seq, "problem": "fork", "chain": state, "claimed_prev": one.ack.seq, "seen_prev": two.ack.seq}]


async def test_a_hole_in_the_log_is_a_stream_gap(bus: Bus, tmp_path: Path) -> None:
    """Sequences that never reach the views (a record lost from the middle of the log) are
    reported as a `stream_gap` naming the missing range."""
    last = await append_batches(bus, list(synthetic_log(bus, 50, seed=1)))
    records = await read_records(bus, last)
    holed = records[:20] + records[23:]
    store = Store(tmp_path / "views.duckdb", stream="CONTINUUM_DEFAULT")
    store.open()
    try:
        store.apply(build_batch(holed[:30]))
        store.apply(build_batch(holed[30:]))
        gaps = store.con.execute("SELECT seq, problem, claimed_prev, seen_prev FROM integrity").fetchall()
    finally:
        store.close()
    assert (24, "stream_gap", 21, 23) in gaps
    # Agent chains that ran through the hole are broken too, and say so:
    assert all(problem == "missing" and 21 <= claimed <= 23 for _, problem, claimed, _ in gaps if problem != "stream_gap")


# -- new and changed views ------------------------------------------------------------------


async def test_a_new_or_changed_view_is_built_from_the_log_while_the_others_serve(bus: Bus, tmp_path: Path) -> None:
    """Adding a view module (or bumping its VERSION) makes the next service build it from seq 1
    in the background; the other views keep their checkpoint and keep answering."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    without = tuple(v for v in VIEWS if v.name != "dead_letters")
    async with ProjectionService(bus, settings, views=without):
        last = await append_batches(bus, list(synthetic_log(bus, 2000, seed=2)))
        await bus.query("SELECT 1", min_seq=last)
    # The new version of `conversations` has another table shape: its fold cannot run on the
    # old tables, which keep serving (frozen) until the new ones are swapped in.
    old = next(v for v in VIEWS if v.name == "conversations")
    new_version = dataclasses.replace(
        old, version=old.version + 1,
        tables=old.tables.replace("causation_id   VARCHAR", "causation_id   VARCHAR,\n    subject VARCHAR"),
        fold=lambda tx, s, batch: tx.run(render(
            "INSERT INTO {s}.chain SELECT correlation_id, seq, stored_at, id, kind, sender, recipient, tag, "
            "split_part(subject, '.', 2), causation_id, subject FROM batch WHERE error IS NULL "
            "AND correlation_id IS NOT NULL AND kind IS DISTINCT FROM 'delivery.report'", s)),
    )
    changed = tuple(new_version if v.name == "conversations" else v for v in VIEWS)
    async with ProjectionService(bus, settings, views=changed) as service:
        assert (await bus.query("SELECT count(*) FROM events")).rows == [[2000]]  # served at once

        async def built() -> bool:
            status = await service.status()
            return not status.rebuilding and {v.view for v in status.views if v.state == "active"} >= {"dead_letters", "conversations"}

        await wait_for(built, what="the new and the changed view to be built")
        status = await service.status()
        gens = {v.view: (v.generation, v.version, v.applied_seq) for v in status.views}
        assert gens["dead_letters"][2] == gens["events"][2] == last
        assert gens["conversations"][:3] == (2, new_version.version, last)
        dead = await rows(bus, "SELECT count(*) AS n FROM dead_letters")
        expected = await rows(bus, "SELECT count(*) AS n FROM events WHERE kind = 'delivery.dead_lettered'")
        assert dead == expected and dead[0]["n"] > 0
        more = await bus.send("bob", Note(text="after the swap"))
        steps = await rows(bus, "SELECT count(*) AS n, count(subject) AS with_subject FROM v_conversations_2.chain",
                           min_seq=more.ack.seq)
        assert steps[0]["n"] == steps[0]["with_subject"] > 0


async def test_the_reader_starts_over_without_loss_when_its_consumer_goes_away(bus: Bus) -> None:
    """If the server drops the reader's consumer mid-stream (restart, deletion), the reader makes
    a new one after the last sequence it delivered: every sequence exactly once, in order."""
    last = await append_batches(bus, list(synthetic_log(bus, 20_000, seed=8)))
    seqs: list[int] = []
    async with LogReader(bus, start_seq=1, heartbeat_s=0.3) as reader:
        seqs += [r.seq for r in await reader.read(100)]
        await bus.js.delete_consumer(bus.subjects.stream, reader._consumer)
        while seqs[-1] < last:
            seqs += [r.seq for r in await reader.read(500)]
        assert reader.restarts >= 1
    assert seqs == list(range(1, last + 1))


async def test_when_every_view_changed_the_old_ones_serve_until_the_swap(bus: Bus, tmp_path: Path) -> None:
    """With every VERSION bumped, the old views answer (frozen) while the new ones are built;
    events stored meanwhile are in the new views after the swap."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    async with ProjectionService(bus, settings):
        last = await append_batches(bus, list(synthetic_log(bus, 1500, seed=3)))
        await bus.query("SELECT 1", min_seq=last)
    bumped = tuple(dataclasses.replace(v, version=v.version + 1) for v in VIEWS)
    async with ProjectionService(bus, settings, views=bumped) as service:
        assert (await bus.query("SELECT count(*) FROM events")).rows == [[1500]]
        during = await bus.send("bob", Note(text="while rebuilding"))

        async def swapped() -> bool:
            status = await service.status()
            wanted = {spec.name: spec.version for spec in bumped}
            return not status.rebuilding and all(v.version == wanted[v.view] for v in status.views)

        await wait_for(swapped, what="every view to be rebuilt and swapped")
        result = await bus.query("SELECT count(*) FROM events WHERE seq = ?", [during.ack.seq], min_seq=during.ack.seq)
    assert result.rows == [[1]]
