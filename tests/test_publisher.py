"""Group-commit publishing against a real nats-server: sequences, order, dedup, optimistic
concurrency, failures, cancellation, shutdown, connections cut mid-batch (through a relay), and
the transport seam (frames and acks on bus.wire, no nats-py internals)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from bus.identity import load_credential
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from bus import Bus, BusConfig, BusUnavailable, ConcurrencyConflict, ConfigurationError, PublisherSettings, Sent
from bus.config import StreamSettings
from bus.metrics import BusMetrics
from bus.publisher import Publisher
from bus.server import ANY_PORT, EmbeddedServer, ServerSettings
from bus.subjects import Subjects
from bus.topology import ensure_stream, log_stream_config
from bus.wire import WireConnection, WireSettings, parse_urls
from schemas import new_id
from schemas.payloads import Note

from conftest import seed_of, wait_for


def _sample(bus: Bus, name: str) -> float:
    value = bus.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def _commits(bus: Bus) -> tuple[float, float]:
    """(commits, messages committed) from the batch-size histogram."""
    return (
        _sample(bus, "continuum_publish_batch_size_count"),
        _sample(bus, "continuum_publish_batch_size_sum"),
    )


async def _stored(bus: Bus) -> list[tuple[int, str | None, str]]:
    """Every message in the log as (seq, Nats-Msg-Id, subject), in stream order."""
    last = await bus.last_seq()

    async def one(seq: int) -> tuple[int, str | None, str]:
        msg = await bus.js.get_msg(bus.subjects.stream, seq=seq, direct=True)
        return seq, (msg.headers or {}).get("Nats-Msg-Id"), msg.subject or ""

    out: list[tuple[int, str | None, str]] = []
    for start in range(1, last + 1, 200):
        out += await asyncio.gather(*(one(s) for s in range(start, min(last, start + 199) + 1)))
    return out


@contextlib.asynccontextmanager
async def _publisher_on(
    url: str, nc: NATS, subjects: Subjects, settings: PublisherSettings, credentials: str | None = None,
) -> AsyncIterator[tuple[Publisher, WireConnection]]:
    """A Publisher on a WireConnection of its own to `url` (kept alive by a task this helper
    owns), reading back through `nc`'s JetStream API, as a Bus would build it."""
    credential = load_credential(credentials) if credentials is not None else None
    conn = WireConnection(parse_urls(url), name="publisher-test",
                          settings=WireSettings(reconnect_wait_s=0.05, credential=credential))
    await conn.connect()
    keeper = asyncio.get_running_loop().create_task(conn.run())
    try:
        async with Publisher(
            conn, nc.jetstream(), subjects=subjects, settings=settings, metrics=BusMetrics(CollectorRegistry())
        ) as publisher:
            yield publisher, conn
    finally:
        await conn.close()
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def _publish_all(bus: Bus, envelopes: list[Any]) -> list[Sent | BaseException]:
    """Fire one publish per envelope, in list order, all concurrently."""
    return await asyncio.gather(*(bus.publish(e) for e in envelopes), return_exceptions=True)


async def test_concurrent_publishes_get_the_sequences_they_are_stored_at(bus: Bus) -> None:
    """Thousands of concurrent publishes (several full batches) are all acked, each with its
    own sequence, which is where the server stored that very envelope; the stored order is
    the order they were fired in."""
    envelopes = [bus.envelope(Note(text=f"n{i}"), to="alice") for i in range(2500)]
    results = await _publish_all(bus, envelopes)
    assert all(isinstance(r, Sent) for r in results), [r for r in results if not isinstance(r, Sent)][:3]
    seqs = [r.ack.seq for r in results]  # type: ignore[union-attr]
    assert len(set(seqs)) == len(seqs)
    stored = await _stored(bus)
    by_seq = {seq: msg_id for seq, msg_id, _ in stored}
    assert all(by_seq[r.ack.seq] == r.envelope.id for r in results)  # type: ignore[union-attr]
    assert [msg_id for _, msg_id, _ in stored] == [e.id for e in envelopes]


async def test_concurrent_publishes_are_group_committed(bus: Bus) -> None:
    """Under concurrency, messages share commits: far fewer commits than messages, and the
    published counter counts every stored message once."""
    before_commits, before_messages = _commits(bus)
    results = await asyncio.gather(*(bus.send("alice", Note(text=f"m{i}")) for i in range(500)))
    commits, messages = _commits(bus)
    assert messages - before_messages == 500
    assert commits - before_commits <= 10
    assert bus.metrics.registry.get_sample_value("continuum_published_total", {"subject_class": "inbox"}) == 500
    assert len({r.ack.seq for r in results}) == 500


async def test_a_lone_publish_is_a_plain_request(bus: Bus) -> None:
    """A publish with nothing else queued goes out at once, alone (a commit of one), and the
    latency histogram records it."""
    sent = await bus.send("alice", Note(text="alone"))
    assert _commits(bus) == (1.0, 1.0)
    assert _sample(bus, "continuum_publish_seconds_count") == 1
    msg = await bus.js.get_msg(bus.subjects.stream, seq=sent.ack.seq)
    assert "Nats-Batch-Id" not in (msg.headers or {})


async def test_each_tasks_awaited_publishes_are_stored_in_its_order(bus: Bus) -> None:
    """Tasks that each await one publish after another, all at once, see their messages
    stored in the order they published them, and share commits."""
    sent: dict[int, list[str]] = {n: [] for n in range(20)}

    async def writer(n: int) -> None:
        for i in range(30):
            result = await bus.send(f"w{n}", Note(text=f"{n}-{i}"))
            sent[n].append(result.envelope.id)

    async with asyncio.TaskGroup() as group:
        for n in range(20):
            group.create_task(writer(n))
    stored = await _stored(bus)
    for n, ids in sent.items():
        assert [m for _, m, subject in stored if subject.startswith(f"default.inbox.w{n}.")] == ids
    assert _commits(bus)[0] <= 300  # 600 messages, at least two per commit on average


async def test_one_tasks_publishes_keep_their_order_around_a_fenced_append(bus: Bus) -> None:
    """Publishes fired in order by one task are stored in that order, including a fenced
    (expected-sequence) append in the middle, which travels as its own commit."""
    first = await bus.record("alice", Note(text="v1"), expected_seq=0)
    before = await bus.last_seq()

    async def fenced() -> Sent:
        return await bus.record("alice", Note(text="v2"), expected_seq=first.ack.seq)

    plain_before = [bus.envelope(Note(text=f"a{i}"), to="bob") for i in range(50)]
    plain_after = [bus.envelope(Note(text=f"b{i}"), to="bob") for i in range(50)]
    commits_before = _commits(bus)
    results = await asyncio.gather(
        *(bus.publish(e) for e in plain_before), fenced(), *(bus.publish(e) for e in plain_after)
    )
    commits, messages = _commits(bus)
    assert (commits - commits_before[0], messages - commits_before[1]) == (3, 101)  # batch, alone, batch
    fenced_sent = results[50]
    stored = [s for s in await _stored(bus) if s[0] > before]
    expected = [e.id for e in plain_before] + [fenced_sent.envelope.id] + [e.id for e in plain_after]
    assert [msg_id for _, msg_id, _ in stored] == expected


async def test_same_id_twice_in_one_batch_is_sent_once(bus: Bus) -> None:
    """The same envelope published twice in one forming batch is stored once; both callers get
    its sequence, the later one marked duplicate."""
    twice = bus.envelope(Note(text="twice"), to="alice")
    others = [bus.envelope(Note(text=f"o{i}"), to="alice") for i in range(20)]
    results = await _publish_all(bus, [others[0], twice, *others[1:10], twice, *others[10:]])
    assert _commits(bus) == (1, 21)  # one batch, the repeat not in it
    acks = [r.ack for r in results]  # type: ignore[union-attr]
    assert acks[1].seq == acks[11].seq
    assert (acks[1].duplicate, acks[11].duplicate) == (False, True)
    stored = await _stored(bus)
    assert [m for _, m, _ in stored].count(twice.id) == 1
    assert len(stored) == 21
    assert _sample(bus, "continuum_publish_duplicates_total") == 1


async def test_duplicate_of_an_earlier_message_inside_a_batch(bus: Bus) -> None:
    """A batch holding an id stored earlier is rejected whole by the server (10201); it is
    recovered so that the duplicate gets the original sequence and every other message is
    stored once, in the order fired, with the sequence its caller got."""
    old = bus.envelope(Note(text="old"), to="alice")
    original = await bus.publish(old)
    fresh = [bus.envelope(Note(text=f"f{i}"), to="alice") for i in range(30)]
    results = await _publish_all(bus, [*fresh[:15], old, *fresh[15:]])
    assert all(isinstance(r, Sent) for r in results)
    dup = results[15].ack  # type: ignore[union-attr]
    assert dup.duplicate and dup.seq == original.ack.seq
    stored = await _stored(bus)
    assert [m for _, m, _ in stored] == [old.id] + [e.id for e in fresh]
    by_seq = {seq: m for seq, m, _ in stored}
    assert all(by_seq[r.ack.seq] == r.envelope.id for r in results)  # type: ignore[union-attr]


async def test_stale_fenced_append_fails_alone(bus: Bus) -> None:
    """A stale expected-sequence append raises ConcurrencyConflict to its caller only; the
    other messages published with it, including a correct fenced append, are stored."""
    first = await bus.record("carol", Note(text="v1"), expected_seq=0)

    async def stale() -> Sent:
        return await bus.record("carol", Note(text="stale"), expected_seq=0)

    async def current() -> Sent:
        return await bus.record("carol", Note(text="v2"), expected_seq=first.ack.seq)

    sends = [bus.send("alice", Note(text=f"s{i}")) for i in range(40)]
    results = await asyncio.gather(*sends[:20], current(), stale(), *sends[20:], return_exceptions=True)
    conflict = results[21]
    assert isinstance(conflict, ConcurrencyConflict)
    assert conflict.expected == 0 and conflict.actual == results[20].ack.seq  # type: ignore[union-attr]
    others = [r for i, r in enumerate(results) if i != 21]
    assert all(isinstance(r, Sent) for r in others)
    stored_ids = {m for _, m, _ in await _stored(bus)}
    assert {r.envelope.id for r in others} <= stored_ids  # type: ignore[union-attr]
    assert _sample(bus, "continuum_occ_conflicts_total") == 1


async def test_resent_fenced_append_is_recognised_as_stored(bus: Bus) -> None:
    """Re-publishing a fenced append that was already stored (same id, same expected
    sequence) returns its original sequence as a duplicate instead of a false conflict."""
    envelope = bus.envelope(Note(text="once"), sender="dave")
    subject = bus.subjects.event("dave", envelope.kind)
    fence = {"expected_last_subject_seq": 0, "expected_last_subject": bus.subjects.event_filter("dave")}
    first = await bus.publish(envelope, subject, **fence)
    again = await bus.publish(envelope, subject, **fence)
    assert again.ack.seq == first.ack.seq and again.ack.duplicate
    assert _sample(bus, "continuum_occ_conflicts_total") == 0


async def test_message_no_stream_captures_fails_alone(bus: Bus) -> None:
    """A message to a subject outside every stream, published in a batch, fails alone with a
    clear error; its batch-mates are stored."""
    envelopes = [bus.envelope(Note(text=f"x{i}"), to="alice") for i in range(10)]
    stray = bus.envelope(Note(text="stray"), to="alice")
    results = await asyncio.gather(
        *(bus.publish(e) for e in envelopes[:5]),
        bus.publish(stray, "nowhere.at.all"),
        *(bus.publish(e) for e in envelopes[5:]),
        return_exceptions=True,
    )
    assert isinstance(results[5], BusUnavailable) and "no stream captures" in str(results[5])
    kept = [r for i, r in enumerate(results) if i != 5]
    assert all(isinstance(r, Sent) for r in kept)
    assert [m for _, m, _ in await _stored(bus)] == [e.id for e in envelopes]


async def test_batch_rejected_as_a_whole_gives_every_caller_the_servers_reason(
    nats_server: EmbeddedServer, admin_credentials: str,
) -> None:
    """On a stream without atomic batches, a lone publish and a unit smaller than
    min_atomic_batch (pipelined plain requests) are stored, and the callers of a batch get
    BusUnavailable carrying the server's reason."""
    subjects = Subjects("plain")
    nc = await nats.connect(nats_server.url, nkeys_seed_str=seed_of(admin_credentials))
    try:
        config = log_stream_config(subjects, StreamSettings())
        config.allow_atomic = False
        await ensure_stream(nc.jetstream(), config)
        async with _publisher_on(nats_server.url, nc, subjects, PublisherSettings(), admin_credentials) as (publisher, _):
            subject = subjects.inbox("alice", "tester")
            alone = await publisher.publish(subject, b"{}", msg_id=new_id())
            small = await asyncio.gather(*(publisher.publish(subject, b"{}", msg_id=new_id()) for _ in range(5)))
            results = await asyncio.gather(
                *(publisher.publish(subject, b"{}", msg_id=new_id()) for _ in range(40)), return_exceptions=True
            )
        assert alone.seq == 1
        assert [ack.seq for ack in small] == [2, 3, 4, 5, 6]
        assert all(isinstance(r, BusUnavailable) and "atomic publish is disabled" in str(r) for r in results)
    finally:
        await nc.close()


async def test_bad_input_is_refused_before_sending(bus: Bus) -> None:
    """A header that would corrupt the protocol, or a message over the server's size limit, is
    refused with ConfigurationError; nothing is stored and the publisher keeps working."""
    envelope = bus.envelope(Note(text="x"), to="alice", headers={})
    with pytest.raises(ConfigurationError, match="header"):
        await bus.publisher.publish("default.inbox.alice.t", b"{}", msg_id=new_id(), headers={"Bad Key": "v"})
    with pytest.raises(ConfigurationError, match="line break"):
        await bus.publisher.publish("default.inbox.alice.t", b"{}", msg_id=new_id(), headers={"K": "a\r\nb"})
    with pytest.raises(ConfigurationError, match="max_payload"):
        await bus.publisher.publish("default.inbox.alice.t", b"x" * (bus.max_payload + 1), msg_id=new_id())
    with pytest.raises(ConfigurationError, match="subject"):
        await bus.publisher.publish("default.inbox.alice t", b"{}", msg_id=new_id())
    assert await bus.last_seq() == 0
    assert (await bus.publish(envelope)).ack.seq == 1


@pytest.fixture
async def paused_bus(nats_server: EmbeddedServer, admin_credentials: str) -> AsyncIterator[tuple[Bus, EmbeddedServer]]:
    """A bus whose publisher has one commit slot, over a server the test may pause."""
    config = BusConfig(url=nats_server.url, name="tester", publisher=PublisherSettings(max_inflight_batches=1),
                       credentials=admin_credentials)
    async with Bus(config) as bus:
        try:
            yield bus, nats_server
        finally:
            assert nats_server.pid is not None
            os.kill(nats_server.pid, signal.SIGCONT)


async def test_cancelled_callers_do_not_disturb_the_others(paused_bus: tuple[Bus, EmbeddedServer]) -> None:
    """Cancelling a publish whose message is in flight, or still queued, cancels only that
    call: every other caller gets its ack, a queued message that was cancelled is never sent,
    and the publisher keeps working."""
    bus, server = paused_bus
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)  # acks wait until SIGCONT
    in_flight = [bus.envelope(Note(text=f"f{i}"), to="alice") for i in range(30)]
    queued = [bus.envelope(Note(text=f"q{i}"), to="alice") for i in range(30)]
    async with asyncio.TaskGroup() as group:
        flight_tasks = [group.create_task(bus.publish(e)) for e in in_flight]
        await wait_for(lambda: _commits(bus)[0] >= 1, what="the first batch to be sent")
        queued_tasks = [group.create_task(bus.publish(e)) for e in queued]
        await asyncio.sleep(0)  # one loop turn: each queued task runs up to awaiting its ack
        assert _commits(bus)[0] == 1  # the one commit slot is taken: the rest is queued
        flight_tasks[7].cancel()
        queued_tasks[7].cancel()
        os.kill(server.pid, signal.SIGCONT)
    assert flight_tasks[7].cancelled() and queued_tasks[7].cancelled()
    done = [t.result() for t in flight_tasks + queued_tasks if not t.cancelled()]
    assert len(done) == 58
    stored = await _stored(bus)
    by_seq = {seq: m for seq, m, _ in stored}
    assert all(by_seq[s.ack.seq] == s.envelope.id for s in done)
    ids = [m for _, m, _ in stored]
    assert in_flight[7].id in ids  # it was on the wire: stored, the result just went unread
    assert queued[7].id not in ids  # cancelled before it was sent: never sent
    after = await bus.send("alice", Note(text="after"))
    assert after.ack.seq == len(stored) + 1


async def test_cancelled_shutdown_still_answers_every_caller(paused_bus: tuple[Bus, EmbeddedServer]) -> None:
    """If leaving the publisher is itself cancelled while acks are outstanding, the
    cancellation propagates and every waiting caller gets BusUnavailable instead of hanging."""
    bus, server = paused_bus
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    loop = asyncio.get_running_loop()
    sends = [loop.create_task(bus.send("alice", Note(text=f"s{i}"))) for i in range(20)]
    await wait_for(lambda: _commits(bus)[0] >= 1, what="the batch to be sent")
    closing = loop.create_task(bus.publisher.__aexit__(None, None, None))
    await asyncio.sleep(0)  # one loop turn: the shutdown is waiting for the outstanding acks
    closing.cancel()
    results = await asyncio.wait_for(asyncio.gather(closing, *sends, return_exceptions=True), 5)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, BusUnavailable) and "closed" in str(r) for r in results[1:])


async def test_close_flushes_what_is_queued_then_refuses(bus_config: BusConfig) -> None:
    """Leaving the bus sends every queued publish and waits for its ack; a publish after
    close raises BusUnavailable."""
    async with Bus(bus_config) as bus:
        envelopes = [bus.envelope(Note(text=f"c{i}"), to="alice") for i in range(300)]
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(bus.publish(e)) for e in envelopes]
            await asyncio.sleep(0)  # every task has queued its message
            await bus.publisher.__aexit__(None, None, None)
        publisher = bus.publisher
        with pytest.raises(BusUnavailable, match="closed"):
            await publisher.publish("default.inbox.alice.t", b"{}", msg_id=new_id())
        assert all(t.result().ack.seq > 0 for t in tasks)
        assert await bus.last_seq() == 300


async def test_publish_to_a_dead_server_fails_within_the_ack_timeout(tmp_path: Path) -> None:
    """With the server gone, a publish raises BusUnavailable within ack_timeout_s, never
    hangs, and so does every concurrent one; leaving the publisher is bounded too."""
    server = EmbeddedServer(ServerSettings(store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=None))
    await server.start()
    settings = server.settings  # the port it chose: a server restarted with these binds it again
    subjects = Subjects("default")
    # The control-plane client only declares the stream: without reconnects it just closes when
    # the server dies. Its endless reconnect loop could outlive the test (nats-py's `wait_for`
    # loses a cancellation on Python 3.11 now and then; see bus.cancellation).
    nc = await nats.connect(settings.url, allow_reconnect=False)
    try:
        await ensure_stream(nc.jetstream(), log_stream_config(subjects, StreamSettings()))
        loop = asyncio.get_running_loop()
        async with _publisher_on(settings.url, nc, subjects, PublisherSettings(ack_timeout_s=1.0)) as (publisher, _):
            subject = subjects.inbox("alice", "tester")
            await publisher.publish(subject, b"{}", msg_id=new_id())
            await server.kill()
            started = loop.time()
            results = await asyncio.gather(
                *(publisher.publish(subject, b"{}", msg_id=new_id()) for _ in range(50)), return_exceptions=True
            )
            assert all(isinstance(r, BusUnavailable) for r in results), results[:3]
            assert loop.time() - started < 2.5
            pending = [loop.create_task(publisher.publish(subject, b"{}", msg_id=new_id())) for _ in range(5)]
            started = loop.time()
        assert loop.time() - started < 2.5
        assert all(isinstance(t.exception(), BusUnavailable) for t in pending)
    finally:
        await nc.close()
        await server.stop()


async def test_commit_cut_off_by_a_lost_connection_is_resent(tmp_path: Path) -> None:
    """A batch whose commit was on the wire when the server died is re-sent with the same ids
    once a server is back on the same store (within ack_timeout_s): every caller gets an ack,
    at the sequence holding its message, stored once."""
    server = EmbeddedServer(ServerSettings(store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=None))
    await server.start()
    settings = server.settings  # the port it chose: a server restarted with these binds it again
    try:
        config = BusConfig(url=settings.url, name="tester", publisher=PublisherSettings(ack_timeout_s=10.0))
        async with Bus(config) as bus:
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)  # the batch goes out, its ack never comes
            envelopes = [bus.envelope(Note(text=f"r{i}"), to="alice") for i in range(40)]
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(bus.publish(e)) for e in envelopes]
                await wait_for(lambda: _commits(bus)[0] >= 1, what="the batch to be sent")
                await server.kill()
                server = EmbeddedServer(settings)
                await server.start()
            stored = await _stored(bus)
        assert [m for _, m, _ in stored] == [e.id for e in envelopes]
        assert [t.result().ack.seq for t in tasks] == [seq for seq, _, _ in stored]
    finally:
        await server.stop()


@pytest.mark.parametrize("kills", [1, pytest.param(8, marks=pytest.mark.soak)])
async def test_server_killed_mid_stream_loses_no_acked_message(tmp_path: Path, kills: int) -> None:
    """Publishers run while the server is SIGKILLed and restarted on the same store: every
    publish either returned an ack whose message is at that sequence after the restart, or
    raised BusUnavailable; no message is stored twice."""
    server = EmbeddedServer(ServerSettings(store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=None))
    await server.start()
    settings = server.settings  # the port it chose: a server restarted with these binds it again
    outcomes: dict[str, Sent | BaseException] = {}
    try:
        config = BusConfig(url=settings.url, name="tester", publisher=PublisherSettings(ack_timeout_s=3.0))
        async with Bus(config) as bus:
            stop = asyncio.Event()

            async def producer(n: int) -> None:
                while not stop.is_set():
                    envelope = bus.envelope(Note(text=f"p{n}"), to="alice")
                    try:
                        outcomes[envelope.id] = await bus.publish(envelope)
                    except BusUnavailable as exc:
                        outcomes[envelope.id] = exc

            def acked() -> int:
                return sum(isinstance(o, Sent) for o in outcomes.values())

            async with asyncio.TaskGroup() as group:
                for n in range(100):
                    group.create_task(producer(n))
                for _ in range(kills):
                    target = acked() + 3000
                    await wait_for(lambda: acked() >= target, timeout_s=30, what="acks before the kill")
                    await server.kill()
                    server = EmbeddedServer(settings)
                    await server.start()
                target = acked() + 3000
                await wait_for(lambda: acked() >= target, timeout_s=30, what="acks after the restart")
                stop.set()
            failed = [o for o in outcomes.values() if not isinstance(o, Sent)]
            assert all(isinstance(o, BusUnavailable) for o in failed)
            stored = await _stored(bus)
        ids = [m for _, m, _ in stored]
        assert len(ids) == len(set(ids)), "a message was stored twice"
        by_seq = {seq: m for seq, m, _ in stored}
        for msg_id, outcome in outcomes.items():
            if isinstance(outcome, Sent):
                assert by_seq.get(outcome.ack.seq) == msg_id, f"acked {msg_id} missing at {outcome.ack.seq}"
    finally:
        await server.stop()


class _CuttingRelay:
    """A TCP relay between a client and a real server that cuts the connection (both sides, at
    once) at a chosen point: after forwarding `cut_after_client_bytes` more bytes from the
    client, or instead of forwarding the next message the server sends (an ack, here)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_after_client_bytes: int | None = None
        self.cut_at_server_message = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "_CuttingRelay":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers += [client_w, server_w]
            pair = (client_w, server_w)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(client_r, server_w, pair, from_client=True))
                group.create_task(self._pump(server_r, client_w, pair, from_client=False))
        finally:
            self._handlers.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter], *, from_client: bool,
    ) -> None:
        while chunk := await reader.read(65536):
            if from_client and self.cut_after_client_bytes is not None:
                if len(chunk) >= self.cut_after_client_bytes:
                    writer.write(chunk[: self.cut_after_client_bytes])
                    self._cut(pair)
                    return
                self.cut_after_client_bytes -= len(chunk)
            elif not from_client and self.cut_at_server_message and b"MSG " in chunk:
                self._cut(pair)  # the chunk (the ack) is never delivered
                return
            writer.write(chunk)
        writer.transport.abort()  # one side ended: so does the other

    def _cut(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self.cut_after_client_bytes = None
        self.cut_at_server_message = False
        self.cuts += 1
        for writer in pair:
            writer.transport.abort()


@pytest.mark.parametrize("cut", ["after_the_commit_was_stored", "inside_the_staged_frames"])
async def test_a_batch_cut_off_by_a_reconnect_is_resent_and_stored_once(
    nats_server: EmbeddedServer, admin_credentials: str, cut: str
) -> None:
    """The publishing connection is cut mid-batch, either after the server stored the batch
    (its ack is lost) or halfway through the batch's frames (nothing stored). After the
    reconnect the batch is re-sent with the same ids: every message is stored exactly once, in
    the order fired, and each caller gets the sequence of its own message (a duplicate when the
    first attempt had stored it)."""
    subjects = Subjects("default")
    nc = await nats.connect(nats_server.url, nkeys_seed_str=seed_of(admin_credentials))
    try:
        await ensure_stream(nc.jetstream(), log_stream_config(subjects, StreamSettings()))
        async with _CuttingRelay(nats_server.settings.port) as relay:
            async with _publisher_on(relay.url, nc, subjects, PublisherSettings(), admin_credentials) as (publisher, conn):
                subject = subjects.inbox("alice", "tester")
                await publisher.publish(subject, b"{}", msg_id=new_id())  # the ack inbox is in place
                if cut == "after_the_commit_was_stored":
                    relay.cut_at_server_message = True
                else:
                    relay.cut_after_client_bytes = 2000  # a few of the 40 staged frames
                ids = [new_id() for _ in range(40)]
                acks = await asyncio.wait_for(
                    asyncio.gather(*(publisher.publish(subject, b'{"n": 1}', msg_id=i) for i in ids)), 15
                )
                assert relay.cuts == 1 and conn.reconnects >= 1
        js = nc.jetstream()
        stored = [await js.get_msg(subjects.stream, seq=seq) for seq in range(2, 2 + len(ids))]
        assert [(m.headers or {}).get("Nats-Msg-Id") for m in stored] == ids
        assert (await js.stream_info(subjects.stream)).state.messages == 1 + len(ids)
        assert [ack.seq for ack in acks] == list(range(2, 2 + len(ids)))
        first_attempt_stored = cut == "after_the_commit_was_stored"
        assert all(ack.duplicate == first_attempt_stored for ack in acks)
    finally:
        await nc.close()


async def test_publishing_does_not_travel_on_the_control_plane_client(bus: Bus) -> None:
    """Publishes and their acks go over the Bus's own wire connection: the nats-py client
    (control plane) neither sends nor receives a message for them."""
    before = (bus.transport.nc.stats["out_msgs"], bus.transport.nc.stats["in_msgs"])
    await asyncio.gather(*(bus.send("alice", Note(text=f"w{i}")) for i in range(300)))
    await bus.send("alice", Note(text="alone"))
    assert (bus.transport.nc.stats["out_msgs"], bus.transport.nc.stats["in_msgs"]) == before


_NATS_PY_PRIVATE = re.compile(r"\._send_command|_flush_pending|_flush_queue|\.stats\[|\bnc\._\w|\._server_info\b")


def test_bus_uses_no_private_member_of_nats_py() -> None:
    """No module of bus/ reaches into nats-py's internals (its raw write path, flush queue,
    counters or server info): what nats-py lacks, bus.wire provides."""
    root = Path(__file__).resolve().parents[1]
    hits = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in sorted((root / "bus").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _NATS_PY_PRIVATE.search(line)
    ]
    assert hits == []
