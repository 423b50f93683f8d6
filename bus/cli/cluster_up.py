"""`bus up --cluster N`: a local JetStream cluster (bus.cluster.LocalCluster) and the projection
service, in the foreground or detached, like the single server's `bus up` (server_commands).

The nodes are `continuum-1`..`continuum-N`, each with its store in `<home>/cluster/<node>` and its
own client, monitoring and route ports on 127.0.0.1. Once the JetStream meta group has a leader
every node agrees on (and, on a restart, every stream in the stores has one too), a `Bus` creates
the namespace's log with N replicas; then the projection service and the console start, pointed
at every node. `<home>/server.json` records each node (name, pid, URLs, store) before anything
waits on them, so `bus down` can stop them whatever happens next.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
from pathlib import Path

import msgspec

from bus.cli.common import CliError, out
from bus.cli.keeper import describe_exit
from bus.cli.server_commands import (
    DEFAULT_MONITOR_PORT,
    DEFAULT_PORT,
    FSYNC_TEXT,
    _check_port_free,
    _projections_command,
    _stop_child,
    _terminate,
    _wait_projections_ready,
    access_summary,
    local_access,
    print_next_steps,
    projections_summary,
    setup_auth,
    start_console_child,
    start_console_detached,
    start_projections_detached,
    up_metrics_endpoint,
)
from bus.cli.console_up import console_command, console_summary
from bus.cli.up_metrics import up_metrics
from bus.cli.state import NodeState, ServerState, clear_state, read_state, state_path, write_state
from bus.cluster import ClusterNode, LocalCluster
from bus.config import BusConfig, StreamSettings
from bus.errors import BusUnavailable
from bus.identity.certificates import serves_routes
from bus.server import find_config, find_nats_server, port_bindable, read_varz


class LogReady(msgspec.Struct, frozen=True, kw_only=True):
    """The replicated log as `bus up` left it: its stream, live replica count, leader, and
    whether every node fsyncs each write (None when a node could not be asked)."""

    stream: str
    replicas: int
    leader: str | None
    fsync: bool | None


async def run_up_cluster(args: argparse.Namespace, home: Path) -> int:
    """Start a local cluster of `args.cluster` nodes (and the projections); foreground or
    detached. Raises CliError (or BusUnavailable) on failure, with every node stopped again."""
    find_nats_server()  # fail early (exit 2) if the binary or the config is missing
    find_config(args.config)
    auth = await setup_auth(args, home)
    route_tls = args.server_tls
    if route_tls is not None and not await asyncio.to_thread(_serves_routes, route_tls.cert_file):
        raise CliError(
            f"{route_tls.cert_file} does not allow client authentication: the nodes of a cluster present it to each "
            "other on their routes (TLS, verified both ways); give a certificate with both serverAuth and clientAuth"
        )
    size = args.cluster
    cluster = LocalCluster(
        size,
        store_root=(args.store or home / "cluster").resolve(),
        config=auth.server_config if auth is not None else args.config,
        client_ports=await _node_ports(args.port, DEFAULT_PORT, size, "--port"),
        monitor_ports=await _node_ports(args.monitor_port, DEFAULT_MONITOR_PORT, size, "--monitor-port"),
        start_timeout_s=args.start_timeout,
        new_session=True,  # a Ctrl-C in the terminal reaches only `bus up`, which stops them in order
        detached=args.detach,
        route_tls=route_tls,
    )
    if args.detach:
        return await _up_detached(args, home, cluster)
    return await _up_foreground(args, home, cluster)


def _serves_routes(cert_file: str) -> bool:
    try:
        return serves_routes(Path(cert_file))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the TLS certificate {cert_file}: {exc}") from exc


async def _node_ports(given: int | None, default: int, size: int, option: str) -> list[int] | None:
    """`size` consecutive ports from `given` (each checked free, else CliError naming it), or
    from `default` when all of those are free, else None: each server chooses its own."""
    if given is None:
        ports = list(range(default, default + size))
        return ports if all(port_bindable(port) for port in ports) else None
    if given + size - 1 > 65535:
        raise CliError(f"{option} {given}: {size} nodes need ports {given}..{given + size - 1}, past 65535")
    for port in range(given, given + size):
        await _check_port_free(port, option)
    return list(range(given, given + size))


async def _up_detached(args: argparse.Namespace, home: Path, cluster: LocalCluster) -> int:
    projections_cmd: list[str] | None = None
    answering = serving = False
    state: ServerState | None = None
    try:
        await cluster.start_nodes()
        state = cluster_state(cluster, tls_ca=args.tls_ca_file)
        write_state(home, state)  # before waiting, so `bus down` can clean up after an interruption
        meta_leader = await cluster.wait_for_meta_leader()
        await cluster.wait_for_stream_leaders()  # a restart: the log's own election comes first
        log = await prepare_replicated_log(cluster, args.namespace, args.start_timeout, home)
        projections_cmd = _projections_command(args, cluster.url, home)
        if projections_cmd is not None:
            state, answering = await start_projections_detached(
                projections_cmd, home, state, cluster.url, args.namespace, args.start_timeout
            )
        console = console_command(args, cluster.url, home)
        if console is not None:
            state, serving = await start_console_detached(console, home, state, args.start_timeout)
    except BaseException:
        if state is not None and state.console_pid is not None:
            await _terminate(state.console_pid, 5.0)
        await cluster.stop()
        clear_state(home)
        raise
    _print_summary(args, home, state, meta_leader, log, projections_cmd, answering, detached=True, console_ready=serving)
    return 0


async def _up_foreground(args: argparse.Namespace, home: Path, cluster: LocalCluster) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    projections: asyncio.subprocess.Process | None = None
    console: asyncio.subprocess.Process | None = None

    def children_up() -> list[tuple[str, bool]]:
        up = [(node.name, node.running) for node in cluster.nodes]
        if projections is not None:
            up.append(("projections", projections.returncode is None))
        if console is not None:
            up.append(("console", console.returncode is None))
        return up

    try:
        async with up_metrics_endpoint(up_metrics(children_up, None), args, home):
            try:
                await cluster.start_nodes()
                state = cluster_state(cluster, supervisor_pid=os.getpid(), tls_ca=args.tls_ca_file)
                write_state(home, state)
                meta_leader = await cluster.wait_for_meta_leader()
                await cluster.wait_for_stream_leaders()
                log = await prepare_replicated_log(cluster, args.namespace, args.start_timeout, home)
                projections_cmd = _projections_command(args, cluster.url, home)
                answering = False
                if projections_cmd is not None:
                    projections = await asyncio.create_subprocess_exec(
                        *projections_cmd, stdin=subprocess.DEVNULL, start_new_session=True
                    )
                    state = msgspec.structs.replace(state, projections_pid=projections.pid)
                    write_state(home, state)
                    running = projections
                    answering = await _wait_projections_ready(
                        cluster.url, args.namespace, lambda: running.returncode, None, args.start_timeout, home
                    )
                serving = False
                console_cmd = console_command(args, cluster.url, home)
                if console_cmd is not None:
                    console, state, serving = await start_console_child(console_cmd, home, state, args.start_timeout)
                _print_summary(
                    args, home, state, meta_leader, log, projections_cmd, answering, detached=False, console_ready=serving
                )
                code = await _supervise(cluster, projections, stop)
            finally:
                await _stop_child(console, 10.0)
                await _stop_child(projections, 10.0)
                await cluster.stop(grace_s=10.0)
                current = read_state(home)
                if current is not None and current.supervisor_pid == os.getpid():
                    clear_state(home)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    out("stopped: console, projection service and cluster are down")
    return code


async def _supervise(
    cluster: LocalCluster, projections: asyncio.subprocess.Process | None, stop: asyncio.Event
) -> int:
    """Run until `stop` is set (a signal) or every node has exited; a node that exits alone is
    reported and the rest keep running (that is what a cluster is for). Returns the exit code."""
    exited: dict[str, int] = {}
    majority = cluster.size // 2 + 1

    async def watch_node(node: ClusterNode) -> None:
        code = await node.wait()
        name = node.name
        exited[name] = code if code is not None else 0
        left = cluster.size - len(exited)
        if left == 0:
            stop.set()
            return
        quorum = "it still has a majority" if left >= majority else f"it needs {majority} for writes until one comes back"
        out(f"warning: node {name} exited ({describe_exit(exited[name])}); {left} of {cluster.size} nodes "
            f"keep running ({quorum}); restart them all with Ctrl-C and `bus up --cluster {cluster.size}`")

    async def watch_projections(proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        out(f"warning: the projection service stopped for good ({describe_exit(code)}); the cluster keeps "
            "running (fix what it printed, then restart both with Ctrl-C and `bus up`)")

    async with asyncio.TaskGroup() as tg:
        watchers = [tg.create_task(watch_node(node)) for node in cluster.nodes]
        if projections is not None:
            watchers.append(tg.create_task(watch_projections(projections)))
        await stop.wait()
        for task in watchers:
            task.cancel()
    if len(exited) == cluster.size:
        logs = ", ".join(str(node.log_file) for node in cluster.nodes)
        out(f"error: every node of the cluster exited; their logs: {logs}")
        return 1
    out("stopping: the console and the projection service first, then the cluster ...")
    return 0


async def prepare_replicated_log(cluster: LocalCluster, namespace: str, timeout_s: float, home: Path) -> LogReady:
    """Create the namespace's log with one replica per node (a Bus declares it on connect) and
    report it. Raises CliError when it is not ready within `timeout_s`."""
    from bus.client import Bus

    config = BusConfig(
        url=cluster.url, monitor_url=cluster.monitor_url, namespace=namespace, name="bus-up",
        stream=StreamSettings(replicas=cluster.size), **local_access(home),
    )
    try:
        async with asyncio.timeout(timeout_s):
            async with Bus(config) as bus:
                info = await bus.js.stream_info(bus.subjects.stream)
    except TimeoutError:
        raise CliError(
            f"the cluster did not set up the log within {timeout_s}s (raise --start-timeout); the nodes' "
            f"logs are {cluster.store_root}/<node>/nats-server.log"
        ) from None
    return LogReady(
        stream=info.config.name,
        replicas=info.config.num_replicas or 1,
        leader=info.cluster.leader if info.cluster is not None else None,
        fsync=await _every_node_fsyncs(cluster),
    )


async def _every_node_fsyncs(cluster: LocalCluster) -> bool | None:
    """True when every node says it fsyncs each write, False when one does not, None when one
    could not be asked."""

    async def sync_always(url: str) -> bool | None:
        try:
            varz = await asyncio.to_thread(read_varz, url)
        except (OSError, ValueError):
            return None
        return bool(varz.get("jetstream", {}).get("config", {}).get("sync_always"))

    answers = await asyncio.gather(*(sync_always(url) for url in cluster.monitor_urls))
    if False in answers:
        return False
    return None if None in answers else True


def cluster_state(cluster: LocalCluster, *, supervisor_pid: int | None = None, tls_ca: str | None = None) -> ServerState:
    """The state file's record of a started cluster: every node, and the comma-joined URLs."""
    nodes = []
    for node in cluster.nodes:
        if node.pid is None:
            raise BusUnavailable(f"cluster node {node.name} is not running")
        nodes.append(NodeState(name=node.name, pid=node.pid, url=node.url, monitor_url=node.monitor_url,
                               store_dir=str(node.store_dir)))
    return ServerState(
        pid=nodes[0].pid, url=cluster.url, monitor_url=cluster.monitor_url, store_dir=str(cluster.store_root),
        supervisor_pid=supervisor_pid, nodes=tuple(nodes), tls_ca=tls_ca,
    )


def _print_summary(
    args: argparse.Namespace,
    home: Path,
    state: ServerState,
    meta_leader: str,
    log: LogReady,
    projections_cmd: list[str] | None,
    answering: bool,
    *,
    detached: bool,
    console_ready: bool = False,
) -> None:
    out(f"bus is up at {state.url} (namespace {args.namespace})")
    out(f"  cluster      {len(state.nodes)} nodes, JetStream meta leader {meta_leader}; log {log.stream}: "
        f"{log.replicas} replicas, leader {log.leader or '(electing)'} ({FSYNC_TEXT[log.fsync]})")
    width = max(len(node.name) for node in state.nodes)
    for node in state.nodes:
        out(f"  {node.name:<{max(width, 11)}}  pid {node.pid}, {node.url}, monitoring {node.monitor_url}, "
            f"store {node.store_dir}")
    out(f"  projections  {projections_summary(args, home, state, projections_cmd, answering, detached=detached)}")
    out(f"  console      {console_summary(args, home, state.console_url, state.console_pid, console_ready, detached=detached)}")
    out(f"  access       {access_summary(args, home, state)}")
    out(f"  state        {state_path(home)}")
    exports = f"BUS_URL={state.url} BUS_MONITOR_URL={state.monitor_url} BUS_NAMESPACE={args.namespace} BUS_HOME={home}"
    print_next_steps(args, exports, detached=detached)
