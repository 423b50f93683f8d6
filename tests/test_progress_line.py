"""Progress for long work: one redrawn line on a terminal's standard error, nothing in a pipe.

The terminal is a stream the test reads, flagged `is_tty=True`; the pipe is the real thing (the
`bus` command as a subprocess with its standard error captured). Rebuilds and the team's start
run for real: a nats-server, a projection service and DuckDB files, supervised agent processes.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
from pathlib import Path

import msgspec
import pytest

from agents.research.demo import DemoSettings, ResearchDemo
from bus import Bus, BusConfig
from bus.cli.bench_command import _run_section
from bus.cli.progress_line import ProgressLine, polling
from bus.server import EmbeddedServer
from projections.config import ProjectionSettings
from projections.rebuild import rebuild_file
from projections.service import ProjectionService
from schemas.payloads import Note
from test_cli import run_bus

EVENTS = 6_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def terminal() -> tuple[io.StringIO, dict[str, object]]:
    stream = io.StringIO()
    return stream, {"stream": stream, "is_tty": True}


def drawn(stream: io.StringIO) -> list[str]:
    """The texts the line showed, in order (each redraw starts with a carriage return)."""
    return [part.removesuffix("\x1b[K") for part in stream.getvalue().split("\r") if part.removesuffix("\x1b[K")]


async def fill(bus: Bus, count: int) -> int:
    last = 0
    for start in range(0, count, 1_000):
        sent = await asyncio.gather(*(bus.send("alice", Note(text=f"n{i}")) for i in range(start, min(count, start + 1_000))))
        last = max(last, *(s.ack.seq for s in sent))
    return last


def test_on_a_terminal_the_line_shows_count_share_and_rate_at_most_ten_times_a_second() -> None:
    """The line reads 'rebuild: 412,000/1,000,000 events (41%) 38,000/s'; updates closer than a
    tenth of a second apart are not drawn; closing erases it."""
    stream, tty = terminal()
    clock = FakeClock()
    line = ProgressLine("rebuild", unit="events", clock=clock, **tty)  # type: ignore[arg-type]
    line.update(0, total=1_000_000)
    for step in range(1, 101):  # 100 updates over one second
        clock.now += 0.01
        line.update(step * 4_120, total=1_000_000)
    texts = drawn(stream)
    assert texts[0] == "rebuild: 0/1,000,000 events (0%)"
    assert 10 <= len(texts) <= 12, texts
    assert re.fullmatch(r"rebuild: [\d,]+/1,000,000 events \(\d+%\) [\d,]+/s", texts[-1]), texts[-1]
    clock.now += 1.0
    line.update(412_000, total=1_000_000)
    assert drawn(stream)[-1] == "rebuild: 412,000/1,000,000 events (41%) 206,000/s"
    line.close()
    assert stream.getvalue().endswith("\r\x1b[K")


async def test_off_a_terminal_nothing_is_written_and_nothing_polls() -> None:
    """A stream that is not a terminal gets no byte, and `polling` never asks how far the work is
    (however many turns the event loop takes meanwhile)."""
    stream = io.StringIO()
    line = ProgressLine("rebuild", unit="events", stream=stream)  # StringIO.isatty() is False
    asked = 0

    async def poll() -> None:
        nonlocal asked
        asked += 1

    async with polling(line, poll, interval_s=0.0):
        for _ in range(100):
            await asyncio.sleep(0)  # a turn of the loop, in which a poll would run
    line.update(5, total=10, force=True)
    line.close()
    assert not line.shown and asked == 0 and stream.getvalue() == ""


async def test_a_failing_poll_leaves_the_work_alone_and_the_blocks_own_error_passes_through() -> None:
    """A poll that raises is tried again; an error of the block itself reaches the caller as it
    was (not wrapped in an ExceptionGroup), and the line is erased."""
    stream, tty = terminal()
    line = ProgressLine("work", rate=False, min_interval_s=0.0, **tty)  # type: ignore[arg-type]
    asked = 0
    thrice = asyncio.Event()

    async def poll() -> None:
        nonlocal asked
        asked += 1
        line.update(asked)
        if asked == 3:
            thrice.set()
        raise RuntimeError("status unavailable")

    with pytest.raises(ValueError, match="^the work failed$"):
        async with polling(line, poll, interval_s=0.0):
            await asyncio.wait_for(thrice.wait(), 5)
            raise ValueError("the work failed")
    assert asked >= 3 and drawn(stream)[:3] == ["work: 1", "work: 2", "work: 3"]
    assert stream.getvalue().endswith("\r\x1b[K")


async def test_a_rebuild_on_a_terminal_shows_how_far_the_building_views_are(bus: Bus, tmp_path: Path) -> None:
    """Rebuilding a real log with a real service: the line counts the building views' applied
    sequence against the log's end, then is erased before the report is printed."""
    last = await fill(bus, EVENTS)
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    async with ProjectionService(bus, settings):  # the views as they would be before a rebuild
        await bus.query("SELECT count(*) FROM events", min_seq=last, timeout_s=30)
    stream, tty = terminal()
    line = ProgressLine("rebuild", unit="events", min_interval_s=0.0, **tty)  # type: ignore[arg-type]
    report = await rebuild_file(bus, settings, ["events", "messages"], progress=line, progress_every_s=0.01)
    assert report.events > 0
    texts = drawn(stream)
    counted = [t for t in texts if re.fullmatch(rf"rebuild: [\d,]+/{last:,} events \(\d+%\)( [\d,]+/s)?", t)]
    assert counted and set(texts) - set(counted) <= {"rebuild: starting"}, texts
    assert stream.getvalue().endswith("\r\x1b[K")


async def test_a_rebuild_in_a_pipe_prints_no_progress(
    nats_server: EmbeddedServer, bus: Bus, tmp_path: Path, admin_credentials: str
) -> None:
    """`bus projections rebuild` with its standard error a pipe: the report on standard output,
    not a byte of progress on standard error."""
    await fill(bus, EVENTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env.update(BUS_URL=nats_server.url, BUS_MONITOR_URL=nats_server.settings.monitor_url or "",
               BUS_HOME=str(tmp_path / "home"), BUS_CREDS=admin_credentials)
    result = await run_bus("projections", "rebuild", "--db", str(tmp_path / "views.duckdb"), env=env, cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "rebuilt" in result.stdout
    assert "\r" not in result.stderr and "rebuild:" not in result.stderr, result.stderr


async def test_a_bench_section_on_a_terminal_shows_which_and_for_how_long(tmp_path: Path) -> None:
    """While a section runs, the line names it and its running time; it is erased before the
    section's result is printed."""
    stream, tty = terminal()
    printed: list[str] = []
    line = ProgressLine("bench: section 1/1 slow_section", **tty)  # type: ignore[arg-type]
    result = await _run_section("fixtures_agents.slow_section", tmp_path, 1.0, 1, {}, printed.append, line)
    assert result.status == "ok"
    assert "bench: section 1/1 slow_section: running for 0s" in drawn(stream)
    assert stream.getvalue().endswith("\r\x1b[K") and printed[-1].endswith("done in 0.3s")


async def test_the_team_starting_on_a_terminal_counts_the_agents_ready(bus_config: BusConfig, tmp_path: Path) -> None:
    """The research team's four agent processes start (each reads its memory back first): the
    line counts those ready out of four, and is erased once all are."""
    stream, tty = terminal()
    line = ProgressLine("team", unit="agents ready", rate=False, min_interval_s=0.0, **tty)  # type: ignore[arg-type]
    async with Bus(msgspec.structs.replace(bus_config, name="coordinator")) as bus:
        demo = ResearchDemo(bus, DemoSettings(home=str(tmp_path / "home")), say=lambda _: None, progress=line)
        async with demo.team():
            texts = drawn(stream)
    assert texts and all(re.fullmatch(r"team: [0-4]/4 agents ready \(\d+%\)", t) for t in texts), texts
    assert stream.getvalue().endswith("\r\x1b[K")
