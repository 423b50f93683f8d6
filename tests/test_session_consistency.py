"""Read-your-writes by default: a `Bus`'s queries wait for the views to have applied the highest
log sequence that Bus wrote or was delivered, unless told `min_seq=0`. Real nats-server, real
projection service and DuckDB file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bus import Bus, BusConfig, QueryError
from projections.config import ProjectionSettings, QuerySettings
from projections.service import ProjectionService
from schemas import Delivery, Envelope
from schemas.payloads import Note


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


async def test_a_query_after_a_send_sees_the_send_without_min_seq(bus: Bus, service: ProjectionService) -> None:
    """Send, then query at once, 60 times over, across views in different fold lanes: every query
    finds what the same Bus just wrote."""
    for i in range(60):
        sent = await bus.send(f"reader{i % 3}", Note(text=f"note {i}"))
        assert bus.session_seq == sent.ack.seq
        messages = await bus.query("SELECT id FROM messages WHERE id = ?", [sent.envelope.id])
        events = await bus.query("SELECT seq FROM events WHERE seq = ?", [sent.ack.seq])
        assert messages.records() == [{"id": sent.envelope.id}], f"round {i}"
        assert events.records() == [{"seq": sent.ack.seq}], f"round {i}"


async def test_min_seq_zero_does_not_wait(bus: Bus, tmp_path: Path) -> None:
    """When the session is ahead of the views (here: told it saw a sequence not yet written), a
    default query waits for it and fails with a `lag` error after the service's bound, while
    `min_seq=0` answers at once from what the views hold."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), query=QuerySettings(max_lag_wait_s=0.5))
    async with ProjectionService(bus, settings):
        sent = await bus.send("reader", Note(text="stored"))
        assert (await bus.query("SELECT count(*) AS n FROM messages")).records() == [{"n": 1}]
        bus.saw(sent.ack.seq + 1000)
        now = await bus.query("SELECT count(*) AS n FROM messages", min_seq=0)
        assert now.records() == [{"n": 1}]
        with pytest.raises(QueryError) as waited:
            await bus.query("SELECT count(*) AS n FROM messages")
    assert waited.value.kind == "lag" and f"seq {sent.ack.seq + 1000}" in str(waited.value)


async def test_a_handler_queries_at_least_the_message_it_handles(
    bus: Bus, bus_config: BusConfig, service: ProjectionService,
) -> None:
    """A second Bus (another process, in effect) consumes a message and queries for it without
    min_seq: its session includes what it was delivered."""
    found: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    async with Bus(BusConfig(url=bus_config.url, monitor_url=bus_config.monitor_url, name="reader",
                             credentials=bus_config.credentials)) as reader:

        async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
            rows = await reader.query("SELECT id, recipient FROM messages WHERE id = ?", [envelope.id])
            await found.put(rows.records())

        async with reader.consumer("reader", handle):
            sent = await bus.send("reader", Note(text="find me"))
            rows = await asyncio.wait_for(found.get(), 20)
    assert rows == [{"id": sent.envelope.id, "recipient": "reader"}]
