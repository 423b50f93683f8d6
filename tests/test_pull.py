"""RawPull against a real nats-server: credit bounds deliveries, expired requests give their
credit back, a deleted consumer is recovered, and a pull given a nats-py client runs (and
closes) a private raw connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from nats.js import api as js_api

from bus import Bus
from bus.pull import Delivered, PullSettings, RawPull, ack_facts
from bus.identity import load_credential
from bus.wire import WireConnection, WireSettings, parse_urls
from schemas.payloads import Note

from conftest import wait_for

_QUICK = PullSettings(expires_s=0.6, heartbeat_s=0.2, tick_s=0.05, retry_s=0.1)


async def _consumer(bus: Bus, name: str) -> None:
    await bus.js.add_consumer(bus.subjects.stream, js_api.ConsumerConfig(
        durable_name=name, filter_subject=bus.subjects.inbox_filter(name),
        ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=1000,
    ))


@pytest.fixture
async def conn(bus: Bus) -> AsyncIterator[WireConnection]:
    credential = load_credential(bus.config.credentials) if bus.config.credentials else None
    connection = WireConnection(parse_urls(bus.config.url), name="pull-test", settings=WireSettings(credential=credential))
    await connection.connect()
    runner = asyncio.create_task(connection.run())
    try:
        yield connection
    finally:
        await connection.close()
        await asyncio.wait_for(runner, 2)  # run() returns once closed


async def _running(pull: RawPull, tg: asyncio.TaskGroup) -> asyncio.Task[None]:
    await pull.start()
    return tg.create_task(pull.run())


async def test_window_bounds_deliveries_until_released(bus: Bus, conn: WireConnection) -> None:
    """With a window of 4, four of ten messages arrive; releasing them lets the rest come,
    and each delivery carries its ack subject and raw headers."""
    await _consumer(bus, "credit")
    for i in range(10):
        await bus.send("credit", Note(text=str(i)))
    got: list[Delivered] = []
    pull = RawPull(conn, stream=bus.subjects.stream, consumer="credit", window=4,
                   on_message=lambda p, m: got.append(m), settings=_QUICK)
    async with asyncio.TaskGroup() as tg:
        watchdog = await _running(pull, tg)
        await wait_for(lambda: len(got) == 4, what="a window's worth")
        await conn.flush()
        info = await bus.js.consumer_info(bus.subjects.stream, "credit")
        assert info.delivered.consumer_seq == 4 and info.num_pending == 6  # the server sent no more
        assert len(got) == 4 and pull.held == 4 and pull.free == 0
        for message in got:
            conn.publish(message.raw_reply, b"+ACK")
        if pull.release(4):
            await pull.pull()
        await wait_for(lambda: len(got) == 8, what="the next window")
        facts = ack_facts(got[0].raw_reply)
        assert facts is not None and facts[:2] == (bus.subjects.stream, "credit") and facts[2] == 1
        assert got[0].subject == "default.inbox.credit.tester"
        assert b"Nats-Msg-Id" in got[0].header
        await pull.close()
        watchdog.cancel()


async def test_expired_requests_return_their_credit(
    bus: Bus, conn: WireConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests that expire unused (408) give their credit back, so the pull asks again at
    once (the watchdog never has to rescue it): a message published after several expiries
    is delivered, and the outstanding credit never exceeds the window."""
    caplog.set_level(logging.INFO, logger="continuum.pull")
    await _consumer(bus, "idle")
    got: list[Delivered] = []
    pull = RawPull(conn, stream=bus.subjects.stream, consumer="idle", window=8,
                   on_message=lambda p, m: got.append(m), settings=_QUICK)
    async with asyncio.TaskGroup() as tg:
        watchdog = await _running(pull, tg)
        for _ in range(15):  # ~2.5 expiries
            await asyncio.sleep(0.1)
            assert pull.requested + pull.held <= pull.window
        await bus.send("idle", Note(text="late"))
        await wait_for(lambda: len(got) == 1, what="a message after expiries")
        await pull.close()
        watchdog.cancel()
    assert "pulling again" not in caplog.text


async def test_a_deleted_consumer_is_recovered(bus: Bus, conn: WireConnection) -> None:
    """When the consumer is deleted under the pull, `recover` recreates it and pulling goes on."""
    await _consumer(bus, "gone")
    recovered: list[bool] = []

    async def recover() -> None:
        await _consumer(bus, "gone")
        recovered.append(True)

    got: list[Delivered] = []
    pull = RawPull(conn, stream=bus.subjects.stream, consumer="gone", window=8,
                   on_message=lambda p, m: got.append(m), settings=_QUICK, recover=recover)
    async with asyncio.TaskGroup() as tg:
        watchdog = await _running(pull, tg)
        await conn.flush()
        await bus.js.delete_consumer(bus.subjects.stream, "gone")
        await wait_for(lambda: bool(recovered), what="the consumer recreated")
        await bus.send("gone", Note(text="after"))
        await wait_for(lambda: len(got) == 1, what="a delivery from the new consumer")
        await pull.close()
        watchdog.cancel()


async def test_a_pull_given_a_nats_py_client_owns_a_private_connection(bus: Bus) -> None:
    """Given the bus's nats-py client, the pull connects its own raw connection to the same
    server, keeps it in `run()`, and closes it in `close()`."""
    await _consumer(bus, "private")
    await bus.send("private", Note(text="x"))
    got: list[Delivered] = []
    pull = RawPull(bus.transport, stream=bus.subjects.stream, consumer="private", window=4,
                   on_message=lambda p, m: got.append(m), settings=_QUICK)
    async with asyncio.TaskGroup() as tg:
        watchdog = await _running(pull, tg)
        await wait_for(lambda: len(got) == 1, what="the delivery")
        connection = pull.connection
        assert connection.is_connected
        await pull.close()
        assert connection.is_closed
        watchdog.cancel()
