"""The embedded server's state file (`<home>/server.json`), written by `bus up`, read by others."""

from __future__ import annotations

from pathlib import Path

import msgspec

from bus.config import TlsSettings


class NodeState(msgspec.Struct, frozen=True, kw_only=True):
    """One nats-server `bus up` started: a node of a local cluster, or the single server."""

    name: str
    pid: int
    url: str
    monitor_url: str | None
    store_dir: str


class ServerState(msgspec.Struct, frozen=True, kw_only=True):
    # A single server: its pid, URLs and store. A local cluster (`bus up --cluster N`): the first
    # node's pid, every node's URLs comma-joined (the BUS_URL and BUS_MONITOR_URL values), the
    # directory holding the nodes' stores; each node is in `nodes`.
    pid: int
    url: str
    monitor_url: str | None
    store_dir: str
    # Pid of the projection service started alongside the server, if any.
    projections_pid: int | None = None
    # Pid of a foreground `bus up` that owns the children: `bus down` asks it to stop them.
    supervisor_pid: int | None = None
    # The nodes of a local cluster; empty for a single server (and in files written before
    # clusters existed).
    nodes: tuple[NodeState, ...] = ()
    # The CA that verifies the servers when they serve TLS (`bus up --tls`); None: plain TCP.
    tls_ca: str | None = None
    # The console `bus up` started (its keeper's pid) and its address; None with --no-ui.
    console_pid: int | None = None
    console_url: str | None = None

    @property
    def tls(self) -> TlsSettings | None:
        """TLS settings verifying these servers with the CA `bus up --tls` recorded; None: plain."""
        return TlsSettings(ca_file=self.tls_ca) if self.tls_ca else None

    @property
    def servers(self) -> tuple[NodeState, ...]:
        """Every nats-server recorded: the cluster's nodes, or the single server as one node."""
        if self.nodes:
            return self.nodes
        single = NodeState(
            name="nats-server", pid=self.pid, url=self.url, monitor_url=self.monitor_url, store_dir=self.store_dir
        )
        return (single,)


def state_path(home: Path) -> Path:
    return home / "server.json"


def read_state(home: Path) -> ServerState | None:
    """The recorded state, or None if there is none or it is unreadable."""
    path = state_path(home)
    try:
        return msgspec.json.decode(path.read_bytes(), type=ServerState)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def write_state(home: Path, state: ServerState) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tmp = state_path(home).with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    tmp.replace(state_path(home))


def clear_state(home: Path) -> None:
    state_path(home).unlink(missing_ok=True)
