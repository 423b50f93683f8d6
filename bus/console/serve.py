"""Running the console: a socket of our own, uvicorn serving the app, the feed beside it.

    await serve(ConsoleConfig(port=4280), bus_config, stop=stop_event, ready=print_address)

The socket is bound first (so port 0 picks a free port and the address is known before any
page asks), then the Bus is opened, the feed starts following the log, uvicorn starts serving,
and `ready(url)` is called. Setting `stop` ends live pages' streams, stops the server (open
requests get `SHUTDOWN_GRACE_S`), then the feed, then closes the Bus.

Raises OSError (the address cannot be bound), BusUnavailable, PermissionDenied,
ConfigurationError (from opening the Bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator

import msgspec
import uvicorn

from bus.client import Bus
from bus.config import BusConfig
from bus.console.app import Console, build_app
from bus.console.config import ConsoleConfig

log = logging.getLogger("continuum.console")

SHUTDOWN_GRACE_S = 2.0
# How long the feed may take to start following the log before the console serves anyway (the
# page then says the live feed is not there yet).
FOLLOW_WAIT_S = 10.0
# uvicorn starts serving on the bound socket within this.
START_WAIT_S = 10.0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(host: str, port: int) -> str:
    """The console's address as a browser takes it."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


async def serve(
    config: ConsoleConfig,
    bus_config: BusConfig,
    *,
    stop: asyncio.Event,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the console until `stop` is set (see the module docstring)."""
    sock = bind(config.host, config.port)
    try:
        config = msgspec.structs.replace(config, port=sock.getsockname()[1])
        async with Bus(bus_config) as bus:
            await _serve(bus, config, sock, stop, ready)
    finally:
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: whoever runs the console owns the signals
    (`bus ui` sets `stop` on SIGINT/SIGTERM), and uvicorn would re-raise them after stopping."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(
    bus: Bus, config: ConsoleConfig, sock: socket.socket, stop: asyncio.Event, ready: Callable[[str], None] | None
) -> None:
    console = Console(bus, config)
    server = _Server(uvicorn.Config(
        build_app(console), lifespan="off", log_level="warning", access_log=False,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S), proxy_headers=False, server_header=False,
    ))
    async with asyncio.TaskGroup() as tasks:
        background = tasks.create_task(console.run())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FOLLOW_WAIT_S):
                await console.feed.following.wait()
        serving = tasks.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(START_WAIT_S):
                while not server.started and not serving.done():
                    await asyncio.sleep(0.01)
            if ready is not None and server.started:
                ready(url_of(config.host, config.port))
            stopped = tasks.create_task(stop.wait())
            await asyncio.wait((stopped, serving, background), return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
        finally:
            console.close()
            server.should_exit = True
            background.cancel()
