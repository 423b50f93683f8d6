"""`bus status` (the log, its consumers, the advisories) and `bus schema export` (JSON Schema)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import msgspec
from nats.js.errors import NotFoundError

from bus.cli.common import CliError, add_connection_options, open_bus, out
from bus.cli.message_commands import add_types_option, payload_registry
from bus.errors import BusUnavailable, QueryError
from bus.fsync import node_fsync
from schemas.export import export_json_schemas


def register(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser(
        "status", help="the log stream, its durable consumers and the advisories",
        description="Show the log stream (messages, bytes, first/last sequence, fsync; on a cluster its "
        "leader and each replica's state and lag), each durable consumer's pending, ack-pending and "
        "redelivered counts, and the advisory stream.",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    add_connection_options(status)
    status.set_defaults(func=run_status)

    schema = sub.add_parser("schema", help="wire schemas for other languages")
    schema_sub = schema.add_subparsers(dest="schema_command", metavar="ACTION")
    schema_sub.required = True
    export = schema_sub.add_parser(
        "export", help="write the JSON Schema of the envelope and of every payload kind",
        description="Write envelope.json, payload.<kind>.json for every kind and the query types into DIR.",
    )
    export.add_argument("dir", type=Path, help="directory to write into (created if missing)")
    add_types_option(export)
    export.set_defaults(func=run_schema_export)


# -- status ------------------------------------------------------------------------------------


class ConsumerStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    filters: list[str]
    pending: int
    ack_pending: int
    redelivered: int
    waiting: int
    delivered_seq: int
    ack_floor_seq: int


class StreamStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    subjects: int | None = None


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One server holding the log, as the log's leader sees it."""

    name: str
    role: str  # "leader" or "replica"
    # Caught up with the leader (the leader itself always is).
    current: bool
    # The leader has lost contact with it.
    offline: bool
    # Seconds since the leader last heard from it (None for the leader, or when not reported).
    active_s: float | None
    # Log operations it is behind the leader.
    lag: int


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where the log lives in a cluster: its leader and replicas."""

    name: str
    # The log's leader; None while the replicas elect one.
    leader: str | None
    # How many copies the log keeps (its configured replica count).
    replicas: int
    nodes: list[NodeStatus]  # the leader first


# omit_defaults: on a single server there is no "cluster" key, as before clusters.
class Status(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    url: str
    namespace: str
    server_version: str
    # True/False when read from the server's monitoring endpoint; None when it is not known.
    fsync_every_write: bool | None
    log: StreamStatus
    consumers: list[ConsumerStatus]
    advisories: StreamStatus | None
    query_service: bool
    cluster: ClusterStatus | None = None


async def run_status(args: argparse.Namespace) -> int:
    """Print the status of the log; exit 2 with a hint when no server runs."""
    async with open_bus(args, name="cli-status") as bus:
        status = await collect_status(bus)
    if args.json:
        out(msgspec.json.encode(status).decode())
    else:
        _print_status(status, bus.config.monitor_url)
    return 0


async def collect_status(bus: Any) -> Status:
    """Read stream, consumer and advisory state from the server."""
    subjects = bus.subjects
    info = await bus.js.stream_info(subjects.stream)
    consumers: list[ConsumerStatus] = []
    offset = 0
    while True:
        page = await bus.js.consumers_info(subjects.stream, offset=offset)
        consumers.extend(_consumer_status(c) for c in page if c.config.durable_name)
        offset += len(page)
        if len(page) < 256:
            break
    try:
        advisories = _stream_status(await bus.js.stream_info(subjects.advisory_stream))
    except NotFoundError:
        advisories = None
    return Status(
        url=bus.config.shown_url,
        namespace=subjects.ns,
        server_version=bus.transport.server_facts().get("version", "unknown"),
        fsync_every_write=await _fsync(bus.config),
        log=_stream_status(info),
        consumers=sorted(consumers, key=lambda c: c.name),
        advisories=advisories,
        query_service=await _query_service_answers(bus),
        cluster=_cluster_status(info),
    )


def _stream_status(info: Any) -> StreamStatus:
    state = info.state
    return StreamStatus(
        name=info.config.name, messages=state.messages, bytes=state.bytes,
        first_seq=state.first_seq, last_seq=state.last_seq,
        subjects=getattr(state, "num_subjects", None),
    )


def _cluster_status(info: Any) -> ClusterStatus | None:
    """The log's leader and replicas from its stream info; None on a single server (whose
    stream info names only itself as leader, with no cluster name)."""
    cluster = info.cluster
    if cluster is None or not cluster.name:
        return None
    nodes = []
    if cluster.leader:
        nodes.append(NodeStatus(name=cluster.leader, role="leader", current=True, offline=False, active_s=None, lag=0))
    for peer in sorted(cluster.replicas or [], key=lambda p: p.name or ""):
        nodes.append(NodeStatus(
            name=peer.name or "?", role="replica", current=bool(peer.current), offline=bool(peer.offline),
            active_s=peer.active / 1e9 if peer.active else None, lag=peer.lag or 0,
        ))
    return ClusterStatus(
        name=cluster.name, leader=cluster.leader or None, replicas=info.config.num_replicas or 1, nodes=nodes
    )


def _consumer_status(info: Any) -> ConsumerStatus:
    config = info.config
    filters = list(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))
    return ConsumerStatus(
        name=config.durable_name or info.name,
        filters=filters,
        pending=info.num_pending or 0,
        ack_pending=info.num_ack_pending or 0,
        redelivered=info.num_redelivered or 0,
        waiting=info.num_waiting or 0,
        delivered_seq=info.delivered.stream_seq if info.delivered else 0,
        ack_floor_seq=info.ack_floor.stream_seq if info.ack_floor else 0,
    )


async def _fsync(config: Any) -> bool | None:
    """Whether every server with a monitoring URL in the config (one per cluster node) fsyncs each
    write: False when one does not, None when one cannot be asked (or none is given)."""
    if not config.monitor_urls:
        return None
    verdicts, unread = await node_fsync(config.monitor_urls)
    if False in verdicts.values():
        return False
    return None if unread or not verdicts else True


async def _query_service_answers(bus: Any) -> bool:
    try:
        await bus.query("SELECT 1", timeout_s=1.0)
    except BusUnavailable:
        return False  # no responder
    except QueryError as exc:
        return exc.kind != "timeout"
    return True


def _print_status(status: Status, monitor_url: str | None) -> None:
    fsync = {
        True: "yes (sync_interval: always)",
        False: "NO: acked writes can be lost on power failure (set jetstream { sync_interval: always })",
        None: "unknown (no monitoring URL: start the server with `bus up`, or set BUS_MONITOR_URL)",
    }[status.fsync_every_write]
    log = status.log
    out(f"server       {status.url} (nats-server {status.server_version}), namespace {status.namespace}")
    out(f"fsync        {fsync}")
    out(f"log          {log.name}: {log.messages} messages, {_size(log.bytes)}, "
        f"seq {log.first_seq}..{log.last_seq}")
    if status.cluster is not None:
        _print_cluster(status.cluster)
    out(f"queries      {'answered by the projection service' if status.query_service else 'no projection service answering'}")
    if status.advisories is not None:
        adv = status.advisories
        out(f"advisories   {adv.name}: {adv.messages} max-deliveries advisories (last seq {adv.last_seq})")
    else:
        out("advisories   (no advisory stream)")
    if not status.consumers:
        out("consumers    none yet (an agent creates its durable consumers when it starts)")
        return
    out("consumers    pending: stored, not yet delivered; ack-pending: delivered, not yet settled; "
        "redelivered: delivered more than once; at seq: the log sequence delivered last")
    width = max(len(c.name) for c in status.consumers)
    out(f"  {'name':<{width}}  {'pending':>8}  {'ack-pending':>11}  {'redelivered':>11}  {'at seq':>9}  filters")
    for c in status.consumers:
        out(f"  {c.name:<{width}}  {c.pending:>8}  {c.ack_pending:>11}  {c.redelivered:>11}  "
            f"{c.delivered_seq:>9}  {', '.join(c.filters)}")


def _print_cluster(cluster: ClusterStatus) -> None:
    leader = cluster.leader or "none (the replicas are electing one: writes wait until they have)"
    out(f"cluster      {cluster.name}: the log keeps {cluster.replicas} replicas, leader {leader}")
    width = max([len("node")] + [len(n.name) for n in cluster.nodes])
    out(f"  {'node':<{width}}  {'role':<7}  {'current':<7}  {'offline':<7}  {'active':>8}  {'lag':>6}")
    for n in cluster.nodes:
        active = "-" if n.active_s is None else f"{n.active_s:.2f}s"
        out(f"  {n.name:<{width}}  {n.role:<7}  {'yes' if n.current else 'no':<7}  "
            f"{'yes' if n.offline else 'no':<7}  {active:>8}  {n.lag:>6}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# -- schema export -----------------------------------------------------------------------------


async def run_schema_export(args: argparse.Namespace) -> int:
    """Write JSON Schemas into args.dir. Raises CliError if it cannot be written."""
    registry = payload_registry(args.types)
    try:
        written = await asyncio.to_thread(export_json_schemas, registry, args.dir)
    except OSError as exc:
        raise CliError(f"cannot write schemas to {args.dir}: {exc.strerror or exc}; pick a writable directory") from exc
    out(f"wrote {len(written)} JSON Schemas ({len(registry.kinds())} payload kinds, the envelope, "
        f"the query types) to {args.dir}")
    return 0
