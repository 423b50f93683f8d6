"""The consumer engine against a real nats-server: delivery, priority, retries, heartbeats,
replicas, broadcasts, echoes, expiry, reports before acks, restarts and bounded shutdown."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import msgspec
import nats
import pytest
from nats.js.errors import NotFoundError

from bus import Bus, BusConfig, BusError, ConsumerSettings, RetryableError, RetryPolicy
from bus.pull import parse_ack_subject
from bus.server import EmbeddedServer
from schemas import Delivery, Envelope
from schemas.payloads import DeliveryExpired, DeliveryReport, Note
from conftest import seed_of, wait_for


def fast(**overrides: Any) -> ConsumerSettings:
    """Consumer settings with short timers, so tests take seconds."""
    fields: dict[str, Any] = {
        "report_interval_s": 0.01,
        "drain_timeout_s": 2.0,
        "retry": RetryPolicy(backoff_s=(0.05,), max_deliver=3),
    }
    fields.update(overrides)
    return ConsumerSettings(**fields)


async def stored(bus: Bus, subject: str) -> list[Envelope[Any]]:
    """Every envelope stored on `subject` (wildcards allowed), in stream order, payload decoded."""
    out: list[Envelope[Any]] = []
    seq = 1
    while True:
        try:
            msg = await bus.js.get_msg(bus.subjects.stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return out
        out.append(bus.codec.decode(msg.data))
        seq = msg.seq + 1


async def settlements(bus: Bus, agent: str) -> list[Any]:
    """All settlements in the agent's delivery reports, in log order."""
    reports = await stored(bus, bus.subjects.event(agent, "delivery.report"))
    return [s for r in reports for s in r.payload.settlements]


def ack_pending_is(bus: Bus, consumer: str, count: int):  # type: ignore[no-untyped-def]
    """A condition for wait_for: the consumer has `count` delivered, unacked messages."""

    async def check() -> bool:
        info = await bus.js.consumer_info(bus.subjects.stream, consumer)
        return int(info.num_ack_pending) == count

    return check


async def fully_acked(bus: Bus, consumer: str) -> bool:
    info = await bus.js.consumer_info(bus.subjects.stream, consumer)
    return info.num_ack_pending == 0 and info.num_pending == 0


def metric(bus: Bus, name: str, **labels: str) -> float:
    return bus.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_backlog_is_handled_once_and_acked(bus: Bus) -> None:
    """Every envelope in an agent's inbox reaches the handler once, typed, with its delivery
    facts, and is acked; the metrics count it."""
    sent = [await bus.send("alice", Note(text=f"n{i}")) for i in range(30)]
    seen: list[tuple[str, Delivery]] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        assert isinstance(envelope.payload, Note)
        seen.append((envelope.id, delivery))

    async with bus.consumer("alice", handle, settings=fast()):
        await wait_for(lambda: len(seen) == 30, what="30 handled")
        await wait_for(lambda: fully_acked(bus, "alice__inbox"), what="all acked")
    assert sorted(i for i, _ in seen) == sorted(s.envelope.id for s in sent)
    by_id = {s.envelope.id: s.ack.seq for s in sent}
    for envelope_id, delivery in seen:
        assert delivery.stream_seq == by_id[envelope_id]
        assert delivery.attempt == 1 and delivery.consumer == "alice__inbox"
        assert delivery.subject == "default.inbox.alice.tester"
    assert metric(bus, "continuum_delivered_total", consumer="alice__inbox") == 30
    assert metric(bus, "continuum_acked_total", consumer="alice__inbox") == 30
    assert metric(bus, "continuum_handler_seconds_count", consumer="alice__inbox") == 30
    assert metric(bus, "continuum_handlers_in_flight", consumer="alice__inbox") == 0
    outcomes = Counter(s.outcome for s in await settlements(bus, "alice"))
    assert outcomes == {"handled": 30}


async def test_higher_priority_is_handled_first_under_backlog(bus: Bus) -> None:
    """With a backlog waiting, high-priority envelopes are handled before most low ones,
    although they were published after them."""
    for i in range(60):
        await bus.send("sorter", Note(text=f"low{i}"), priority=1)
    for i in range(10):
        await bus.send("sorter", Note(text=f"high{i}"), priority=8)
    order: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        order.append(envelope.payload.text)
        await asyncio.sleep(0.002)  # some work, so the backlog builds up locally

    async with bus.consumer("sorter", handle, settings=fast(concurrency=1, prefetch=100)):
        await wait_for(lambda: len(order) == 70, what="70 handled")
    last_high = max(i for i, text in enumerate(order) if text.startswith("high"))
    assert last_high < 20, f"highs should come before most lows; order was {order}"
    highs = [t for t in order if t.startswith("high")]
    assert highs == [f"high{i}" for i in range(10)], "equal priority keeps stream order"


async def test_window_bounds_what_is_pulled(bus: Bus) -> None:
    """Never more than concurrency + prefetch messages are pulled but unsettled."""
    for i in range(20):
        await bus.send("bounded", Note(text=str(i)))
    release = asyncio.Event()
    started = 0

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        nonlocal started
        started += 1
        await release.wait()

    async with bus.consumer("bounded", handle, settings=fast(concurrency=2, prefetch=3)):
        await wait_for(lambda: started == 2, what="two handlers running")
        await wait_for(ack_pending_is(bus, "bounded__inbox", 5), what="window of 5 delivered")
        await bus.transport.flush()
        info = await bus.js.consumer_info(bus.subjects.stream, "bounded__inbox")
        assert info.num_ack_pending == 5 and info.num_pending == 15
        release.set()
        await wait_for(lambda: fully_acked(bus, "bounded__inbox"), what="all acked")


async def test_retryable_failure_is_redelivered_then_handled(bus: Bus) -> None:
    """A handler that fails is retried after its backoff (the error's delay overriding the
    policy) and the report shows the retry and the success."""
    attempts: list[int] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            raise RetryableError("not yet", delay_s=0.1)
        if delivery.attempt == 2:
            raise ValueError("flaky")

    sent = await bus.send("retrier", Note(text="x"))
    async with bus.consumer("retrier", handle, settings=fast()):
        await wait_for(lambda: attempts == [1, 2, 3], what="three attempts")
        await wait_for(lambda: fully_acked(bus, "retrier__inbox"), what="acked")
    found = [(s.attempt, s.outcome, s.error) for s in await settlements(bus, "retrier")]
    assert found == [
        (1, "retried", "RetryableError: not yet"),
        (2, "retried", "ValueError: flaky"),
        (3, "handled", None),
    ]
    assert all(s.stream_seq == sent.ack.seq for s in await settlements(bus, "retrier"))
    assert metric(bus, "continuum_nacked_total", consumer="retrier__inbox") == 2
    assert metric(bus, "continuum_redelivered_total", consumer="retrier__inbox") == 2


async def test_long_handler_keeps_its_message(bus: Bus) -> None:
    """A handler running 3x ack_wait sends in-progress heartbeats: its message is delivered
    once and never redelivered."""
    calls: list[int] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        calls.append(delivery.attempt)
        await asyncio.sleep(3.0)  # the slow work itself, e.g. an LLM call

    await bus.send("thinker", Note(text="think"))
    async with bus.consumer("thinker", handle, settings=fast(ack_wait_s=1.0)):
        await wait_for(lambda: fully_acked(bus, "thinker__inbox"), timeout_s=10, what="acked")
    info = await bus.js.consumer_info(bus.subjects.stream, "thinker__inbox")
    assert calls == [1]
    assert info.num_redelivered == 0


async def test_replicas_split_the_work(bus: Bus, bus_config: BusConfig) -> None:
    """Two engines for the same agent name share its consumer: each message is handled once,
    and both engines get some."""
    handled: list[tuple[int, str]] = []

    def handler(replica: int):  # type: ignore[no-untyped-def]
        async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
            handled.append((replica, envelope.id))
            await asyncio.sleep(0.005)

        return handle

    sent = [await bus.send("worker", Note(text=str(i))) for i in range(40)]
    async with Bus(msgspec.structs.replace(bus_config, name="replica")) as other:
        settings = fast(concurrency=1, prefetch=0)
        async with bus.consumer("worker", handler(0), settings=settings), \
                other.consumer("worker", handler(1), settings=settings):
            await wait_for(lambda: len(handled) >= 40, what="40 handled")
            await wait_for(lambda: fully_acked(bus, "worker__inbox"), what="all acked")
    ids = [i for _, i in handled]
    assert sorted(ids) == sorted(s.envelope.id for s in sent), "each handled exactly once"
    assert {replica for replica, _ in handled} == {0, 1}


async def test_broadcast_reaches_each_agent_name_once(bus: Bus) -> None:
    """Two agent names carrying the same tag each get every broadcast exactly once."""
    got: dict[str, list[str]] = {"alpha": [], "beta": []}

    def collect(name: str):  # type: ignore[no-untyped-def]
        async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
            got[name].append(envelope.payload.text)

        return handle

    async with bus.consumer("alpha", collect("alpha"), tags=["news"], settings=fast()), \
            bus.consumer("beta", collect("beta"), tags=["news"], settings=fast()):
        for i in range(10):
            await bus.broadcast("news", Note(text=str(i)))
        await wait_for(lambda: len(got["alpha"]) == 10 and len(got["beta"]) == 10, what="broadcasts")
        await wait_for(lambda: fully_acked(bus, "alpha__groups"), what="alpha acked")
        await wait_for(lambda: fully_acked(bus, "beta__groups"), what="beta acked")
    expected = [str(i) for i in range(10)]
    assert sorted(got["alpha"]) == expected and sorted(got["beta"]) == expected


async def test_own_broadcast_is_acked_without_the_handler(bus: Bus) -> None:
    """A broadcast whose sender is the agent itself is acked without running the handler, and
    reported as skipped."""
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    async with bus.consumer("alpha", handle, tags=["news"], settings=fast()):
        echo = await bus.broadcast("news", Note(text="echo"), sender="alpha")
        await bus.broadcast("news", Note(text="from someone else"))
        await wait_for(lambda: texts == ["from someone else"], what="the other broadcast")
        await wait_for(lambda: fully_acked(bus, "alpha__groups"), what="both acked")
    assert texts == ["from someone else"]
    outcome = {s.stream_seq: s.outcome for s in await settlements(bus, "alpha")}
    assert outcome[echo.ack.seq] == "skipped"


async def test_late_joiner_gets_inbox_backlog_not_old_broadcasts(bus: Bus) -> None:
    """An agent starting late gets its inbox backlog, and broadcasts only from the creation of
    its group consumer on."""
    await bus.send("late", Note(text="waiting in the inbox"))
    await bus.broadcast("news", Note(text="before it existed"))
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    async with bus.consumer("late", handle, tags=["news"], settings=fast()):
        await bus.broadcast("news", Note(text="after it started"))
        await wait_for(lambda: len(texts) == 2, what="inbox backlog and new broadcast")
        await wait_for(lambda: fully_acked(bus, "late__groups"), what="acked")
    assert sorted(texts) == ["after it started", "waiting in the inbox"]


async def test_expired_envelope_is_not_handled_and_is_recorded(bus: Bus) -> None:
    """An envelope past its expires_at is terminated without running the handler; a
    DeliveryExpired event is recorded and counted."""
    expired = await bus.send("clock", Note(text="too late"), expires_in_s=-1)
    await bus.send("clock", Note(text="in time"), expires_in_s=60)
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    async with bus.consumer("clock", handle, settings=fast()):
        await wait_for(lambda: texts == ["in time"], what="the live envelope")
        await wait_for(lambda: fully_acked(bus, "clock__inbox"), what="both settled")
    events = await stored(bus, bus.subjects.event("clock", "delivery.expired"))
    assert len(events) == 1
    payload = events[0].payload
    assert isinstance(payload, DeliveryExpired)
    assert payload.original_id == expired.envelope.id and payload.original_seq == expired.ack.seq
    assert metric(bus, "continuum_expired_total", consumer="clock__inbox") == 1
    info = await bus.js.consumer_info(bus.subjects.stream, "clock__inbox")
    assert info.num_redelivered == 0
    outcome = {s.stream_seq: s.outcome for s in await settlements(bus, "clock")}
    assert outcome[expired.ack.seq] == "expired"


async def test_reports_are_recorded_before_their_acks(bus: Bus, bus_config: BusConfig) -> None:
    """On the wire, every ack comes after a stored DeliveryReport that contains its message."""
    monitor = await nats.connect(bus_config.url, nkeys_seed_str=seed_of(str(bus_config.credentials)))
    seen: list[tuple[str, Any]] = []

    async def on_ack(msg: Any) -> None:
        seen.append(("ack", int(msg.subject.split(".")[5])))

    async def on_report(msg: Any) -> None:
        report = bus.codec.decode(msg.data).payload
        assert isinstance(report, DeliveryReport)
        seen.append(("report", {s.stream_seq for s in report.settlements}))

    try:
        await monitor.subscribe(f"$JS.ACK.{bus.subjects.stream}.ordered__inbox.>", cb=on_ack)
        await monitor.subscribe(bus.subjects.event("ordered", "delivery.report"), cb=on_report)
        await monitor.flush()

        async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
            pass

        async with bus.consumer("ordered", handle, settings=fast(report_max=7)):
            for i in range(50):
                await bus.send("ordered", Note(text=str(i)))
            await wait_for(lambda: sum(kind == "ack" for kind, _ in seen) == 50, what="50 acks seen")
    finally:
        await monitor.close()
    reported: set[int] = set()
    for kind, value in seen:
        if kind == "report":
            reported |= value
        else:
            assert value in reported, f"ack of seq {value} went out before its report"


async def test_pulling_survives_a_server_restart(bus: Bus, nats_server: EmbeddedServer) -> None:
    """After the server restarts (its pending pull requests lost), the engine pulls again and
    handles what is sent afterwards."""
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    async with bus.consumer("survivor", handle, settings=fast()):
        await bus.send("survivor", Note(text="before"))
        await wait_for(lambda: texts == ["before"], what="first message")
        await nats_server.stop()
        await nats_server.start()
        await wait_for(lambda: bus.transport.is_connected, what="reconnected")

        async def send_after() -> bool:
            try:
                await bus.send("survivor", Note(text="after"), id="018f0000-0000-7000-8000-000000000001")
            except BusError:  # the publisher may still be recovering from the reconnect
                return False
            return True

        await wait_for(send_after, timeout_s=10, interval_s=0.2, what="a publish after the restart")
        await wait_for(lambda: "after" in texts, timeout_s=10, what="message after restart")


async def test_deleted_consumer_is_recreated(bus: Bus) -> None:
    """If the durable consumer is deleted under a running engine, the engine recreates it and
    goes on pulling."""
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    async with bus.consumer("phoenix", handle, settings=fast()):
        await bus.send("phoenix", Note(text="first"))
        await wait_for(lambda: texts == ["first"], what="first message")
        await wait_for(lambda: fully_acked(bus, "phoenix__inbox"), what="first acked")
        await bus.js.delete_consumer(bus.subjects.stream, "phoenix__inbox")
        await bus.send("phoenix", Note(text="second"))
        await wait_for(lambda: "second" in texts, timeout_s=10, what="message after recreation")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.S.c.2.10.7.1700000000000000000.3", ("S", "c", 2, 10, 7, 1700000000000000000, 3)),
        ("$JS.ACK.dom.hash.S.c.1.5.4.1700000000000000000.0.tok",
         ("S", "c", 1, 5, 4, 1700000000000000000, 0)),
        ("_INBOX.abc", None),
        ("$JS.ACK.S.c.x.10.7.1.3", None),
        ("$JS.NAK.S.c.1.2.3.4.5", None),
    ],
)
def test_ack_subject_parsing(reply: str, expected: object) -> None:
    """Delivery facts come from the reply subject in its v1 and v2 (domain) forms; anything
    else is refused."""
    assert parse_ack_subject(reply) == expected


async def test_exit_lets_a_running_handler_finish(bus: Bus) -> None:
    """Leaving the block waits for a running handler and sends its ack before returning."""
    started = asyncio.Event()
    finished: list[bool] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(True)

    await bus.send("finisher", Note(text="x"))
    async with bus.consumer("finisher", handle, settings=fast()):
        await asyncio.wait_for(started.wait(), 5)
    assert finished == [True]
    # The ack left before the block ended; the server applies acks in its own time (on a loaded
    # machine, after a consumer-info request sent later on another connection). Unacked, the
    # message would be handed back and pending again: this would time out.
    await wait_for(lambda: fully_acked(bus, "finisher__inbox"), timeout_s=5, what="the ack applied")


async def test_exit_hands_back_queued_and_overdue_messages(bus: Bus) -> None:
    """On exit, messages no handler started and handlers past drain_timeout are handed back
    at once (not after ack_wait): the next engine gets all of them right away."""
    for i in range(5):
        await bus.send("stuck", Note(text=str(i)))
    cancelled: list[int] = []
    started = asyncio.Event()

    async def hang(envelope: Envelope[Any], delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(delivery.stream_seq)
            raise

    settings = fast(concurrency=1, prefetch=10, drain_timeout_s=0.2)  # ack_wait stays 30 s
    async with bus.consumer("stuck", hang, settings=settings):
        await asyncio.wait_for(started.wait(), 5)
        await wait_for(ack_pending_is(bus, "stuck__inbox", 5), what="all five pulled")
    assert len(cancelled) == 1
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    async with bus.consumer("stuck", handle, settings=settings):
        await wait_for(lambda: len(texts) == 5, timeout_s=5, what="all five handed back")
    assert sorted(texts) == [str(i) for i in range(5)]


async def test_body_error_propagates_unwrapped(bus: Bus) -> None:
    """An error raised inside the block comes out as itself, after an orderly shutdown."""

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        pass

    with pytest.raises(KeyError):
        async with bus.consumer("plain", handle, settings=fast()):
            raise KeyError("from the block")


async def test_undecodable_message_does_not_stop_the_engine(bus: Bus) -> None:
    """Garbage in an inbox is settled (terminated) and the engine goes on with the next one."""
    await bus.transport.request("default.inbox.sturdy.tester", b"\xffnot json", headers={"Nats-Msg-Id": "junk-1"})
    await bus.send("sturdy", Note(text="fine"))
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    async with bus.consumer("sturdy", handle, settings=fast()):
        await wait_for(lambda: texts == ["fine"], what="the valid message")
        await wait_for(lambda: fully_acked(bus, "sturdy__inbox"), what="both settled")
    assert len(await stored(bus, bus.subjects.dead("sturdy"))) == 1
