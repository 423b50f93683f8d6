"""The traffic view in headless Chromium while the bus is flooded: the page aggregates (a
bounded list, what passed too fast counted), and the newest envelope still shows up at once
when the flood ends. The console's pacing (bus.console.feed) and the page's (views.js) are
what keep an open console cheap beside a busy bus; this pins what a user sees of them.

Without Chromium (or the playwright package) the test skips, saying why, unless
CONTINUUM_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from console_fixtures import console_served, skip_module_without_browser

from bus import Bus, BusConfig
from bus.bench.browser import launch_kwargs
from schemas.payloads import Note

skip_module_without_browser()

from playwright.async_api import async_playwright  # noqa: E402 - only when a browser is there

pytestmark = pytest.mark.timeout(180)
TRAFFIC_ROWS = 50  # views.js TRAFFIC_ROWS
FLOOD = 20_000
SENDERS = 400


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(**launch_kwargs(tmp_path / "profile"))
        try:
            yield context
        finally:
            await context.close()


async def test_a_flooded_traffic_view_stays_bounded_and_shows_the_newest(
    bus: Bus, bus_config: BusConfig, browser: Any
) -> None:
    """20,000 notes published as fast as the bus takes them with the traffic view open: the page
    never lists more than its 50 rows, says how many passed too fast to list, and the note sent
    once the flood is over is listed (at the top) within seconds."""
    errors: list[str] = []
    async with console_served(bus_config) as base:
        page = await browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{base}/#/traffic")
        await page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)
        await page.wait_for_selector("#status.live", timeout=20_000)

        note = Note(text="a flood")
        per_sender = FLOOD // SENDERS

        async def sender(n: int) -> None:
            for _ in range(per_sender):
                await bus.publish(bus.envelope(note, to=f"sink-{n % 7}"))

        rows_seen: list[int] = []
        flood = asyncio.gather(*(sender(n) for n in range(SENDERS)))
        while not flood.done():
            rows_seen.append(await page.evaluate("() => document.querySelectorAll('tr.traffic-row').length"))
            await asyncio.sleep(0.05)
        await flood
        last = await bus.send("after-the-flood", Note(text="the newest"))
        newest = page.locator("#traffic-body tr.traffic-row").first
        await page.wait_for_selector(f"tr.traffic-row[data-id='{last.envelope.id}']", timeout=10_000)
        assert await newest.get_attribute("data-id") == last.envelope.id
        rows_seen.append(await page.evaluate("() => document.querySelectorAll('tr.traffic-row').length"))
        counter = await page.locator("#traffic-count").inner_text()
        await page.close()
    assert rows_seen and max(rows_seen) <= TRAFFIC_ROWS, rows_seen
    assert rows_seen[-1] == TRAFFIC_ROWS
    passed = re.search(r"([\d,]+) passed too fast to list", counter)
    assert passed is not None, counter
    assert int(passed.group(1).replace(",", "")) >= FLOOD // 2, counter
    assert errors == [], errors
