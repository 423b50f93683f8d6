"""The console in-process for tests: served on a free port beside a projection service, against
the test's real nats-server (see bus.console.serve)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from bus import Bus, BusConfig
from bus.bench.browser import missing_browser
from bus.console.config import ConsoleConfig
from bus.console.serve import serve
from projections.config import ProjectionSettings
from projections.service import ProjectionService


def skip_module_without_browser() -> None:
    """Skip the calling test module, saying why, when Chromium or playwright is missing; unless
    CONTINUUM_REQUIRE_BROWSER=1 (CI), where that is a failure. Call it at module level."""
    reason = missing_browser()
    if reason is None:
        return
    if os.environ.get("CONTINUUM_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"CONTINUUM_REQUIRE_BROWSER=1 but the console cannot be tested in a browser: {reason}")
    pytest.skip(f"the console's browser tests need Chromium: {reason}", allow_module_level=True)


@contextlib.asynccontextmanager
async def console_served(bus_config: BusConfig, **fields: object) -> AsyncIterator[str]:
    """Serve the console until the block ends; yields its base URL (no trailing slash)."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    config = ConsoleConfig(port=0, health_interval_s=0.5, **fields)  # type: ignore[arg-type]
    settings = msgspec.structs.replace(bus_config, name="console")
    task = asyncio.create_task(serve(config, settings, stop=stop, ready=lambda url: ready.set_result(url)))
    try:
        done, _ = await asyncio.wait((ready, task), timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises why it ended
        if ready not in done:
            raise TimeoutError("the console did not start serving within 30s")
        yield ready.result().rstrip("/")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def projection_service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    """A projection service answering queries, its views in `tmp_path`."""
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as service:
        yield service
