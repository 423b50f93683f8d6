"""`bus up` and `bus down`: the embedded NATS server (and the projection service) on this machine.

`bus up` runs both in the foreground until Ctrl-C or SIGTERM, or with `--detach` starts them in
sessions of their own and returns once the server accepts clients and the log stream exists.
Either way it records pids and URLs in `<home>/server.json`: `bus down` and every other command
read it. Children get sessions of their own so that a Ctrl-C in the terminal reaches only
`bus up`, which then stops them in order: the projection service first, then the server.

`bus up --cluster N` starts a local JetStream cluster of N nodes instead of one server
(bus.cli.cluster_up); `bus down` stops whatever the state file records, node by node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry

from bus.cli.common import (
    DEFAULT_HOME,
    CliError,
    add_metrics_option,
    admin_credentials,
    metrics_endpoint,
    out,
    port_number,
)
from bus.cli.console_up import add_console_options, console_command, console_summary, wait_console_ready
from bus.cli.keeper import describe_exit
from bus.cli.state import ServerState, clear_state, read_state, state_path, write_state
from bus.cli.up_metrics import up_metrics
from bus.config import BusConfig, check_name
from bus.identity import CredentialRegistry, Role
from bus.identity.certificates import ensure_server_tls, given_server_tls
from bus.scrape import MetricsEndpoint, ScrapeTarget
from bus.errors import BusUnavailable, QueryError
from bus.server import (
    ServerSettings,
    find_config,
    free_port_outside_ephemeral_range,
    port_bindable,
    read_varz,
    wait_until_listening,
)

DEFAULT_PORT = 4222
DEFAULT_MONITOR_PORT = 8222
PROJECTIONS_MODULE = "projections.cli"
FSYNC_TEXT = {True: "fsync on every write", False: "NOT fsyncing every write", None: "fsync unknown"}


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def local_port_of(url: str) -> int | None:
    """The port of `url` when it is one URL naming this machine with a port, else None: `bus up`
    starts its server where `BUS_URL` says every other command will look for it."""
    url = url.strip()
    if not url or "," in url:
        return None
    try:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
        port = parsed.port
    except ValueError:
        return None
    return port if parsed.hostname in LOCAL_HOSTS else None


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser(
        "up",
        help="start the embedded NATS server and the projection service",
        description="Start nats-server from the repo's nats.conf (127.0.0.1 only, JetStream, fsync on "
        "every write) and, unless --no-projections, the projection service. Runs until Ctrl-C, or "
        "with --detach returns once the server is ready (stop it with `bus down`).",
    )
    up.add_argument(
        "--port", type=port_number, default=None,
        help=f"client port (default: BUS_URL's port when it names this machine, else {DEFAULT_PORT}); with "
        f"--cluster, the first node's, the others' following it (default: from {DEFAULT_PORT}, or free ones "
        "when those are taken)",
    )
    up.add_argument(
        "--monitor-port", type=port_number, default=None,
        help=f"HTTP monitoring port (default {DEFAULT_MONITOR_PORT}, or a free one when that is taken); with "
        "--cluster, the first node's, as for --port",
    )
    up.add_argument(
        "--cluster", type=cluster_size, default=1, metavar="N",
        help="start a local JetStream cluster of N nodes (3 or 5) on this machine instead of one server; "
        "the log keeps N replicas (default 1: one server)",
    )
    up.add_argument(
        "--store", type=Path, default=None,
        help="JetStream store directory (default <home>/nats; with --cluster, <home>/cluster/<node>)",
    )
    up.add_argument("--config", type=Path, default=None, help="nats-server config (default ./nats.conf, else the repo's)")
    up.add_argument(
        "--no-auth", action="store_true",
        help="start without authorization (any local client may act as anyone); by default every "
        "connection needs a credential: the admin one (<home>/auth/creds/admin.nk, used by the CLI), "
        "the projection service's, the console's (read-only), and one per agent (`bus agent start`, `bus creds issue`)",
    )
    up.add_argument(
        "--tls", action="store_true",
        help="serve TLS to every client: a local CA and server certificate are made under <home>/auth/tls "
        "(kept across restarts), and every `bus` command in this home verifies the server with that CA",
    )
    up.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="with --tls: serve this certificate")
    up.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="with --tls: its private key")
    up.add_argument("--tls-ca", type=Path, default=None, metavar="FILE", help="with --tls: the CA clients verify it with")
    up.add_argument(
        "--listen", default="127.0.0.1", metavar="HOST",
        help="address to accept clients on (default %(default)s); any other needs authorization and --tls",
    )
    up.add_argument("--detach", action="store_true", help="start in the background and return when ready")
    up.add_argument("--no-projections", action="store_true", help="do not start the projection service")
    add_console_options(up, port_number)
    up.add_argument(
        "--start-timeout", type=float, default=20.0,
        help="seconds to wait for the server (and the projection service) to be ready (default %(default)s)",
    )
    _add_home_option(up)
    up.add_argument(
        "--namespace", default=os.environ.get("BUS_NAMESPACE", "default"),
        help="namespace the projection service folds (env BUS_NAMESPACE; default %(default)s)",
    )
    add_metrics_option(up, always=True)
    up.set_defaults(func=run_up)

    down = sub.add_parser(
        "down", help="stop what `bus up` started",
        description="Stop the projection service and the server recorded in <home>/server.json "
        "(SIGTERM, then SIGKILL after --grace seconds) and clear that state.",
    )
    _add_home_option(down)
    down.add_argument(
        "--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default %(default)s)"
    )
    down.set_defaults(func=run_down)


def _add_home_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home", type=Path, default=Path(os.environ.get("BUS_HOME", DEFAULT_HOME)),
        help="directory for the server's store, state file and views (env BUS_HOME; default %(default)s)",
    )


def cluster_size(text: str) -> int:
    """An argparse type: 1 (one server), 3 or 5 nodes (else a message saying why)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of nodes: use 3 or 5 (or 1 for one server)") from None
    if value not in (1, 3, 5):
        raise argparse.ArgumentTypeError(
            f"{value} nodes: use 3 or 5 (an odd number, so a majority survives losing one node or two; "
            "JetStream keeps at most 5 replicas), or 1 for one server"
        )
    return value


# -- bus up ------------------------------------------------------------------------------------


async def run_up(args: argparse.Namespace) -> int:
    """Start the server (and projections); foreground or detached. Raises CliError on failure."""
    check_name(args.namespace, "namespace")
    home: Path = args.home.resolve()
    existing = read_state(home)
    if existing is not None:
        running = [node for node in existing.servers if _is_running(node.pid, _is_nats_server)]
        if running and not existing.nodes:
            out(f"already running: {existing.url} (nats-server pid {existing.pid}, store {existing.store_dir})")
        elif running:
            pids = ", ".join(f"{node.name} pid {node.pid}" for node in running)
            out(f"already running: {existing.url} (local cluster: {pids}; stores in {existing.store_dir})")
        if running:
            out(f"  recorded in {state_path(home)}; stop it with `bus down{_home_flag(args.home)}`, "
                "or use another --home to run a second server")
            return 0
        await _clear_stale(home, existing)
    if args.detach and args.metrics_port is not None:
        raise CliError(
            "--metrics-port needs a foreground `bus up` (a detached one exits at once); the server's "
            "own metrics are at its monitoring URL (/varz, /jsz)"
        )
    if args.cluster > 1:
        from bus.cli.cluster_up import run_up_cluster  # local: it builds on this module

        return await run_up_cluster(args, home)
    if args.port is None:
        args.port = local_port_of(os.environ.get("BUS_URL", "")) or DEFAULT_PORT
    await _check_port_free(args.port, "--port")
    if args.monitor_port is not None:
        await _check_port_free(args.monitor_port, "--monitor-port")
        monitor_port = args.monitor_port
    else:
        # Named on the server's command line before it binds: outside the ephemeral range.
        monitor_port = (
            DEFAULT_MONITOR_PORT if port_bindable(DEFAULT_MONITOR_PORT) else free_port_outside_ephemeral_range()
        )
    auth = await setup_auth(args, home)
    settings = ServerSettings(
        store_dir=(args.store or home / "nats").resolve(),
        port=args.port,
        monitor_port=monitor_port,
        config_file=auth.server_config if auth is not None else args.config,
        start_timeout_s=args.start_timeout,
        host=args.listen,
    )
    settings.command()  # fail early (exit 2) if the binary or the config is missing
    projections = _projections_command(args, settings.url, home,
                                       monitor_url=settings.monitor_url if args.detach else None)
    console = console_command(args, settings.url, home)
    if args.detach:
        return await _up_detached(args, home, settings, projections, console)
    return await _up_foreground(args, home, settings, projections, console)


async def setup_auth(args: argparse.Namespace, home: Path) -> CredentialRegistry | None:
    """Authorization for the server(s) `bus up` starts: the admin, projection-service and console
    credentials exist, and the server config that includes auth.conf is written. None with
    --no-auth. Raises CliError when the base config cannot be read."""
    loopback = args.listen in ("127.0.0.1", "::1", "localhost")
    if not loopback and (args.no_auth or not args.tls):
        raise CliError(
            f"--listen {args.listen} would let other machines connect: that needs authorization (drop --no-auth) "
            "and TLS (--tls), so no one can act as anyone and nothing crosses the network in clear"
        )
    given = [f for f in (args.tls_cert, args.tls_key, args.tls_ca) if f is not None]
    if given and (len(given) != 3 or not args.tls):
        raise CliError("--tls-cert, --tls-key and --tls-ca go together, with --tls")
    if args.tls and args.no_auth:
        raise CliError("--tls needs authorization: drop --no-auth (TLS without credentials protects nothing worth having)")
    args.tls_ca_file = None
    args.server_tls = None
    if args.no_auth:
        return None
    registry = CredentialRegistry(home)
    try:
        tls = None
        if args.tls:
            tls = (given_server_tls(args.tls_cert, args.tls_key, args.tls_ca) if given
                   else await asyncio.to_thread(ensure_server_tls, registry.tls_dir))
            args.tls_ca_file = tls.ca_file
            args.server_tls = tls
        await asyncio.to_thread(registry.initialize, find_config(args.config), (args.namespace,), tls=tls)
    except OSError as exc:
        raise CliError(f"cannot write the authorization files under {registry.dir}: {exc}") from exc
    return registry


def local_access(home: Path) -> dict[str, object]:
    """The BusConfig fields `bus up` itself connects with: the home's admin credential, and the
    CA its servers' TLS is verified with (both recorded before any server is waited for)."""
    admin = admin_credentials(home)
    state = read_state(home)
    return {"credentials": None if admin is None else str(admin), "tls": None if state is None else state.tls}


def _projections_command(
    args: argparse.Namespace, url: str, home: Path, *, monitor_url: str | None = None
) -> list[str] | None:
    """The projection service's command line, or None when it is off or not installed. Its keeper
    is a scrape target of `home`, serving the server's figures from `monitor_url` when given (a
    detached `bus up`, which is not there to serve them)."""
    if args.no_projections or not _projections_installed():
        return None
    # Under the keeper: a service that dies (a record that crashes it, the OOM killer) is started
    # again with backoff, foreground or detached; stopping the keeper stops the service.
    command = [
        sys.executable, "-m", "bus.cli.keeper",
        "--metrics-home", str(home), "--child", "projections", "--namespace", args.namespace,
        *(("--monitor-url", monitor_url) if monitor_url else ()),
        "--",
        sys.executable, "-m", "bus.cli.main", "projections", "run",
        "--url", url, "--namespace", args.namespace, "--home", str(home),
    ]
    service = CredentialRegistry(home).credential_path(Role.SERVICE, "projections")
    if not args.no_auth and service.is_file():
        command += ["--creds", str(service)]
    return command


def _projections_installed() -> bool:
    try:
        return importlib.util.find_spec(PROJECTIONS_MODULE) is not None
    except ModuleNotFoundError:
        return False


async def start_projections_detached(
    command: list[str], home: Path, state: ServerState, url: str, namespace: str, timeout_s: float
) -> tuple[ServerState, bool]:
    """Start the projection service in a session of its own, record its pid in the state file,
    and wait until it answers queries: (the state recorded, whether it answers). A failure
    while waiting stops it again before it is raised."""
    log_file = home / "projections.log"
    projections = _spawn_detached(command, log_file)
    state = msgspec.structs.replace(state, projections_pid=projections.pid)
    write_state(home, state)
    try:
        answering = await _wait_projections_ready(url, namespace, projections.poll, log_file, timeout_s, home)
    except BaseException:
        await _terminate(projections.pid, 5.0)
        raise
    return state, answering


async def _up_detached(
    args: argparse.Namespace, home: Path, settings: ServerSettings, projections_cmd: list[str] | None,
    console: tuple[list[str], str] | None = None,
) -> int:
    server_log = settings.store_dir / "nats-server.log"
    server = _spawn_detached(settings.command(), server_log)
    state = ServerState(
        pid=server.pid, url=settings.url, monitor_url=settings.monitor_url, store_dir=str(settings.store_dir),
        tls_ca=args.tls_ca_file,
    )
    # Recorded before waiting, so `bus down` can clean up even if this command is interrupted.
    write_state(home, state)
    try:
        await _wait_server_ready(settings, server.poll, server_log)
        fsync = await _prepare_log(settings, args.namespace, home)
        answering = False
        if projections_cmd is not None:
            state, answering = await start_projections_detached(
                projections_cmd, home, state, settings.url, args.namespace, args.start_timeout
            )
        serving = False
        if console is not None:
            state, serving = await start_console_detached(console, home, state, args.start_timeout)
    except BaseException:
        if state.console_pid is not None:
            await _terminate(state.console_pid, 5.0)
        await _terminate(server.pid, 5.0)
        clear_state(home)
        raise
    _print_summary(args, home, state, fsync, projections_cmd, answering, detached=True, console_ready=serving)
    return 0


async def _up_foreground(
    args: argparse.Namespace, home: Path, settings: ServerSettings, projections_cmd: list[str] | None,
    console: tuple[list[str], str] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children = _Children()
    try:
        async with up_metrics_endpoint(_up_metrics(children, settings.monitor_url), args, home):
            settings.store_dir.mkdir(parents=True, exist_ok=True)
            server_log = settings.store_dir / "nats-server.log"
            try:
                with open(server_log, "ab") as log:
                    children.server = await asyncio.create_subprocess_exec(
                        *settings.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        start_new_session=True,
                    )
                state = ServerState(
                    pid=children.server.pid, url=settings.url, monitor_url=settings.monitor_url,
                    store_dir=str(settings.store_dir), supervisor_pid=os.getpid(), tls_ca=args.tls_ca_file,
                )
                write_state(home, state)
                server = children.server
                await _wait_server_ready(settings, lambda: server.returncode, server_log)
                fsync = await _prepare_log(settings, args.namespace, home)
                answering = False
                if projections_cmd is not None:
                    children.projections = await asyncio.create_subprocess_exec(
                        *projections_cmd, stdin=subprocess.DEVNULL, start_new_session=True
                    )
                    state = msgspec.structs.replace(state, projections_pid=children.projections.pid)
                    write_state(home, state)
                    projections = children.projections
                    answering = await _wait_projections_ready(
                        settings.url, args.namespace, lambda: projections.returncode, None, args.start_timeout, home
                    )
                serving = False
                if console is not None:
                    children.console, state, serving = await start_console_child(console, home, state, args.start_timeout)
                _print_summary(args, home, state, fsync, projections_cmd, answering, detached=False, console_ready=serving)
                code = await _supervise(children, stop, server_log)
            finally:
                await children.stop(grace_s=10.0)
                current = read_state(home)
                if current is not None and children.server is not None and current.pid == children.server.pid:
                    clear_state(home)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    out("stopped: projection service and server are down")
    return code


async def start_console_detached(
    console: tuple[list[str], str], home: Path, state: ServerState, timeout_s: float
) -> tuple[ServerState, bool]:
    """Start the console (`console_command`'s command line) detached, logging to
    `<home>/console.log`; record it in the state file, then wait up to `timeout_s` for it to
    serve. Returns (the state, whether it serves)."""
    ui = _spawn_detached(console[0], home / "console.log")
    state = msgspec.structs.replace(state, console_pid=ui.pid, console_url=console[1])
    write_state(home, state)
    return state, await wait_console_ready(console[1], ui.poll, timeout_s)


async def start_console_child(
    console: tuple[list[str], str], home: Path, state: ServerState, timeout_s: float
) -> tuple[asyncio.subprocess.Process, ServerState, bool]:
    """Start the console as a child of a foreground `bus up` (stopped with it); record it in the
    state file, then wait up to `timeout_s` for it to serve. Returns (the child, the state,
    whether it serves)."""
    ui = await asyncio.create_subprocess_exec(*console[0], stdin=subprocess.DEVNULL, start_new_session=True)
    state = msgspec.structs.replace(state, console_pid=ui.pid, console_url=console[1])
    write_state(home, state)
    return ui, state, await wait_console_ready(console[1], lambda: ui.returncode, timeout_s)


class _Children:
    """The foreground `bus up`'s child processes, stopped in order: the console, projections,
    then the server."""

    def __init__(self) -> None:
        self.server: asyncio.subprocess.Process | None = None
        self.projections: asyncio.subprocess.Process | None = None
        self.console: asyncio.subprocess.Process | None = None

    async def stop(self, grace_s: float) -> None:
        await _stop_child(self.console, grace_s)
        await _stop_child(self.projections, grace_s)
        await _stop_child(self.server, grace_s)


async def _stop_child(proc: asyncio.subprocess.Process | None, grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; reaps the child."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _supervise(children: _Children, stop: asyncio.Event, server_log: Path) -> int:
    """Run until `stop` is set (signal) or the server exits. Returns the exit code for `bus up`."""
    server_exit: list[int] = []

    async def watch_server(proc: asyncio.subprocess.Process) -> None:
        server_exit.append(await proc.wait())
        stop.set()

    async def watch_projections(proc: asyncio.subprocess.Process) -> None:
        # The keeper restarts a crashed service itself; it only ends when the service refused
        # to run (its configuration) or was stopped.
        code = await proc.wait()
        out(f"warning: the projection service stopped for good ({describe_exit(code)}); the server keeps "
            "running (fix what it printed, then restart both with Ctrl-C and `bus up`)")

    async with asyncio.TaskGroup() as tg:
        watchers = []
        if children.server is not None:
            watchers.append(tg.create_task(watch_server(children.server)))
        if children.projections is not None:
            watchers.append(tg.create_task(watch_projections(children.projections)))
        await stop.wait()
        for task in watchers:
            task.cancel()
    if server_exit:
        out(f"error: nats-server exited with code {server_exit[0]}; its log ends with:\n{_log_tail(server_log)}")
        return 1
    out("stopping: projection service first, then the server ...")
    return 0


# -- readiness ---------------------------------------------------------------------------------


async def _wait_server_ready(settings: ServerSettings, exit_code: Callable[[], int | None], log_file: Path) -> None:
    """Wait until the server greets clients. Raises CliError if it exits or times out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.start_timeout_s
    while True:
        code = exit_code()
        if code is not None:
            raise CliError(f"nats-server exited with code {code} during start: {_start_failure(settings, log_file)}")
        try:
            await wait_until_listening(settings.port, 0.2)
        except BusUnavailable:
            if loop.time() > deadline:
                raise CliError(
                    f"nats-server did not accept clients on 127.0.0.1:{settings.port} within "
                    f"{settings.start_timeout_s}s (raise --start-timeout); its log ends with:\n{_log_tail(log_file)}"
                ) from None
            continue
        if exit_code() is None:
            return


def _start_failure(settings: ServerSettings, log_file: Path) -> str:
    tail = _log_tail(log_file)
    if "address already in use" in tail:
        return (f"a port it needs is in use (client port {settings.port}, monitoring port "
                f"{settings.monitor_port}): pick others with --port / --monitor-port\n{tail}")
    return f"its log ends with:\n{tail}"


def _log_tail(log_file: Path | None, chars: int = 1500) -> str:
    if log_file is None:
        return "(see its output above)"
    try:
        return log_file.read_text(errors="replace")[-chars:].rstrip() or "(empty log)"
    except OSError:
        return f"(no log at {log_file})"


async def _prepare_log(settings: ServerSettings, namespace: str, home: Path) -> bool | None:
    """Create the namespace's log and advisory streams (the Bus declares them on connect) and
    report whether the server fsyncs every write (None when unknown)."""
    from bus.client import Bus

    config = BusConfig(
        url=settings.url, namespace=namespace, name="bus-up", monitor_url=settings.monitor_url,
        **local_access(home),
    )
    async with asyncio.timeout(settings.start_timeout_s):
        async with Bus(config):
            pass
    if settings.monitor_url is None:
        return None
    try:
        varz = await asyncio.to_thread(read_varz, settings.monitor_url)
    except (OSError, ValueError):
        return None
    return bool(varz.get("jetstream", {}).get("config", {}).get("sync_always"))


async def _wait_projections_ready(
    url: str, namespace: str, exit_code: Callable[[], int | None], log_file: Path | None, timeout_s: float,
    home: Path,
) -> bool:
    """Wait until the projection service answers a query. Returns False if it is running but did
    not answer in time; raises CliError if it exited."""
    from bus.client import Bus

    config = BusConfig(
        url=url, namespace=namespace, name="bus-up", require_fsync=False, **local_access(home),
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with Bus(config) as bus:
        while loop.time() < deadline:
            code = exit_code()
            if code is not None:
                raise CliError(
                    f"the projection service exited with code {code} during start (start without it with "
                    f"--no-projections); its log ends with:\n{_log_tail(log_file)}"
                )
            try:
                await bus.query("SELECT 1", timeout_s=1.0)
                return True
            except QueryError as exc:
                if exc.kind != "timeout":
                    return True  # it answered, even if it refused this query
            except BusUnavailable:
                pass  # no responder yet
            await asyncio.sleep(0.1)
    return False


# -- bus down ----------------------------------------------------------------------------------


async def run_down(args: argparse.Namespace) -> int:
    """Stop what `bus up` started from this home and clear its state."""
    home: Path = args.home.resolve()
    state = read_state(home)
    if state is None:
        out(f"nothing to stop: no server was started from {home} (no {state_path(home)})")
        return 0
    stopped_any = False
    if state.supervisor_pid is not None and _is_running(state.supervisor_pid, _is_bus_up):
        # A foreground `bus up` owns the children: ask it, so it stops them in order itself.
        os.kill(state.supervisor_pid, signal.SIGTERM)
        if await _wait_gone(state.supervisor_pid, 2 * args.grace + 5.0):
            out(f"stopped the foreground `bus up` (pid {state.supervisor_pid}) and its children")
            stopped_any = True
    # The console and the projection service first (clients of the servers), then every server.
    groups = [
        [(state.console_pid, "console", _is_console)],
        [(state.projections_pid, "projection service", _is_projections)],
    ]
    groups.append([
        (node.pid, f"nats-server {node.name}" if state.nodes else "nats-server", _is_nats_server)
        for node in state.servers
    ])
    for group in groups:
        running = [(pid, label) for pid, label, marker in group if pid is not None and _is_running(pid, marker)]
        outcomes = await asyncio.gather(*(_terminate(pid, args.grace) for pid, _ in running), return_exceptions=True)
        for (pid, label), killed in zip(running, outcomes, strict=True):
            if isinstance(killed, BaseException):
                raise killed
            how = f"killed after {args.grace}s without exiting" if killed else "stopped"
            out(f"{how}: {label} (pid {pid})")
            stopped_any = True
    clear_state(home)
    if stopped_any:
        where = f"the stores stay in {state.store_dir}" if state.nodes else f"the store stays in {state.store_dir}"
        out(f"bus is down ({state.url}); {where}")
    else:
        pids = ", ".join(str(node.pid) for node in state.servers)
        what = "the cluster" if state.nodes else "the server"
        out(f"nothing was running: {what} recorded in {state_path(home)} ({state.url}, pid {pids}) "
            "had already exited; cleared that state")
    return 0


async def _clear_stale(home: Path, state: ServerState) -> None:
    """The recorded server is gone: stop an orphaned console and projection service and forget
    the state."""
    if state.console_pid is not None and _is_running(state.console_pid, _is_console):
        await _terminate(state.console_pid, 5.0)
    if state.projections_pid is not None and _is_running(state.projections_pid, _is_projections):
        await _terminate(state.projections_pid, 5.0)
    clear_state(home)
    out(f"note: the server recorded in {state_path(home)} (pid {state.pid}) is gone; starting a new one")


# -- processes ---------------------------------------------------------------------------------

# Checks that a recorded pid still runs what we started (pids get reused), from its argv.
def _is_nats_server(argv: list[str]) -> bool:
    return bool(argv) and "nats-server" in argv[0]


def _is_projections(argv: list[str]) -> bool:
    return "projections" in argv


def _is_console(argv: list[str]) -> bool:
    return "bus.cli.main" in argv and "ui" in argv


def _is_bus_up(argv: list[str]) -> bool:
    return "up" in argv


def _spawn_detached(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `cmd` in a session of its own (it outlives this process), output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(  # noqa: S603 - our own binaries, no shell
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )


def _alive(pid: int) -> bool:
    """True if `pid` exists and has not exited (a zombie has exited: nobody may reap it here)."""
    if pid <= 0:
        return False  # kill() would address a process group, never one recorded process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_running(pid: int, is_ours: Callable[[list[str]], bool]) -> bool:
    """True if `pid` is alive and (where /proc tells) still runs the program we started."""
    if not _alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return is_ours([a.decode(errors="replace") for a in argv if a])


async def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until `pid` has exited; False after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while _alive(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _terminate(pid: int, grace_s: float) -> bool:
    """SIGTERM `pid`, then SIGKILL after `grace_s`. Returns True if it had to be killed.
    Raises CliError if it survives SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if await _wait_gone(pid, grace_s):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not await _wait_gone(pid, 5.0):
        raise CliError(f"process {pid} is still running after SIGKILL; stop it by hand")
    return True


async def _check_port_free(port: int, option: str) -> None:
    """Raise CliError naming the port and the option when 127.0.0.1:`port` is taken."""
    if port_bindable(port):
        return
    suggestion = free_port_outside_ephemeral_range()
    try:
        await wait_until_listening(port, 0.5)
        what = f"a NATS server not started from this --home is already listening on 127.0.0.1:{port}"
        hint = f"use it (BUS_URL=nats://127.0.0.1:{port}), or start another with {option} {suggestion}"
    except BusUnavailable:
        what = f"port {port} on 127.0.0.1 is in use by another program"
        hint = f"pick another with {option} (e.g. {option} {suggestion})"
    raise CliError(f"{what}: {hint}")


# -- output and metrics ------------------------------------------------------------------------


def _home_flag(home: Path) -> str:
    default = Path(os.environ.get("BUS_HOME", DEFAULT_HOME))
    return "" if home == default else f" --home {home}"


def _print_summary(
    args: argparse.Namespace,
    home: Path,
    state: ServerState,
    fsync: bool | None,
    projections_cmd: list[str] | None,
    answering: bool,
    *,
    detached: bool,
    console_ready: bool = False,
) -> None:
    fsync_text = FSYNC_TEXT[fsync]
    projections = projections_summary(args, home, state, projections_cmd, answering, detached=detached)
    out(f"bus is up at {state.url} (namespace {args.namespace})")
    out(f"  server       pid {state.pid}, store {state.store_dir} ({fsync_text})")
    out(f"  monitoring   {state.monitor_url}")
    out(f"  projections  {projections}")
    out(f"  console      {console_summary(args, home, state.console_url, state.console_pid, console_ready, detached=detached)}")
    out(f"  access       {access_summary(args, home, state)}")
    out(f"  state        {state_path(home)}")
    exports = None
    if state.url != f"nats://127.0.0.1:{DEFAULT_PORT}" or args.namespace != "default":
        exports = f"BUS_URL={state.url} BUS_NAMESPACE={args.namespace} BUS_HOME={home}"
    print_next_steps(args, exports, detached=detached)


def access_summary(args: argparse.Namespace, home: Path, state: ServerState) -> str:
    """What `bus up` says about who may connect: authorization (and the admin credential the
    commands in this home use), TLS (and the CA they verify with)."""
    if getattr(args, "no_auth", False):
        return "anyone on this machine, as anyone (--no-auth)"
    text = f"authorization on; this home's commands use {CredentialRegistry(home).admin_credential} (bus creds list)"
    if state.tls_ca:
        text += f"; TLS, verified with {state.tls_ca}"
    return text


def projections_summary(
    args: argparse.Namespace, home: Path, state: ServerState, projections_cmd: list[str] | None, answering: bool,
    *, detached: bool,
) -> str:
    """What `bus up` says about the projection service it started (or why it did not)."""
    if projections_cmd is None:
        return "off (--no-projections)" if args.no_projections else f"not installed (no {PROJECTIONS_MODULE})"
    log = f", log {home / 'projections.log'}" if detached else ""
    ready = "answering queries" if answering else "started, not answering queries yet"
    return f"pid {state.projections_pid}, {ready}{log}"


def print_next_steps(args: argparse.Namespace, exports: str | None, *, detached: bool) -> None:
    """The `next:` block of `bus up`'s summary: what to export (if anything), what to try."""
    steps = [
        ("bus tail", "watch envelopes as they are stored"),
        ("bus send alice '{\"kind\":\"note\",\"text\":\"hi\"}'", "send one"),
        ("bus status", "the log and its consumers"),
    ]
    if detached:
        steps.append((f"bus down{_home_flag(args.home)}", "stop it"))
    width = max(len(command) for command, _ in steps)
    out("next:")
    if exports is not None:
        out(f"  export {exports}")
    for command, what in steps:
        out(f"  {command:<{width}}   {what}")
    if not detached:
        out("press Ctrl-C to stop")


def _up_metrics(children: _Children, monitor_url: str | None) -> CollectorRegistry:
    def children_up() -> list[tuple[str, bool]]:
        named = (("nats-server", children.server), ("projections", children.projections))
        return [(name, proc.returncode is None) for name, proc in named if proc is not None]

    return up_metrics(children_up, monitor_url)


@contextlib.asynccontextmanager
async def up_metrics_endpoint(
    registry: CollectorRegistry, args: argparse.Namespace, home: Path
) -> AsyncIterator[MetricsEndpoint]:
    """Serve a foreground `bus up`'s metrics on --metrics-port (or a free port), registered as
    the `bus_up` scrape target of `home`; the projection service registers its own."""
    target = ScrapeTarget.of("bus_up", namespace=args.namespace)
    async with metrics_endpoint(registry, args.metrics_port, target, home) as endpoint:
        out(f"metrics: {endpoint.url}; every process's scrape target in {home / 'metrics-targets'}")
        yield endpoint
