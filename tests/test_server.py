"""The embedded nats-server: ports it chooses itself, read back from its ports file, kept across
restarts, and a restart on a port held by someone else for a moment."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from bus import BusUnavailable, ConfigurationError
from bus.server import (
    ANY_PORT,
    EmbeddedServer,
    ServerSettings,
    read_ports_file,
    read_varz,
    wait_until_listening,
)


async def test_any_port_is_chosen_by_the_server_and_read_back(tmp_path: Path) -> None:
    """With ANY_PORT the URLs are unknown until start(); afterwards `settings` names the client
    and monitoring ports the server reported, and both answer."""
    server = EmbeddedServer(ServerSettings(store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=ANY_PORT))
    with pytest.raises(ConfigurationError, match="after start"):
        _ = server.url
    with pytest.raises(ConfigurationError, match="after start"):
        _ = server.settings.monitor_url
    async with server:
        port, monitor_port = server.settings.port, server.settings.monitor_port
        assert port != ANY_PORT and monitor_port not in (None, ANY_PORT)
        assert server.url == f"nats://127.0.0.1:{port}"
        await wait_until_listening(port, 2.0)
        assert server.settings.monitor_url == f"http://127.0.0.1:{monitor_port}"
        varz = await asyncio.to_thread(read_varz, server.settings.monitor_url)
        assert varz["port"] == port  # the monitoring port answers, for this server


async def test_restart_binds_the_ports_it_chose_first(tmp_path: Path) -> None:
    """After stop() and after kill() (which leaves a stale ports file), start() brings the
    server back on the same client and monitoring ports."""
    server = EmbeddedServer(ServerSettings(store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=ANY_PORT))
    await server.start()
    try:
        first = (server.settings.port, server.settings.monitor_port)
        await server.stop()
        await server.start()
        assert (server.settings.port, server.settings.monitor_port) == first
        await server.kill()
        await server.start()
        assert (server.settings.port, server.settings.monitor_port) == first
        await wait_until_listening(first[0], 2.0)
    finally:
        await server.stop()


async def test_restart_waits_for_a_port_held_for_a_moment(tmp_path: Path) -> None:
    """A restart whose port another socket holds starts once that socket lets go, within the
    start timeout."""
    server = EmbeddedServer(ServerSettings(store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=None))
    await server.start()
    port = server.settings.port
    await server.stop()
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        asyncio.get_running_loop().call_later(0.5, blocker.close)
        await server.start()
        assert server.settings.port == port
        assert "address already in use" in server.log_file.read_text()  # it did clash first
        await wait_until_listening(port, 2.0)
    finally:
        blocker.close()
        await server.stop()


async def test_a_port_held_past_the_start_timeout_fails_with_the_servers_reason(tmp_path: Path) -> None:
    """A fixed port that stays taken gives BusUnavailable carrying the server's log line, after
    start_timeout_s, and leaves no server running."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = EmbeddedServer(ServerSettings(store_dir=tmp_path / "nats", port=port, monitor_port=None, start_timeout_s=1.0))
        with pytest.raises(BusUnavailable, match="address already in use"):
            await server.start()
    assert server.pid is None


def test_ports_file_is_read_only_when_complete(tmp_path: Path) -> None:
    """A ports file cut short (the server writes it in place) reads as not there yet; a whole
    one gives the client port and the monitoring port, or None without monitoring."""
    path = tmp_path / "nats-server_1.ports"
    assert read_ports_file(path) is None
    path.write_text('{"nats":["nats://127.0.0.1:4')
    assert read_ports_file(path) is None
    path.write_text('{"nats":["nats://127.0.0.1:41234"],"monitoring":["http://127.0.0.1:41235"]}')
    assert read_ports_file(path) == (41234, 41235)
    path.write_text('{"nats":["nats://127.0.0.1:41234"]}')
    assert read_ports_file(path) == (41234, None)
