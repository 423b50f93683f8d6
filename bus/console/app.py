"""The console's state and its ASGI application.

    console = Console(bus, config)
    app = build_app(console)           # Starlette: the page, its assets, the JSON API, the live feed
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(console.run())   # the feed and the health sampler, until cancelled

`Console.run` owns the background loops; the HTTP server (bus.console.serve) owns the app.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bus.console.config import ConsoleConfig
from bus.console.feed import LiveFeed
from bus.console.health import HealthSampler
from bus.console.replay import ReplayRunner
from bus.errors import BusError

if TYPE_CHECKING:
    from bus.client import Bus

log = logging.getLogger("continuum.console")

STATIC = Path(__file__).resolve().parent / "static"
# Pauses before following the log again after it failed: from the first, doubling, to the last.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


class Console:
    """What every request handler reads: the bus, the live feed, the health sampler, the config."""

    def __init__(self, bus: "Bus", config: ConsoleConfig) -> None:
        self.bus = bus
        self.config = config
        self.feed = LiveFeed(config)
        self.health = HealthSampler(bus, self.feed, config.health_interval_s)
        self.replays = ReplayRunner(bus.config)
        self.feed_error: str | None = None
        self.closing = asyncio.Event()

    async def run(self) -> None:
        """Follow the log and sample health until cancelled; a failure of the bus is reported on
        the page and retried with backoff, never ends the console."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_forever())
            tasks.create_task(self.feed.stats_loop())
            tasks.create_task(self.health.run())

    async def _follow_forever(self) -> None:
        pause = RETRY_FIRST_S
        while True:
            try:
                await self.feed.follow(self.bus)
            except BusError as exc:
                self.feed_error = f"following the log: {exc}"
                log.warning("console: %s; again in %.1fs", self.feed_error, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)

    def close(self) -> None:
        """Ask every live page's stream to end (the server is stopping)."""
        self.closing.set()
        self.feed.close_pages()


def build_app(console: Console) -> Starlette:
    """The ASGI app serving `console`: the page, its static assets and the API (bus.console.routes)."""
    from bus.console import routes  # local: routes builds on this module's Console

    app = Starlette(
        routes=[
            Route("/", routes.index),
            *routes.API,
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(routes.Guard, console=console)],
        exception_handlers=routes.EXCEPTION_HANDLERS,
    )
    app.state.console = console
    return app
