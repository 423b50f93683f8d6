"""Shared fixtures: a real nats-server per test (random port, temporary store dir) and a Bus.

Nothing here fakes the broker. Helpers wait on conditions with deadlines; none sleeps and hopes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bus import Bus, BusConfig
from bus.server import EmbeddedServer, ServerSettings, free_port


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A real nats-server started from the repo's nats.conf (fsync always) on free ports."""
    settings = ServerSettings(store_dir=tmp_path / "nats", port=free_port(), monitor_port=free_port())
    async with EmbeddedServer(settings) as server:
        yield server


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
