"""A local JetStream cluster: N `nats-server` processes on 127.0.0.1, for development and tests.

    async with LocalCluster(3, store_root=tmp_path / "cluster") as cluster:
        config = BusConfig(url=cluster.url, monitor_url=cluster.monitor_url,
                           stream=StreamSettings(replicas=3))
        ...
        await cluster.node_named("continuum-2").kill()     # a crash; .start() brings it back

Each node is an `EmbeddedServer` from the repo's nats.conf (fsync on every write) with a name of
its own (`continuum-1`..`continuum-N`), a store directory of its own (`<store_root>/<name>`), its
own client, monitoring and route ports. Every node lists every node's route URL, so they find
each other whichever comes up first. Route ports are chosen before the start, because each node
names the others' on its command line: outside the kernel's ephemeral range, so that no port the
kernel hands out meanwhile (to a node binding port 0, to an outgoing connection) can be one of
them. Client and monitoring ports are chosen by each server itself unless given. A restarted
node keeps its name, ports and store.

The cluster is ready when the JetStream meta group has a leader that every running node names
and that hears from all of them (`/jsz`): only then can a replicated stream be placed. On a store
that already holds replicated streams (a restart), each of those also needs a leader of its own
before it answers: a fresh election, 4-9 s of raft timeout in nats-server 2.15.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bus.errors import BusUnavailable, ConfigurationError
from bus.server import (
    ANY_PORT,
    EmbeddedServer,
    RouteSettings,
    ServerSettings,
    free_port_outside_ephemeral_range,
    read_monitor,
)

if TYPE_CHECKING:
    from bus.identity.certificates import ServerTls

CLUSTER_NAME = "continuum"
# How long one /jsz read may take; a paused or dying node must not hold up a readiness poll.
JSZ_TIMEOUT_S = 1.0


class ClusterNode:
    """One nats-server of a LocalCluster. `start()` after `stop()` or `kill()` brings it back
    with the same name, ports and store directory, as a restarted machine would come back."""

    def __init__(self, name: str, server: EmbeddedServer) -> None:
        self.name = name
        self.server = server

    @property
    def url(self) -> str:
        """Its client URL. Raises ConfigurationError before the first start on a chosen port."""
        return self.server.url

    @property
    def monitor_url(self) -> str:
        """Its monitoring URL. Raises ConfigurationError before the first start on a chosen port."""
        url = self.server.settings.monitor_url
        assert url is not None  # LocalCluster always turns monitoring on
        return url

    @property
    def route_url(self) -> str:
        """The URL the other nodes dial. Raises ConfigurationError before the cluster's first start."""
        if self.server.settings.cluster is None:
            raise ConfigurationError("route ports are chosen when the cluster starts")
        return self.server.settings.cluster.url

    @property
    def pid(self) -> int | None:
        """The pid of its nats-server; None while it is stopped or killed."""
        return self.server.pid

    @property
    def store_dir(self) -> Path:
        return self.server.settings.store_dir

    @property
    def log_file(self) -> Path:
        return self.server.log_file

    @property
    def running(self) -> bool:
        """True while its process runs (paused included)."""
        return self.server.running

    @property
    def paused(self) -> bool:
        """True while it is stopped by SIGSTOP (`pause()`)."""
        pid = self.server.pid
        return pid is not None and self.server.running and _process_state(pid) in ("T", "t")

    async def start(self) -> None:
        """Start it (again) and wait until it accepts clients. Raises BusUnavailable naming the
        node when it exits or is not ready in time (its log's end in the message)."""
        try:
            await self.server.start()
        except BusUnavailable as exc:
            raise BusUnavailable(f"cluster node {self.name}: {exc}") from exc

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (a paused node is resumed to act on it), then SIGKILL after `grace_s`."""
        await self.server.stop(grace_s)

    async def restart(self) -> None:
        """stop() then start(). Raises BusUnavailable as start() does."""
        await self.stop()
        await self.start()

    async def kill(self) -> None:
        """SIGKILL it now (a crash: no goodbye to its peers) and reap it."""
        await self.server.kill()

    async def wait(self) -> int | None:
        """Wait until its process exits; the exit code, or None when it is not running."""
        return await self.server.wait()

    async def pause(self, timeout_s: float = 5.0) -> None:
        """SIGSTOP it (a hung machine: its connections stay open, nothing answers) and wait until
        it is stopped. Raises ConfigurationError when it is not running."""
        await self._signal(signal.SIGSTOP, paused=True, timeout_s=timeout_s)

    async def resume(self, timeout_s: float = 5.0) -> None:
        """SIGCONT a paused node and wait until it runs again. Raises ConfigurationError when it
        is not running."""
        await self._signal(signal.SIGCONT, paused=False, timeout_s=timeout_s)

    async def _signal(self, sig: signal.Signals, *, paused: bool, timeout_s: float) -> None:
        pid = self.server.pid
        if pid is None or not self.server.running:
            raise ConfigurationError(f"cluster node {self.name} is not running")
        os.kill(pid, sig)  # our own unreaped child: the pid cannot have been reused
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (state := _process_state(pid)) and (state in ("T", "t")) != paused:
            if loop.time() >= deadline:
                raise BusUnavailable(f"cluster node {self.name} (pid {pid}) did not take {sig.name} within {timeout_s}s")
            await asyncio.sleep(0.01)

    def __repr__(self) -> str:
        return f"ClusterNode({self.name!r}, pid={self.pid})"


class LocalCluster:
    """N nats-server processes forming one JetStream cluster on 127.0.0.1, as an async context
    manager (see the module docstring). Does no I/O until started.

    `size` nodes (at least 3: a quorum that survives losing one), stores under `store_root`,
    config from `config` (default: the repo's nats.conf). `client_ports` / `monitor_ports` fix
    each node's ports (default: each server chooses). `new_session` / `detached`: as for
    `EmbeddedServer` (`bus up` runs a cluster in sessions of its own, detached with --detach).
    `route_tls`: the nodes' routes to each other are TLS with this certificate (None: plain).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        store_root: Path,
        config: Path | None = None,
        client_ports: Sequence[int] | None = None,
        monitor_ports: Sequence[int] | None = None,
        name_prefix: str = CLUSTER_NAME,
        start_timeout_s: float = 20.0,
        new_session: bool = False,
        detached: bool = False,
        route_tls: ServerTls | None = None,
    ) -> None:
        if size < 3:
            raise ConfigurationError(f"a local cluster needs at least 3 nodes (a quorum that survives losing one), not {size}")
        for what, ports in (("client_ports", client_ports), ("monitor_ports", monitor_ports)):
            if ports is not None and len(ports) != size:
                raise ConfigurationError(f"{what} names {len(ports)} ports for {size} nodes")
        self.size = size
        self.store_root = store_root
        self.route_tls = route_tls
        self.start_timeout_s = start_timeout_s
        self.nodes: list[ClusterNode] = []
        for i in range(size):
            name = f"{name_prefix}-{i + 1}"
            settings = ServerSettings(
                store_dir=store_root / name,
                port=client_ports[i] if client_ports is not None else ANY_PORT,
                monitor_port=monitor_ports[i] if monitor_ports is not None else ANY_PORT,
                config_file=config,
                start_timeout_s=start_timeout_s,
                server_name=name,
            )
            server = EmbeddedServer(settings, new_session=new_session, detached=detached)
            self.nodes.append(ClusterNode(name, server))

    # -- addresses -----------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, in node order. Raises ConfigurationError before start."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The client URLs comma-joined: the value for BUS_URL / BusConfig.url."""
        return ",".join(self.urls)

    @property
    def monitor_urls(self) -> list[str]:
        """Every node's monitoring URL, in node order. Raises ConfigurationError before start."""
        return [node.monitor_url for node in self.nodes]

    @property
    def monitor_url(self) -> str:
        """The monitoring URLs comma-joined: the value for BUS_MONITOR_URL / BusConfig.monitor_url."""
        return ",".join(self.monitor_urls)

    def node_named(self, name: str) -> ClusterNode:
        """The node called `name` (as a stream's cluster info names it). Raises KeyError."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in this cluster ({', '.join(n.name for n in self.nodes)})")

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every node, wait for the JetStream meta leader, then for a leader of every stream
        already in the stores. On any failure every node is stopped again. Raises BusUnavailable
        (which node, and why), ConfigurationError when the binary or the config is missing."""
        try:
            await self.start_nodes()
            await self.wait_for_meta_leader()
            await self.wait_for_stream_leaders()
        except BaseException:
            await self.stop()
            raise

    async def start_nodes(self) -> None:
        """Start every node (at once) and wait until each accepts clients, not for the meta
        leader. On a failure every node is stopped again. Raises as start() does."""
        if self.nodes[0].server.settings.cluster is None:
            self._choose_route_ports()
        results = await asyncio.gather(*(node.start() for node in self.nodes), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]

    def _choose_route_ports(self) -> None:
        ports: set[int] = set()
        while len(ports) < self.size:
            ports.add(free_port_outside_ephemeral_range())
        chosen = sorted(ports)
        routes = tuple(f"nats://127.0.0.1:{port}" for port in chosen)
        for node, port in zip(self.nodes, chosen, strict=True):
            route = RouteSettings(port=port, routes=routes, cluster_name=CLUSTER_NAME, tls=self.route_tls)
            node.server.settings = replace(node.server.settings, cluster=route)

    async def wait_for_meta_leader(self, timeout_s: float | None = None) -> str:
        """Wait until every running, unpaused node names the same JetStream meta leader and that
        leader hears from all of them; return its name. Raises BusUnavailable after `timeout_s`
        (default: the start timeout), saying what each node reported."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            views = await self.jsz_views()
            leader = agreed_meta_leader(views)
            if leader is not None:
                return leader
            if loop.time() >= deadline:
                raise BusUnavailable(
                    f"the local cluster's JetStream meta group has no leader all nodes agree on after "
                    f"{timeout_s}s ({describe_meta_views(views)}); the nodes' logs are "
                    f"{self.store_root}/<node>/nats-server.log"
                )
            await asyncio.sleep(0.05)

    async def wait_for_stream_leaders(self, timeout_s: float | None = None) -> dict[str, str]:
        """Wait until every stream a running, unpaused node holds has a leader that all its
        holders name, itself running and unpaused; return {stream: leader} (empty when there
        are no streams). Raises
        BusUnavailable after `timeout_s` (default: the start timeout) naming the streams without."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            views = await self.jsz_views(streams=True)
            leaders, missing = agreed_stream_leaders(views)
            if not missing:
                return leaders
            if loop.time() >= deadline:
                raise BusUnavailable(
                    f"streams without a leader all their nodes agree on after {timeout_s}s: "
                    f"{', '.join(sorted(missing))}; the nodes' logs are {self.store_root}/<node>/nats-server.log"
                )
            await asyncio.sleep(0.05)

    async def jsz_views(self, *, streams: bool = False) -> dict[str, dict[str, Any] | None]:
        """Each running, unpaused node's /jsz (with `streams`, each stream's cluster block and
        state too), by node name; None where it could not be read."""
        endpoint = "jsz?streams=true" if streams else "jsz"

        async def view(node: ClusterNode) -> dict[str, Any] | None:
            try:
                return await asyncio.to_thread(read_monitor, node.monitor_url, endpoint, JSZ_TIMEOUT_S)
            except (OSError, ValueError):
                return None

        live = [node for node in self.nodes if node.running and not node.paused]
        found = await asyncio.gather(*(view(node) for node in live))
        return {node.name: jsz for node, jsz in zip(live, found, strict=True)}

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop every node (SIGTERM, SIGKILL after `grace_s`), paused ones included, and reap
        them. Safe to call twice."""
        await asyncio.gather(*(node.stop(grace_s) for node in self.nodes))

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def agreed_meta_leader(views: Mapping[str, Mapping[str, Any] | None]) -> str | None:
    """The meta leader when every node's /jsz (by node name) names the same one in its
    `meta_cluster`, that leader is among the nodes, and its own view has every other node
    current; else None."""
    metas = {name: _meta(jsz) for name, jsz in views.items()}
    if not metas or any(meta is None for meta in metas.values()):
        return None
    leaders = {str(meta.get("leader") or "") for meta in metas.values() if meta is not None}
    if len(leaders) != 1:
        return None
    leader = leaders.pop()
    own = metas.get(leader)
    if not leader or own is None:
        return None
    current = {r.get("name") for r in own.get("replicas") or [] if r.get("current")}
    return leader if set(views) - {leader} <= current else None


def agreed_stream_leaders(views: Mapping[str, Mapping[str, Any] | None]) -> tuple[dict[str, str], set[str]]:
    """From every node's /jsz?streams=true (by node name): ({stream: leader} for the streams
    whose holders all name the same leader, one of these nodes; {streams without one}). A node
    that did not answer makes its streams unknown: "(node <name>)" stands in the second set."""
    named: dict[str, set[str]] = {}
    missing: set[str] = set()
    for node, jsz in views.items():
        if jsz is None:
            missing.add(f"(node {node})")
            continue
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                key = stream.get("name", "?") if account.get("name") in (None, "$G") else f"{account['name']}/{stream.get('name')}"
                named.setdefault(key, set()).add(str((stream.get("cluster") or {}).get("leader") or ""))
    leaders = {}
    for stream, names in named.items():
        leader = names.pop() if len(names) == 1 else ""
        if leader in views:  # a leader that is down (or paused) does not count
            leaders[stream] = leader
        else:
            missing.add(stream)
    return leaders, missing


def describe_meta_views(views: Mapping[str, Mapping[str, Any] | None]) -> str:
    """'continuum-1: leader continuum-2; continuum-3: no /jsz answer' for an error message."""
    if not views:
        return "no node running"
    parts = []
    for name, jsz in views.items():
        meta = _meta(jsz)
        if meta is None:
            parts.append(f"{name}: no meta group in its /jsz answer")
        else:
            parts.append(f"{name}: leader {meta.get('leader') or '(none)'}")
    return "; ".join(parts)


def _meta(jsz: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    meta = jsz.get("meta_cluster") if jsz is not None else None
    return meta if isinstance(meta, Mapping) else None


def _process_state(pid: int) -> str:
    """The state letter of `pid` from /proc (R, S, T for stopped, Z, ...); "" when unknown (no
    /proc: a signal is then trusted to have been taken)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]
