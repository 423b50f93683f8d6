"""Configuration that matters once there is more than one server: seed URL lists, the log's
replica count (applied idempotently, changed with one command), the fsync check on every node,
and a Bus opened the moment a cluster forms."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from bus import Bus, BusConfig
from bus.cluster import LocalCluster
from cluster import ClusterAccess
from bus.config import StreamSettings
from bus.errors import ConfigurationError
from bus.fsync import node_fsync
from bus.server import EmbeddedServer, read_varz
from schemas.payloads import Note
from conftest import refused_port
from test_cli import run_bus


def cluster_env(tmp_path: Path, cluster: LocalCluster, access: ClusterAccess, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    return {**clean, "BUS_HOME": str(tmp_path / "home"), "BUS_URL": cluster.url,
            "BUS_MONITOR_URL": cluster.monitor_url, **access.env(), **extra}


async def replicas_of(bus: Bus, stream: str) -> int:
    return int((await bus.js.stream_info(stream)).config.num_replicas or 1)


async def test_a_bus_opened_as_the_cluster_forms_does_not_wait_out_a_lost_request(tmp_path: Path) -> None:
    """The first Bus, opened right after the nodes start (meta leader just elected), creates an R3
    log in a few seconds, not after a 10 s request timeout."""
    async with LocalCluster(3, store_root=tmp_path / "cluster") as cluster:
        started = time.monotonic()
        config = BusConfig(url=cluster.url, monitor_url=cluster.monitor_url, stream=StreamSettings(replicas=3))
        async with Bus(config) as bus:
            await bus.send("someone", Note(text="first"))
            elapsed = time.monotonic() - started
            assert await replicas_of(bus, bus.subjects.stream) == 3
            assert await replicas_of(bus, bus.subjects.advisory_stream) == 3
    assert elapsed < 8.0, elapsed


async def test_replicas_are_applied_idempotently_and_changed_with_one_command(
    nats_cluster: LocalCluster, cluster_access: ClusterAccess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An R1 log stays R1 when a process asks for 3 (a warning names the field); `bus stream
    update --replicas 3` makes it (and the advisory stream) R3; BUS_REPLICAS=3 then agrees."""
    caplog.set_level(logging.WARNING, logger="continuum.topology")
    r1 = BusConfig(url=nats_cluster.url, monitor_url=nats_cluster.monitor_url, credentials=cluster_access.admin,
                   tls=cluster_access.tls)
    async with Bus(r1) as bus:
        await bus.send("someone", Note(text="on one replica"))
        assert await replicas_of(bus, bus.subjects.stream) == 1
    async with Bus(BusConfig.from_env(cluster_env(tmp_path, nats_cluster, cluster_access, BUS_REPLICAS="3"))) as bus:
        assert await replicas_of(bus, bus.subjects.stream) == 1
    assert any("num_replicas live 1, wanted 3" in r.getMessage() for r in caplog.records)

    env = cluster_env(tmp_path, nats_cluster, cluster_access)
    result = await run_bus("stream", "update", "--replicas", "3", env=env, cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "num_replicas 1 -> 3" in result.stdout
    caplog.clear()
    async with Bus(BusConfig.from_env(cluster_env(tmp_path, nats_cluster, cluster_access, BUS_REPLICAS="3"))) as bus:
        assert await replicas_of(bus, bus.subjects.stream) == 3
        assert await replicas_of(bus, bus.subjects.advisory_stream) == 3
        assert (await bus.last_seq()) >= 1  # the message stored on one replica is still there
    assert not any("num_replicas" in r.getMessage() for r in caplog.records)


async def test_three_replicas_on_one_server_is_a_clear_configuration_error(
    nats_server: EmbeddedServer, admin_credentials: str
) -> None:
    config = BusConfig(url=nats_server.url, stream=StreamSettings(replicas=3), credentials=admin_credentials)
    with pytest.raises(ConfigurationError, match="bus up --cluster 3"):
        async with Bus(config):
            pass


@pytest.mark.parametrize("value", ["0", "6", "three", "-1"])
def test_bus_replicas_is_checked(value: str) -> None:
    with pytest.raises(ConfigurationError, match="BUS_REPLICAS"):
        BusConfig.from_env({"BUS_REPLICAS": value})


def test_bus_url_takes_several_seeds() -> None:
    config = BusConfig.from_env({"BUS_URL": "nats://a:4222, nats://user:pw@b:4223,tls://c:4224"})
    assert config.servers == ("nats://a:4222", "nats://user:pw@b:4223", "tls://c:4224")
    assert config.shown_url == "nats://a:4222,nats://b:4223,tls://c:4224"  # no credentials in messages
    assert BusConfig(url=("nats://a:1", "nats://b:2")).servers == ("nats://a:1", "nats://b:2")
    with pytest.raises(ConfigurationError):
        BusConfig(url=" , ")
    with pytest.raises(ConfigurationError, match="scheme"):
        from bus.transport import ConnectionSpec

        ConnectionSpec.from_config(BusConfig(url="http://a:1"))


async def test_a_bus_works_through_a_later_seed_when_the_first_is_down(
    nats_server: EmbeddedServer, admin_credentials: str
) -> None:
    """A dead first seed (nothing listening) is skipped: publishing and consuming work through the next."""
    with refused_port() as dead:
        url = f"nats://127.0.0.1:{dead},{nats_server.url}"
        async with Bus(BusConfig(url=url, monitor_url=nats_server.settings.monitor_url, credentials=admin_credentials)) as bus:
            got = asyncio.Event()

            async def handle(envelope, delivery) -> None:
                got.set()

            async with bus.consumer("seeded", handle):
                await bus.send("seeded", Note(text="through the second seed"))
                await asyncio.wait_for(got.wait(), 10)


async def test_fsync_is_verified_on_every_node_and_an_unverifiable_one_refused(
    nats_cluster: LocalCluster, cluster_access: ClusterAccess, nats_server: EmbeddedServer, admin_credentials: str
) -> None:
    """Every node holding the log is asked; a monitoring URL missing for one of them (here: the
    list names only one node) refuses to start under require_fsync, and only warns without it."""
    r3 = StreamSettings(replicas=3)
    secured = {"credentials": cluster_access.admin, "tls": cluster_access.tls}
    async with Bus(BusConfig(url=nats_cluster.url, monitor_url=nats_cluster.monitor_url, stream=r3, **secured)):
        pass  # all three verified
    partial = nats_cluster.monitor_urls[0]
    with pytest.raises(ConfigurationError, match="cannot verify"):
        async with Bus(BusConfig(url=nats_cluster.url, monitor_url=partial, stream=r3, **secured)):
            pass
    async with Bus(BusConfig(url=nats_cluster.url, monitor_url=partial, stream=r3, require_fsync=False, **secured)):
        pass
    # A single server whose monitoring URL does not answer cannot be verified either.
    with refused_port() as dead, pytest.raises(ConfigurationError, match="cannot verify"):
        async with Bus(BusConfig(url=nats_server.url, monitor_url=f"http://127.0.0.1:{dead}", credentials=admin_credentials)):
            pass
    with pytest.raises(ConfigurationError, match="cannot verify"):
        async with Bus(BusConfig(url=nats_server.url, monitor_url="http://127.0.0.1:notaport", credentials=admin_credentials)):
            pass


async def test_the_fsync_check_does_not_wait_for_a_hung_node_outside_the_log(
    nats_cluster: LocalCluster, nats_server: EmbeddedServer
) -> None:
    """A hung node (SIGSTOP: its monitoring port accepts, then answers nothing) costs the fsync
    check nothing when it holds no part of the log: the check returns once the log's nodes are
    verified, the hung URL neither verified nor waited out. Asked for every URL, the same hung
    node is named unread once its read times out."""
    hung = nats_server.settings.monitor_url
    assert hung is not None and nats_server.pid is not None
    urls = (*nats_cluster.monitor_urls, hung)
    log_nodes = frozenset(node.name for node in nats_cluster.nodes)
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        verdicts, unread = await node_fsync(urls, enough=log_nodes)
        assert verdicts == dict.fromkeys(log_nodes, True)
        assert unread == []  # not waited for: a read that had timed out would be listed
        verdicts, unread = await node_fsync(urls)
        assert verdicts == dict.fromkeys(log_nodes, True)
        assert [u.split(" ", 1)[0] for u in unread] == [hung], unread
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)


async def test_routes_between_the_nodes_are_tls_verified_both_ways(
    nats_cluster: LocalCluster, cluster_access: ClusterAccess
) -> None:
    """Every node requires TLS on its route port and verifies the dialing node's certificate;
    the cluster formed over those routes (an R3 log takes writes); plain text to a route port
    gets no cluster protocol."""
    for url in nats_cluster.monitor_url.split(","):
        route = (await asyncio.to_thread(read_varz, url))["cluster"]
        assert route["tls_required"] is True and route["tls_verify"] is True, route
    config = BusConfig(url=nats_cluster.url, monitor_url=nats_cluster.monitor_url, credentials=cluster_access.admin,
                       tls=cluster_access.tls, stream=StreamSettings(replicas=3))
    async with Bus(config) as bus:
        sent = await bus.send("someone", Note(text="over TLS routes"))
        assert sent.ack.seq > 0 and await replicas_of(bus, bus.subjects.stream) == 3
    cluster = nats_cluster.nodes[0].server.settings.cluster
    assert cluster is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
    try:
        writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
        async with asyncio.timeout(10):
            heard = await reader.read(4096)
        assert b"PONG" not in heard and b"INFO" not in heard, heard
    finally:
        writer.close()
