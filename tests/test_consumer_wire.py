"""The consumer engine on its own raw connection, against a real nats-server: settlements made
during a server outage reach the server after it is back, and the engine's connection is its
own (the bus's nats-py connection carries no deliveries)."""

from __future__ import annotations

import asyncio
from typing import Any

from bus import Bus, ConsumerSettings, RetryPolicy
from bus.server import EmbeddedServer
from schemas import Delivery, Envelope
from schemas.payloads import Note

from conftest import wait_for


def fast(**overrides: Any) -> ConsumerSettings:
    fields: dict[str, Any] = {
        "report_interval_s": 0.01, "drain_timeout_s": 2.0, "retry": RetryPolicy(backoff_s=(0.05,), max_deliver=3),
    }
    fields.update(overrides)
    return ConsumerSettings(**fields)


async def _fully_acked(bus: Bus, consumer: str) -> bool:
    try:
        info = await bus.js.consumer_info(bus.subjects.stream, consumer)
    except Exception:  # noqa: BLE001 - nats-py errors while the bus's own connection reconnects
        return False
    return info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_message_settled_during_an_outage_is_acked_after_it(bus: Bus, nats_server: EmbeddedServer) -> None:
    """A handler that finishes while the server is down: its report is recorded and its ack
    sent once the server is back, so the message is handled once and not redelivered
    (ack_wait stays 30 s, far beyond the wait)."""
    attempts: list[int] = []
    started = asyncio.Event()
    release = asyncio.Event()

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        started.set()
        await release.wait()

    await bus.send("patient", Note(text="x"))
    async with bus.consumer("patient", handle, settings=fast()):
        await asyncio.wait_for(started.wait(), 5)
        await nats_server.stop()
        release.set()
        await nats_server.start()
        await wait_for(lambda: _fully_acked(bus, "patient__inbox"), timeout_s=15, interval_s=0.1,
                       what="the message acked after the restart")
    assert attempts == [1]


async def test_deliveries_do_not_travel_on_the_bus_connection(bus: Bus) -> None:
    """The engine pulls on a connection of its own: the bus's nats-py client receives none
    of the deliveries (its inbound message count stays at what its own requests brought)."""
    for i in range(50):
        await bus.send("apart", Note(text=str(i)))
    handled: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        handled.append(envelope.payload.text)

    async with bus.consumer("apart", handle, settings=fast()):
        await wait_for(lambda: len(handled) == 50, what="50 handled")
        before = bus.transport.nc.stats["in_msgs"]
        for i in range(50, 100):
            await bus.send("apart", Note(text=str(i)))
        await wait_for(lambda: len(handled) == 100, what="50 more handled")
        # 50 publish acks, plus a few replies for reports: far fewer than 50 deliveries more.
        assert bus.transport.nc.stats["in_msgs"] - before < 75
