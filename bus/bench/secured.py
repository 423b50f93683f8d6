"""What authorization and TLS cost: durable publishing and consuming with both on (an agent's
own nkey credential, every connection TLS-verified against a local CA) against the same on a
plain server, alternating in one run.

    auth_durable_publish_per_s  / plain_durable_publish_per_s  -> auth_publish_ratio (target >= 0.9)
    auth_consume_ack_per_s      / plain_consume_ack_per_s      -> auth_consume_ratio (target >= 0.9)
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from bus.bench import BenchEnv
from bus.bench.consume import AGENT, engine_rate, prepublish
from bus.bench.publish import durable_rate
from bus.client import Bus
from bus.config import BusConfig, TlsSettings
from bus.identity import CredentialRegistry, Role
from bus.identity.certificates import ensure_server_tls
from bus.server import ANY_PORT, EmbeddedServer, ServerSettings, find_config

# The publishing agent, and where it sends (not the consuming agent's inbox: that one is
# filled with exactly what its measurement consumes).
PUBLISHER = "writer"
SINK = "sink"


class _Side:
    """One server and the configs to use it: an agent's for the measured work, an admin's for
    setting it up (on the plain server both are plain)."""

    def __init__(self, server: EmbeddedServer, agent: BusConfig, admin: BusConfig, publisher: BusConfig) -> None:
        self.server = server
        self.agent = agent
        self.admin = admin
        self.publisher = publisher


@contextlib.asynccontextmanager
async def _plain(env: BenchEnv) -> AsyncIterator[_Side]:
    async with env.server("plain") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name=AGENT)
        yield _Side(server, config, config, BusConfig(url=server.url, monitor_url=server.settings.monitor_url,
                                                      name=PUBLISHER))


@contextlib.asynccontextmanager
async def _secured(env: BenchEnv) -> AsyncIterator[_Side]:
    env.workdir.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="secured-", dir=env.workdir))
    registry = CredentialRegistry(home)
    tls = ensure_server_tls(registry.tls_dir)
    registry.initialize(find_config(None), ("default",), tls=tls)
    consumer = registry.issue(AGENT, Role.AGENT, namespace="default")
    publisher = registry.issue(PUBLISHER, Role.AGENT, namespace="default")
    settings = ServerSettings(store_dir=home / "nats", port=ANY_PORT, monitor_port=ANY_PORT,
                              config_file=registry.server_config)
    async with EmbeddedServer(settings) as server:
        verify = TlsSettings(ca_file=tls.ca_file)

        def config(name: str, credentials: Path) -> BusConfig:
            return BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name=name,
                             credentials=str(credentials), tls=verify)

        admin = config("admin", registry.admin_credential)
        async with Bus(admin, metrics_registry=CollectorRegistry()):
            pass  # the log, made by the admin (as `bus up` does): agents may not create it
        yield _Side(server, config(AGENT, consumer.path), admin, config(PUBLISHER, publisher.path))


async def _publish_rate(side: _Side, count: int) -> float:
    async with Bus(side.publisher, metrics_registry=CollectorRegistry()) as bus:
        await durable_rate(bus, min(count // 20, 5_000), to=SINK)  # warm-up
        return await durable_rate(bus, count, to=SINK)


async def _consume_rate(side: _Side, count: int) -> float:
    async with Bus(side.admin, metrics_registry=CollectorRegistry()) as admin:
        await prepublish(admin, count)
        async with Bus(side.agent, metrics_registry=CollectorRegistry()) as agent:
            return await engine_rate(agent, count, admin=admin)


async def run(env: BenchEnv) -> dict[str, float]:
    """Both sides, alternating, on fresh servers each repeat; medians and ratios."""
    figures: dict[str, list[float]] = {
        "auth_durable_publish_per_s": [], "plain_durable_publish_per_s": [],
        "auth_consume_ack_per_s": [], "plain_consume_ack_per_s": [],
    }
    publish_count, consume_count = env.n(100_000), env.n(100_000)
    for repeat in range(env.repeats):
        order = (("plain", _plain), ("auth", _secured)) if repeat % 2 == 0 else (("auth", _secured), ("plain", _plain))
        for label, side in order:
            async with side(env) as used:
                figures[f"{label}_durable_publish_per_s"].append(await _publish_rate(used, publish_count))
                figures[f"{label}_consume_ack_per_s"].append(await _consume_rate(used, consume_count))
    result = {name: round(statistics.median(values), 1) for name, values in figures.items()}
    result["auth_publish_ratio"] = round(result["auth_durable_publish_per_s"] / result["plain_durable_publish_per_s"], 3)
    result["auth_consume_ratio"] = round(result["auth_consume_ack_per_s"] / result["plain_consume_ack_per_s"], 3)
    return result
