"""The `nats_cluster` fixture: a real 3-node JetStream cluster (`bus.cluster.LocalCluster`) under
the test's tmp_path, from the repo's nats.conf (fsync on every write), stopped and reaped after
the test. conftest.py imports it, so every test module can ask for it by name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus.cluster import LocalCluster
from bus.config import TlsSettings
from bus.identity import CredentialRegistry, Role
from bus.identity.certificates import ensure_server_tls
from bus.server import find_config


@pytest.fixture
def cluster_access(tmp_path: Path) -> "ClusterAccess":
    """Authorization and TLS for `nats_cluster`: its admin credential and the CA to verify it."""
    return ClusterAccess(tmp_path / "cluster-identity")


@pytest.fixture
async def nats_cluster(tmp_path: Path, cluster_access: "ClusterAccess") -> AsyncIterator[LocalCluster]:
    """Three nodes (`continuum-1`..`continuum-3`) on ports they chose, with a JetStream meta
    leader they all agree on, authorization and TLS on (`cluster_access`: clients and the routes
    between the nodes). `cluster.url` / `cluster.monitor_url` are the BusConfig values."""
    async with LocalCluster(3, store_root=tmp_path / "cluster", config=cluster_access.server_config,
                            route_tls=cluster_access.served) as cluster:
        yield cluster


class ClusterAccess:
    """How clients reach a secured local cluster: authorization on (the admin credential, and an
    agent's own on request) and TLS on every client connection and route, verified with a local
    CA (`served`: the certificate the nodes present, None without TLS)."""

    def __init__(self, home: Path, *, tls: bool = True) -> None:
        self.registry = CredentialRegistry(home)
        served = ensure_server_tls(self.registry.tls_dir) if tls else None
        self.served = served
        self.registry.initialize(find_config(None), ("default",), tls=served)
        self.tls = TlsSettings(ca_file=served.ca_file) if served is not None else None
        self.admin = str(self.registry.admin_credential)

    @property
    def server_config(self) -> Path:
        return self.registry.server_config

    def env(self) -> dict[str, str]:
        """The BUS_* settings that present the admin credential and verify the servers."""
        return {"BUS_CREDS": self.admin, **({"BUS_TLS_CA": str(self.tls.ca_file)} if self.tls else {})}

    def agent(self, name: str) -> str:
        """`name`'s own credential file (issued before the cluster starts: no reload needed)."""
        return str(self.registry.issue(name, Role.AGENT, namespace="default").path)
