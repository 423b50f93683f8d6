"""Shared fixtures: a real nats-server per test (random port, temporary store dir) and a Bus.

Nothing here fakes the broker. Helpers wait on conditions with deadlines; none sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bus import Bus, BusConfig
from bus.identity import CredentialRegistry
from bus.server import ANY_PORT, EmbeddedServer, ServerSettings, find_config
from cluster import cluster_access, nats_cluster  # noqa: F401 - the 3-node cluster fixtures (tests/cluster.py)

if TYPE_CHECKING:
    from bus.log_reader import LogRecord


@pytest.fixture
def identity(tmp_path: Path) -> CredentialRegistry:
    """The credentials of the test's server: authorization is on in every test, as under `bus up`
    (the admin's credential is `admin_credentials`; `identity.issue(...)` makes an agent's)."""
    registry = CredentialRegistry(tmp_path / "identity")
    registry.initialize(find_config(None), ("default",))
    return registry


@pytest.fixture
def admin_credentials(identity: CredentialRegistry) -> str:
    return str(identity.admin_credential)


@pytest.fixture
async def nats_server(tmp_path: Path, identity: CredentialRegistry) -> AsyncIterator[EmbeddedServer]:
    """A real nats-server started from the repo's nats.conf (fsync always) with authorization on,
    on client and monitoring ports it chose itself; a restart (stop() then start()) binds the
    same ones. Clients connect with `admin_credentials` (the `bus_config` fixture does)."""
    server = EmbeddedServer(ServerSettings(
        store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=ANY_PORT, config_file=identity.server_config,
    ))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for the duration of the block: a socket holds
    it bound without listening (and without SO_REUSEADDR), so no other process can bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def bus_config(nats_server: EmbeddedServer, admin_credentials: str) -> BusConfig:
    return BusConfig(
        url=nats_server.url, monitor_url=nats_server.settings.monitor_url, name="tester", credentials=admin_credentials,
    )


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


async def read_records(bus: Bus, upto: int, *, sealed: bool = False) -> list["LogRecord"]:
    """The log's records from seq 1 through `upto`, as the projections read them; private
    records opened with `bus`'s keys, as the projection service opens them before its folds
    (projections.opening), unless `sealed` (the stored bytes)."""
    from bus.log_reader import LogReader

    records: list[LogRecord] = []
    async with LogReader(bus, start_seq=1) as reader:
        while not records or records[-1].seq < upto:
            records += await reader.read(10_000)
    if not sealed:
        records = [record._replace(data=await bus.unsealed(record.data)) for record in records]
    return records


def seed_of(credentials: str) -> str:
    """The nkey seed in a credential file, for a raw nats-py client (`nkeys_seed_str=`)."""
    from bus.identity import load_credential

    return load_credential(credentials).seed


def admin_env(env: dict[str, str], nats_server: EmbeddedServer, admin_credentials: str) -> dict[str, str]:
    """`env` for a `bus` subprocess (or any BusConfig.from_env) on the test's server, as its admin."""
    return {
        **env, "BUS_URL": nats_server.url, "BUS_MONITOR_URL": nats_server.settings.monitor_url or "",
        "BUS_CREDS": admin_credentials,
    }
