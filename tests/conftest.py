"""Shared fixtures: a real nats-server per test (random port, temporary store dir) and a Bus.

Nothing here fakes the broker. Helpers wait on conditions with deadlines; none sleeps and hopes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bus import Bus, BusConfig
from bus.errors import BusUnavailable
from bus.server import EmbeddedServer, ServerSettings, free_port

# `free_port` cannot reserve a port: another process (an outgoing connection takes an ephemeral
# port too) may bind it before nats-server does. Such a start is retried on fresh ports.
PORT_ATTEMPTS = 5


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A real nats-server started from the repo's nats.conf (fsync always) on free ports."""
    server = await start_on_free_ports(tmp_path / "nats")
    try:
        yield server
    finally:
        await server.stop()


async def start_on_free_ports(store_dir: Path) -> EmbeddedServer:
    """Start a nats-server on ports that were free a moment ago; when one was taken meanwhile
    (its log says "address already in use"), start again on fresh ones, up to PORT_ATTEMPTS
    times. Raises BusUnavailable for any other failure."""
    attempt = 1
    while True:
        settings = ServerSettings(store_dir=store_dir, port=free_port(), monitor_port=free_port())
        # A log per attempt: an earlier attempt's clash must not be read as this one's.
        server = EmbeddedServer(settings, log_file=store_dir / f"nats-server-{attempt}.log")
        try:
            await server.start()
        except BusUnavailable as exc:
            if attempt == PORT_ATTEMPTS or "address already in use" not in str(exc):
                raise
            attempt += 1
        else:
            return server


@pytest.fixture
def bus_config(nats_server: EmbeddedServer) -> BusConfig:
    return BusConfig(url=nats_server.url, monitor_url=nats_server.settings.monitor_url, name="tester")


@pytest.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[Bus]:
    async with Bus(bus_config) as connected:
        yield connected


async def wait_for(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.01,
    what: str = "condition",
) -> None:
    """Poll `condition` until it is true; fail the test with `what` after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)
