"""`bus bench` console section: the console measured in the system's headless Chromium.

    console_first_paint_ms               the agents page, from navigation to its data drawn (median
                                         of 5 loads), over a log of `console_log_events` events
    console_conversation_first_paint_ms  a conversation of 1,000 steps, drawn as its diagram
    console_live_delay_p50_ms / _p99_ms  publish -> shown in the traffic view, at 1,000 msg/s
    console_live_shown_fraction          of those envelopes, the share the page listed (it may
                                         aggregate; it must not fall behind)
    console_live_reach_p50_ms / _p99_ms  publish -> on the page, for every envelope: listed, or
                                         counted as passed too fast to list (by the sequences drawn)
    console_live_reached_fraction        of those envelopes, the share some draw reached
    console_live_rows_max                rows the traffic view held at the end (bounded at 50)
    console_publish_ratio                durable publishing with the console open and following
                                         traffic / without it: the median, over pairs of runs
                                         next to each other (which goes first alternating), of
                                         each pair's ratio
    console_consume_ratio                consuming and acking, the same way
    console_publish_ratio_low / _high    the pairs' ratios at the first and third quartile (how
    console_consume_ratio_low / _high    far one pair's ratio is to be trusted)
    console_publish_ratio_unpaired       the median of the runs with the console over the median
    console_consume_ratio_unpaired       of the runs without (the drift over the section in both)
    console_open_browser_cpu             while those ran with the console open: CPU time of every
    console_open_console_cpu             Chromium process (browser, renderer, GPU) and of the
                                         console's, per second of wall time (cores; medians)

A fresh server, a projection service and the console (`bus ui`) run as processes of their own,
as `bus up` starts them; the publishers, consumers and the browser's driver run here. Needs
Chromium and the playwright package (bus.bench.browser): without them the section says why and
measures nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bus.bench import BenchEnv, percentile
from bus.bench.browser import launch_kwargs, missing_browser
from bus.bench.consume import engine_rate, prepublish
from bus.bench.processes import bus_process
from bus.bench.publish import durable_rate
from bus.client import Bus
from bus.config import BusConfig
from bus.errors import BusUnavailable, QueryError
from schemas.payloads import Note

log = logging.getLogger("continuum.bench.console")

LOG_EVENTS = 1_000_000
CONVERSATION_STEPS = 1_000
LIVE_RATE_PER_S = 1_000
LIVE_TICK_S = 0.01
RATIO_MESSAGES = 200_000
# A consuming run replays this many (twice a publishing run's): at ~40k/s, runs of 200,000 (5 s)
# swung ±15% from one to the next, with or without the console, twice what publishing runs did.
CONSUME_MESSAGES = 2 * RATIO_MESSAGES
# Pairs of runs (one without the console, one with it) per repeat asked for. The console costs
# the two cores ~2% (Chromium ~0.035 of a core, the console ~0.008), while one run's rate swings
# ~5% from the next and the rates drift 25-30% down over the section (the projection service
# folds everything published beside them, 0.8-0.9 of a core, more as its views grow): ratios
# from 3 pairs came out 0.85-1.04 in one hour, from 9 pairs 0.96-0.97.
PAIRS_PER_REPEAT = 3
PAINT_LOADS = 5
# Before a run with the console, its process and the browser's are settled: together under
# SETTLED_CORES over SETTLE_WINDOW_S (following a flood they take ~0.04 of a core).
SETTLED_CORES = 0.1
SETTLE_WINDOW_S = 0.5
SENDERS = 5
RECIPIENTS = 20


class BrowserMissing(RuntimeError):
    """No Chromium (or no playwright) here: the section cannot measure."""


async def run(env: BenchEnv) -> dict[str, float]:
    """The console's figures (see the module docstring). Raises BrowserMissing."""
    reason = missing_browser()
    if reason is not None:
        raise BrowserMissing(f"the console section needs a browser: {reason}")
    from playwright.async_api import async_playwright

    figures: dict[str, float] = {}
    async with env.server("console") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bencher")
        home = env.workdir / "console-home"
        async with Bus(config, metrics_registry=CollectorRegistry()) as bus, _child(
            home / "projections.log", "projections", "run", "--url", server.url, "--home", str(home)
        ):
            events = env.n(LOG_EVENTS)
            await _fill_log(bus, events)
            corr = await _conversation(bus, CONVERSATION_STEPS)
            await _views_reach(bus, await bus.last_seq(), timeout_s=600)
            figures["console_log_events"] = float(await bus.last_seq())
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch_persistent_context(
                    **launch_kwargs(env.workdir / "chromium-profile")
                )
                try:
                    async with _console(server.url, home) as (base, _):
                        figures["console_first_paint_ms"] = await _first_paint(browser, f"{base}/#/agents")
                        figures["console_conversation_first_paint_ms"] = await _first_paint(
                            browser, f"{base}/#/conversation/{corr}"
                        )
                        figures.update(await _live_delay(bus, browser, base, seconds=max(3.0, 10 * env.scale)))
                    figures.update(await _with_and_without(
                        env, bus, browser, server.url, home, browser_pid=_browser_pid(env.workdir / "chromium-profile")
                    ))
                finally:
                    await browser.close()
    return {name: round(value, 3) for name, value in figures.items()}


# -- the log -----------------------------------------------------------------------------------


async def _fill_log(bus: Bus, count: int) -> None:
    """`count` notes from a few senders to a few agents, group-committed by 2,000 tasks."""
    note = Note(text="an envelope of the benchmark's log", data={"n": 1})
    tasks = 2_000
    per_task, extra = divmod(count, tasks)

    async def sender(worker: int, n: int) -> None:
        for i in range(n):
            await bus.publish(bus.envelope(note, to=f"agent-{(worker + i) % RECIPIENTS}",
                                           sender=f"client-{worker % SENDERS}"))

    async with asyncio.TaskGroup() as group:
        for worker in range(tasks):
            group.create_task(sender(worker, per_task + (1 if worker < extra else 0)))


async def _conversation(bus: Bus, steps: int) -> str:
    """One conversation of `steps` messages, each caused by the one before, among four agents."""
    agents = ("planner", "researcher", "writer", "reviewer")
    first = bus.envelope(Note(text="step 0"), to=agents[1], sender=agents[0])
    chain = [first]
    for i in range(1, steps):
        chain.append(bus.envelope(
            Note(text=f"step {i}"), to=agents[(i + 1) % 4], sender=agents[i % 4],
            correlation_id=first.id, causation_id=chain[-1].id,
        ))
    for start in range(0, steps, 200):
        await asyncio.gather(*(bus.publish(e) for e in chain[start:start + 200]))
    return first.id


async def _views_reach(bus: Bus, seq: int, timeout_s: float) -> None:
    """Until the projection service answers with its views at `seq`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await bus.query("SELECT 1", min_seq=seq, timeout_s=30)
            return
        except (BusUnavailable, QueryError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)  # still starting or folding: ask again


# -- processes -------------------------------------------------------------------------------


def _child(log_path: Path, *args: str) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """`bus ARGS` in a process of its own, output to `log_path`; SIGTERM at the end."""
    return bus_process(log_path, *args, grace_s=30)


@contextlib.asynccontextmanager
async def _console(url: str, home: Path) -> AsyncIterator[tuple[str, int]]:
    """`bus ui --port 0` in a process of its own; yields its base URL and its pid once it serves."""
    log_path = home / "console.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    async with _child(log_path, "ui", "--port", "0", "--url", url, "--home", str(home)) as proc:
        deadline = time.monotonic() + 60
        while True:
            text = log_path.read_bytes()[start:].decode(errors="replace")
            if "console at " in text:
                yield text.split("console at ", 1)[1].split()[0].rstrip("/"), proc.pid
                return
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the console did not start: {text[-2000:]}")
            await asyncio.sleep(0.05)


# -- in the browser --------------------------------------------------------------------------


async def _first_paint(browser: Any, url: str) -> float:
    """Median, over PAINT_LOADS fresh pages, of navigation start -> the view drawn with its data."""
    times = []
    for _ in range(PAINT_LOADS):
        page = await browser.new_page()
        try:
            await page.goto(url)
            await page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
            times.append(await page.evaluate(
                "() => performance.getEntriesByType('mark').find(m => m.name.startsWith('console-painted')).startTime"
            ))
        finally:
            await page.close()
    return statistics.median(times)


async def _live_delay(bus: Bus, browser: Any, base: str, *, seconds: float) -> dict[str, float]:
    """Publish at LIVE_RATE_PER_S for `seconds` with the traffic view open; per envelope, the
    time from just before its publish to the page listing it."""
    page = await browser.new_page()
    try:
        await page.goto(f"{base}/?measure=1#/traffic")
        await page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
        await page.wait_for_selector("#status.live", timeout=30_000)
        sent: dict[str, float] = {}
        sent_seq: list[tuple[int, float]] = []
        per_tick = max(1, round(LIVE_RATE_PER_S * LIVE_TICK_S))
        ticks = int(seconds / LIVE_TICK_S)
        note = Note(text="live")
        started = time.monotonic()
        for tick in range(ticks):
            envelopes = [bus.envelope(note, to="visitor") for _ in range(per_tick)]
            now_ms = time.time() * 1000
            for e in envelopes:
                sent[e.id] = now_ms
            for receipt in await asyncio.gather(*(bus.publish(e) for e in envelopes)):
                sent_seq.append((receipt.ack.seq, now_ms))
            pause = started + (tick + 1) * LIVE_TICK_S - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
        last_seq = max(seq for seq, _ in sent_seq)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if await page.evaluate(f"() => window.__consoleReached.some(([seq]) => seq >= {last_seq})"):
                break
            await asyncio.sleep(0.2)
        seen: dict[str, float] = await page.evaluate("() => Object.fromEntries(window.__consoleSeen)")
        reached: list[list[float]] = await page.evaluate("() => window.__consoleReached")
        rows = await page.evaluate("() => document.querySelectorAll('tr.traffic-row').length")
    finally:
        await page.close()
    delays = sorted(seen[i] - t for i, t in sent.items() if i in seen)
    if not delays:
        raise RuntimeError("the traffic view listed none of the envelopes published")
    reach = _reach_delays(sent_seq, reached)
    return {
        "console_live_delay_p50_ms": percentile(delays, 0.5),
        "console_live_delay_p99_ms": percentile(delays, 0.99),
        "console_live_shown_fraction": len(delays) / len(sent),
        "console_live_reach_p50_ms": percentile(reach, 0.5),
        "console_live_reach_p99_ms": percentile(reach, 0.99),
        "console_live_reached_fraction": len(reach) / len(sent_seq),
        "console_live_rows_max": float(rows),
    }


def _reach_delays(sent: list[tuple[int, float]], reached: list[list[float]]) -> list[float]:
    """Per envelope sent (its sequence, when it was sent), the time until the page drew a batch
    reaching its sequence (so it was listed, or counted as passed too fast to list); sorted.
    An envelope no draw reached is left out."""
    marks: list[tuple[float, float]] = []  # (sequence, when), the sequences rising
    for seq, at in reached:
        if not marks or seq > marks[-1][0]:
            marks.append((seq, at))
    seqs = [seq for seq, _ in marks]
    delays = []
    for seq, at in sent:
        index = bisect.bisect_left(seqs, seq)
        if index < len(marks):
            delays.append(marks[index][1] - at)
    return sorted(delays)


async def _with_and_without(
    env: BenchEnv, bus: Bus, browser: Any, url: str, home: Path, *, browser_pid: int | None
) -> dict[str, float]:
    """Durable publishing and consuming without the console and with it open on the traffic view
    (following everything), PAIRS_PER_REPEAT x `env.repeats` times, which goes first
    alternating; medians, the pairs' ratios (see `_paired_ratios`; every pair is logged), and
    the CPU the browser and the console took while open. Each publishing run moves
    RATIO_MESSAGES, each consuming run CONSUME_MESSAGES: at ~45k/s, shorter runs (50k, ~1 s)
    swung the ratios by 10-20% from one repeat to the next, as a single stall of the disk fell
    into one side or the other."""
    count, replayed = env.n(RATIO_MESSAGES), env.n(CONSUME_MESSAGES)
    await prepublish(bus, replayed)
    rates: dict[str, list[float]] = {"pub_without": [], "pub_with": [], "con_without": [], "con_with": []}
    cpu: dict[str, list[float]] = {"browser": [], "console": []}

    async def measure(side: str) -> None:
        # The views caught up first: a fold of the previous run's messages is no one's cost.
        await _views_reach(bus, await bus.last_seq(), timeout_s=300)
        rates[f"pub_{side}"].append(await durable_rate(bus, count, to="sink"))
        await _views_reach(bus, await bus.last_seq(), timeout_s=300)
        rates[f"con_{side}"].append(await engine_rate(bus, replayed))

    async def with_console() -> None:
        async with _console(url, home) as (base, console_pid):
            page = await browser.new_page()
            try:
                await page.goto(f"{base}/#/traffic")
                await page.wait_for_selector("#status.live", timeout=30_000)
                await _settled((browser_pid, console_pid))
                browser_before, console_before = _cpu_s(browser_pid), _cpu_s(console_pid)
                started = time.monotonic()
                await measure("with")
                wall = time.monotonic() - started
                cpu["browser"].append((_cpu_s(browser_pid) - browser_before) / wall)
                cpu["console"].append((_cpu_s(console_pid) - console_before) / wall)
            finally:
                await page.close()

    # One run of each, not counted: the first consume after the prepublish ran faster than any
    # after it (51-55k/s against 43-52k/s, either side), which favoured whichever side went first.
    await durable_rate(bus, count, to="sink")
    await engine_rate(bus, replayed)
    for repeat in range(PAIRS_PER_REPEAT * env.repeats):
        # Alternating which side goes first, so a drift of the machine favours neither.
        if repeat % 2 == 0:
            await measure("without")
            await with_console()
        else:
            await with_console()
            await measure("without")
    for i, pair in enumerate(zip(*rates.values(), strict=True)):
        log.info("console pair %d: %s", i, dict(zip(rates, (round(rate) for rate in pair), strict=True)))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "console_off_publish_per_s": medians["pub_without"],
        "console_open_publish_per_s": medians["pub_with"],
        **_paired_ratios("console_publish_ratio", rates["pub_with"], rates["pub_without"]),
        "console_off_consume_per_s": medians["con_without"],
        "console_open_consume_per_s": medians["con_with"],
        **_paired_ratios("console_consume_ratio", rates["con_with"], rates["con_without"]),
        **({"console_open_browser_cpu": statistics.median(cpu["browser"]),
            "console_open_console_cpu": statistics.median(cpu["console"])} if browser_pid is not None else {}),
    }


async def _settled(pids: tuple[int | None, ...], *, timeout_s: float = 15.0) -> None:
    """Until the processes `pids` (with their descendants) together took less than
    SETTLED_CORES over SETTLE_WINDOW_S: the console's start (imports, its first reads and health
    sample) and the page's first draws are over. Traced, they took 0.2-0.3 of a core each in
    the first second after the page went live, which fell into the first second of the run
    measured with the console. Gives up after `timeout_s` (logged), measuring anyway."""
    deadline = time.monotonic() + timeout_s
    before = sum(_cpu_s(pid) for pid in pids)
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_WINDOW_S)  # the window over which CPU use is read
        now = sum(_cpu_s(pid) for pid in pids)
        if now - before < SETTLED_CORES * SETTLE_WINDOW_S:
            return
        before = now
    log.warning("the console and the browser did not settle within %.0f s; measuring anyway", timeout_s)


def _paired_ratios(name: str, with_: list[float], without: list[float]) -> dict[str, float]:
    """`name`: the median of each pair's ratio (run i with the console over run i without: the
    two ran next to each other, so the drift of the section, 25-30% as the views grow, is in
    neither); `name`_low / _high: those ratios' quartiles; `name`_unpaired: median over median."""
    ratios = sorted(w / wo for w, wo in zip(with_, without, strict=True))
    return {
        name: statistics.median(ratios),
        f"{name}_low": percentile(ratios, 0.25),
        f"{name}_high": percentile(ratios, 0.75),
        f"{name}_unpaired": statistics.median(with_) / statistics.median(without),
    }


# -- CPU time, from /proc (Linux) ------------------------------------------------------------

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command's name (which may hold spaces), or None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _process_tree(root: int) -> list[int]:
    """`root` and every live process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _cpu_s(root: int | None) -> float:
    """CPU seconds (user + system) of `root` and its descendants so far, with the children it
    has reaped; 0 without /proc."""
    if root is None or not Path("/proc").is_dir():
        return 0.0
    total = 0
    for pid in _process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if pid == root else 0)
    return total / _TICKS_PER_S


def _browser_pid(profile_dir: Path) -> int | None:
    """The Chromium browser process using `profile_dir` (its renderers and GPU process are its
    descendants), or None when it cannot be found."""
    marker = f"--user-data-dir={profile_dir}".encode()
    if not Path("/proc").is_dir():
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in command and b"--type=" not in command:
            return int(entry)
    return None
