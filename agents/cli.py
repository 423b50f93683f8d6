"""`bus agent start|ps|stop|logs`: agents as supervised OS processes.

    bus agent start myagents.greeter:Greeter --replicas 2 --tags team
    bus agent ps
    bus agent logs greeter -n 50 --follow
    bus agent stop greeter

`start` launches one detached supervisor process per agent name (in its own session), which
launches each replica as its own process and restarts crashed ones. Its state file and logs live
under `<home>/agents/<namespace>/<name>/`; `ps`, `stop` and `logs` read them (see
agents/supervisor/control.py). `--foreground` runs the supervisor in this process instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec

from bus.agent_control import request_stop
from bus.cli.common import CliError, add_connection_options, bus_config, open_bus, out, user_sender_name
from bus.errors import BusError, ConfigurationError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    agent = subparsers.add_parser("agent", help="run agents as supervised processes (start, ps, stop, logs)")
    actions = agent.add_subparsers(dest="agent_command", metavar="ACTION", parser_class=type(agent))
    actions.required = True

    start = actions.add_parser("start", help="launch an agent's replicas under a supervisor")
    start.add_argument("target", metavar="module:Class", help="the Agent subclass, e.g. myagents.greeter:Greeter")
    start.add_argument("--name", help="agent name (default: the class's `name`, else its class name)")
    start.add_argument("--tags", help="comma-separated broadcast tags (default: the class's `tags`)")
    start.add_argument("--replicas", type=int, default=1, help="processes sharing the work (default %(default)s)")
    start.add_argument("--foreground", action="store_true", help="supervise from this process until Ctrl-C")
    start.add_argument("--max-crashes", type=int, default=10,
                       help="crashes within --crash-window that stop the restarts (default %(default)s)")
    start.add_argument("--crash-window", type=float, default=60.0, help="seconds (default %(default)s)")
    start.add_argument("--stop-grace", type=float, default=10.0,
                       help="seconds a stopping replica may take to finish in-flight work (default %(default)s)")
    start.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeat events (default %(default)s)")
    start.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the replicas to be ready")
    add_connection_options(start)
    start.set_defaults(func=run_start)

    ps = actions.add_parser("ps", help="list agents and their replicas")
    ps.add_argument("--json", action="store_true", help="print the supervisors' state as JSON lines")
    add_connection_options(ps)
    ps.set_defaults(func=run_ps)

    stop = actions.add_parser("stop", help="stop an agent gracefully (finish in-flight work, then exit)")
    stop.add_argument("name", nargs="?", help="agent name")
    stop.add_argument("--all", action="store_true", help="stop every agent of the namespace")
    stop.add_argument("--wait", type=float, default=60.0,
                      help="seconds to wait before killing the supervisor's process group (default %(default)s)")
    add_connection_options(stop)
    stop.set_defaults(func=run_stop)

    logs = actions.add_parser("logs", help="show an agent's replica logs")
    logs.add_argument("name", help="agent name")
    logs.add_argument("--replica", type=int, help="only this replica")
    logs.add_argument("--supervisor", action="store_true", help="the supervisor's own log")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines from the end (default %(default)s)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    add_connection_options(logs)
    logs.set_defaults(func=run_logs)

    from agents.trace import register as register_trace

    register_trace(subparsers)  # `bus trace <correlation-id>`


async def run_start(args: argparse.Namespace) -> int:
    from agents.errors import AgentDefinitionError, AgentLoadError, SupervisorError
    from agents.runtime.agent import HandlerTable
    from agents.runtime.loader import load_agent_class
    from agents.supervisor.control import SupervisorLaunch, start_detached
    from agents.supervisor.main import serve
    from agents.supervisor.policy import RestartPolicy
    from agents.supervisor.supervisor import AgentSpec, SupervisorSettings
    from bus.cli.creds_commands import provision_agent

    workdir = Path.cwd()
    try:
        agent_cls = load_agent_class(args.target, workdir)
        HandlerTable.scan(agent_cls)
    except (AgentLoadError, AgentDefinitionError) as exc:
        raise CliError(str(exc)) from exc
    if args.replicas < 1:
        raise CliError("--replicas must be at least 1")
    name = args.name or agent_cls.default_name()
    tags = [t.strip() for t in args.tags.split(",") if t.strip()] if args.tags is not None else list(agent_cls.tags)
    # Its own credential (authorization on): it may then act only as itself. This fails,
    # saying how to start a server, when none is reachable.
    provisioned = await provision_agent(args, name, tags)
    if provisioned is None:
        config = bus_config(args, name=name)
        async with open_bus(args, name=name):
            pass  # fail here, saying how to start a server, when none is reachable
    else:
        config = bus_config(args, name=name, credentials=str(provisioned[0]))
    launch = SupervisorLaunch(
        spec=AgentSpec(
            target=args.target, name=name, bus=config, tags=tags, replicas=args.replicas,
            heartbeat_s=args.heartbeat, workdir=str(workdir),
        ),
        settings=SupervisorSettings(
            restart=RestartPolicy(max_crashes=args.max_crashes, window_s=args.crash_window),
            stop_grace_s=args.stop_grace, home=str(args.home.resolve()),
        ),
    )
    if args.foreground:
        out(f"supervising {name} ({args.replicas} replica(s)); Ctrl-C stops it gracefully")
        await serve(launch)
        return 0
    try:
        status = await start_detached(launch, wait_s=args.wait)
    except SupervisorError as exc:
        raise CliError(str(exc)) from exc
    pids = ", ".join(str(r.pid) for r in status.replicas)
    slowest = max(r.start_ms for r in status.replicas)
    out(f"started {name}: {len(status.replicas)} replica(s), pid {pids}, ready in {slowest:.0f} ms "
        f"(supervisor pid {status.supervisor_pid})")
    out(f"  bus agent ps | bus agent logs {name} | bus agent stop {name}")
    return 0


async def run_ps(args: argparse.Namespace) -> int:
    from agents.supervisor.control import list_statuses

    statuses = list_statuses(args.home, args.namespace)
    supervised = {status.agent for status, _ in statuses}
    elsewhere = [r for r in await _seen_elsewhere(args) if r["name"] not in supervised]
    if args.json:
        for status, alive in statuses:
            out(msgspec.json.encode({"alive": alive, **msgspec.structs.asdict(status)}).decode())
        for replica in elsewhere:
            out(json.dumps({"agent": replica["name"], "elsewhere": True, **replica}, default=str))
        return 0
    if not statuses and not elsewhere:
        out(f"no agents under {args.home.resolve() / 'agents' / args.namespace}, and none alive on the bus")
        return 0
    now = time.time()
    rows = [["AGENT", "REPLICA", "PID", "STATE", "RESTARTS", "HEARTBEAT", "IN-FLIGHT", "HANDLED", "UP"]]
    for replica in elsewhere:  # run by no supervisor here: another machine, another language
        beat = replica["last_heartbeat"].timestamp() if replica["last_heartbeat"] else 0.0
        started = replica["started_at"].timestamp() if replica["started_at"] else 0.0
        rows.append([
            replica["name"], str(replica["replica"]), str(replica["pid"] or "-"), f"{replica['state']} (elsewhere)",
            str(replica["restarts"]), _ago(now, beat), str(replica["in_flight"] if replica["in_flight"] is not None else "-"),
            str(replica["handled"] if replica["handled"] is not None else "-"),
            _duration(now - started) if started else "-",
        ])
    for status, alive in statuses:
        for r in status.replicas:
            state = r.state if alive else ("stopped" if status.state == "stopped" else "no supervisor")
            live = alive and r.state not in ("stopped", "circuit_open")
            rows.append([
                status.agent, str(r.replica), str(r.pid or "-") if live else "-", state, str(r.restarts),
                _ago(now, r.last_heartbeat) if live else "-", str(r.in_flight) if live else "-",
                str(r.handled), _duration(now - r.ready_at) if live and r.ready_at else "-",
            ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


_ALIVE_REPLICAS_SQL = """
SELECT name, replica, pid, state, last_heartbeat, in_flight, handled, started_at, restarts
FROM agent_replicas WHERE alive ORDER BY name, replica
"""


async def _seen_elsewhere(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Replicas alive on the bus by their heartbeats (the `agent_replicas` view), whoever runs
    them; [] when no server or projection service answers (ps then shows the supervisors alone)."""
    try:
        async with open_bus(args, name="cli-ps") as bus:
            return (await bus.query(_ALIVE_REPLICAS_SQL, min_seq=0, timeout_s=3.0)).records()
    except (BusError, CliError):
        return []


async def run_stop(args: argparse.Namespace) -> int:
    from agents.errors import NotRunning
    from agents.supervisor.control import list_statuses, paths_for, stop_supervisor

    if args.all:
        names = [status.agent for status, alive in list_statuses(args.home, args.namespace) if alive]
        if not names:
            out("no running agents")
            return 0
    elif args.name:
        names = [args.name]
    else:
        raise CliError("name the agent to stop (or pass --all)")
    for name in names:
        try:
            status = await stop_supervisor(paths_for(args.home, args.namespace, name), wait_s=args.wait)
        except NotRunning as exc:
            if args.all:
                raise CliError(f"{exc}; `bus agent ps` lists the agents") from exc
            await _stop_through_the_bus(args, name, exc)
            continue
        forced = [r.replica for r in status.replicas if r.state not in ("stopped", "circuit_open")]
        note = f" (replicas {forced} did not report a clean stop)" if forced else ""
        out(f"stopped {name}{note}")
    return 0


async def _stop_through_the_bus(args: argparse.Namespace, name: str, not_here: Exception) -> None:
    """No supervisor of `name` under this --home: ask whichever supervises it, wherever it runs
    (bus.agent_control; recorded). Raises CliError when none listens."""
    by = user_sender_name()
    async with open_bus(args, name=by) as bus:
        try:
            answer = await request_stop(bus, name, by=by, reason="bus agent stop")
        except ConfigurationError as exc:
            raise CliError(f"{not_here}, and {exc}; `bus agent ps` lists the agents") from exc
    out(f"stopping {name}: its supervisor (pid {answer.pid}, elsewhere) stops {answer.replicas} replica(s), "
        "asked through the bus")


async def run_logs(args: argparse.Namespace) -> int:
    from agents.supervisor.control import paths_for, tail

    paths = paths_for(args.home, args.namespace, args.name)
    if args.supervisor:
        files = [paths.supervisor_log]
    elif args.replica is not None:
        files = [paths.replica_log(args.replica)]
    else:
        files = paths.replica_logs()
    files = [f for f in files if f.exists()]
    if not files:
        raise CliError(f"no logs for agent {args.name!r} in {paths.dir}; `bus agent ps` lists the agents")
    for path in files:
        if len(files) > 1:
            out(f"==> {path.name} <==")
        text = tail(path, args.lines)
        if text:
            out(text)
    if not args.follow:
        return 0
    offsets = {path: path.stat().st_size for path in files}
    while True:  # until Ctrl-C
        for path in files:
            size = path.stat().st_size
            if size > offsets[path]:
                with open(path, "rb") as f:
                    f.seek(offsets[path])
                    chunk = f.read(size - offsets[path])
                offsets[path] = size
                prefix = f"[{path.stem}] " if len(files) > 1 else ""
                for line in chunk.decode(errors="replace").splitlines():
                    out(prefix + line)
        await asyncio.sleep(0.25)


def _ago(now: float, then: float) -> str:
    return "-" if not then else f"{_duration(now - then)} ago"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
