"""bus.log_reader.LogReader against a real nats-server: order from a start sequence, every record
exactly once across a server restart, a deleted consumer and a silent server, flow control
holding the server back while nobody reads, a teardown that does not wait for a dead server, and
TLS."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
from conftest import wait_for

from bus import Bus, BusConfig, BusUnavailable, log_reader
from bus.config import TlsSettings
from bus.log_reader import LogReader, LogRecord
from bus.server import ANY_PORT, EmbeddedServer, ServerSettings
from schemas.payloads import Note


async def publish(bus: Bus, first: int, count: int, *, timeout_s: float = 20.0) -> None:
    """Send notes `first`..`first+count-1`, in that order, retrying while the bus reconnects."""
    deadline = time.monotonic() + timeout_s
    for n in range(first, first + count):
        while True:
            try:
                await bus.send("reader", Note(text=str(n)))
                break
            except BusUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


async def read_until(
    reader: LogReader, last: int, records: list[LogRecord] | None = None, *, timeout_s: float = 20.0
) -> list[LogRecord]:
    """`records` (a new list if None) extended with what `reader` reads, through seq `last`."""
    records = [] if records is None else records
    async with asyncio.timeout(timeout_s):
        while not records or records[-1].seq < last:
            records += await reader.read(1_000)
    return records


def texts(records: list[LogRecord]) -> list[str]:
    return [msgspec.json.decode(r.data)["payload"]["text"] for r in records]


async def test_reads_in_order_from_the_start_sequence(bus: Bus) -> None:
    """From `start_seq` on, every stored message comes back once, in stream order, with its
    subject and bytes; `last_seq` and `head_seq` follow."""
    await publish(bus, 1, 30)
    last = await bus.last_seq()
    async with LogReader(bus, start_seq=11, name="order") as reader:
        records = await read_until(reader, last)
        assert [r.seq for r in records] == list(range(11, last + 1))
        assert texts(records) == [str(n) for n in range(11, 31)]
        assert all(r.subject.startswith(bus.subjects.ns.encode()) for r in records)
        assert all(r.time_ns > 0 for r in records)
        assert reader.last_seq == last
        assert reader.head_seq == last
        assert reader.restarts == 0


async def test_every_record_once_in_order_across_a_server_restart(nats_server: EmbeddedServer, bus: Bus) -> None:
    """The consumer lives in the server's memory: after the server restarts (the connection
    reconnects) the reader starts a new one after the last sequence it delivered, promptly, and
    what was stored before and after comes back exactly once, in order."""
    await publish(bus, 1, 300)
    async with LogReader(bus, start_seq=1, name="restart") as reader:
        first = await reader.read(100)
        # Whatever the reader holds beyond the first 100 stays queued across the restart.
        await nats_server.stop()
        await nats_server.start()
        restarted = time.monotonic()
        await publish(bus, 301, 300)
        last = await bus.last_seq()
        records = await read_until(reader, last, first)
        assert [r.seq for r in records] == list(range(1, last + 1))
        assert texts(records) == [str(n) for n in range(1, 601)]
        assert reader.restarts >= 1
        assert time.monotonic() - restarted < 10


async def test_a_deleted_consumer_is_replaced_without_a_gap(bus: Bus) -> None:
    """A consumer deleted under the reader (an operator, a server cleaning up) is replaced by
    one starting after the last delivered sequence: nothing is skipped or repeated."""
    await publish(bus, 1, 50)
    async with LogReader(bus, start_seq=1, heartbeat_s=0.5, name="deleted") as reader:
        records = await read_until(reader, 50)
        for name in await consumers(bus, "deleted-"):
            await bus.transport.request(f"$JS.API.CONSUMER.DELETE.{bus.subjects.stream}.{name}", timeout_s=5)
        await publish(bus, 51, 50)
        await read_until(reader, 100, records, timeout_s=10)
        assert [r.seq for r in records] == list(range(1, 101))
        assert reader.restarts >= 1


async def test_a_silent_server_is_left_after_two_heartbeats(nats_server: EmbeddedServer, bus: Bus) -> None:
    """A server that stops answering without closing the connection (paused here) is noticed
    after two heartbeats of silence; creating the new consumer is retried until the server
    answers again, and reading goes on exactly once."""
    assert nats_server.pid is not None
    await publish(bus, 1, 20)
    async with LogReader(bus, start_seq=1, heartbeat_s=0.5, name="silent") as reader:
        records = await read_until(reader, 20)
        os.kill(nats_server.pid, signal.SIGSTOP)
        try:
            reading = asyncio.create_task(reader.read(1_000))
            # Two heartbeats of silence, then attempts that time out while the server sleeps.
            await asyncio.sleep(2.5)
            assert not reading.done()
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)
        await publish(bus, 21, 20)
        records += await asyncio.wait_for(reading, 15)
        await read_until(reader, 40, records)
        assert [r.seq for r in records] == list(range(1, 41))
        assert reader.restarts >= 1


async def test_a_reader_not_being_read_holds_the_server_back(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond HOLD_FLOW_AT waiting records, flow-control requests wait for `read`: the server
    stops after its window instead of the whole log piling up in memory; the heartbeats that
    keep coming meanwhile do not make the reader start over; reading drains it all in order."""
    monkeypatch.setattr(log_reader, "HOLD_FLOW_AT", 100)
    padding = "x" * 2_000
    in_flight = asyncio.Semaphore(200)

    async def one(n: int) -> None:
        async with in_flight:
            await bus.send("reader", Note(text=f"{n}{padding}"))

    await asyncio.gather(*(one(n) for n in range(1, 3_001)))  # ~7 MB, a few flow-control windows
    async with LogReader(bus, start_seq=1, heartbeat_s=0.5, name="held") as reader:
        await wait_for(lambda: reader.last_seq > 0, what="the first deliveries")
        await asyncio.sleep(1.5)  # three heartbeats: the server had time to send all it would
        held = reader.last_seq
        assert 100 <= held < 3_000
        records: list[LogRecord] = []
        async with asyncio.timeout(20):
            while not records or records[-1].seq < 3_000:
                records += await reader.read(50)
        assert [r.seq for r in records] == list(range(1, 3_001))
        assert reader.restarts == 0


async def test_teardown_is_quick_when_the_server_is_gone(nats_server: EmbeddedServer, bus: Bus) -> None:
    """Leaving the reader after its server died does not wait for the consumer's deletion
    (bounded to half a second) nor for a reconnect."""
    await publish(bus, 1, 5)
    reader = LogReader(bus, start_seq=1, name="teardown")
    async with reader:
        await read_until(reader, 5)
        await nats_server.kill()
        started = time.monotonic()
    assert time.monotonic() - started < 1.5
    await nats_server.start()  # for the bus to leave cleanly
    await wait_for(lambda: bus.transport.is_connected, what="the bus to reconnect")


async def test_reads_over_tls(tmp_path: Path) -> None:
    """The reader's connection is the transport's: a server requiring TLS is read over TLS
    (the old reader refused it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    conf = tmp_path / "server.conf"
    conf.write_text(
        'host: 127.0.0.1\njetstream { sync_interval: always }\n'
        f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
    )
    settings = ServerSettings(store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=ANY_PORT, config_file=conf)
    async with EmbeddedServer(settings) as server:
        config = BusConfig(
            url=f"tls://127.0.0.1:{server.settings.port}", monitor_url=server.settings.monitor_url,
            name="tls", tls=TlsSettings(ca_file=str(cert)),
        )
        async with Bus(config) as bus:
            await publish(bus, 1, 10)
            async with LogReader(bus, start_seq=1, name="tls") as reader:
                records = await read_until(reader, 10)
            assert texts(records) == [str(n) for n in range(1, 11)]


async def consumers(bus: Bus, prefix: str) -> list[str]:
    """The names of the log stream's consumers starting with `prefix`."""
    answer = await bus.transport.request(f"$JS.API.CONSUMER.NAMES.{bus.subjects.stream}", b"{}", timeout_s=5)
    names = json.loads(answer.data).get("consumers") or []
    return [n for n in names if n.startswith(prefix)]
