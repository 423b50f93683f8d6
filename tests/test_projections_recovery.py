"""Exactly-once folding across crashes, rebuilds that equal incremental folds, and the
`bus projections` commands, with the service as a real subprocess where it matters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import pytest
from conftest import wait_for

from bus import Bus, BusUnavailable, QueryError
from projections.config import DEFAULT_NICENESS, ProjectionSettings
from projections.service import ProjectionService
from projections.store import file_checkpoints, file_hashes
from projections.views import VIEWS
from projections.views import events as events_view
from projections.workload import LogItem, append_batches, synthetic_log

VIEW_NAMES = [spec.name for spec in VIEWS]


def _command(bus: Bus, home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bus.cli.main", *args, "--url", bus.config.url, "--creds", str(bus.config.credentials), "--namespace",
            bus.subjects.ns, "--home", str(home)]


def _log_file(path: Path) -> BinaryIO:
    """The child's stdout/stderr (closed here once the child has its own copy)."""
    return open(path, "ab")


@asynccontextmanager
async def service_process(bus: Bus, home: Path, *options: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`bus projections run` exactly as `bus up` starts it (plus `options`), as a child process."""
    log = _log_file(home / "projections.log")
    try:
        proc = await asyncio.create_subprocess_exec(
            *_command(bus, home, "projections", "run"), *options, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def answering(bus: Bus) -> bool:
    try:
        await bus.query("SELECT 1", timeout_s=5)
    except (BusUnavailable, QueryError):  # not started yet, or too busy starting to answer
        return False
    return True


async def cli(bus: Bus, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, _command(bus, home, *args), capture_output=True, text=True, timeout=300
    )


async def reference_hashes(bus: Bus, path: Path, last: int) -> dict[str, str]:
    """The views of an uninterrupted fold of the whole log."""
    async with ProjectionService(bus, ProjectionSettings(db_path=str(path))) as reference:
        await reference.watermark.wait_for(last, 60)
        return await reference.content_hashes()


async def _kill_while_folding(bus: Bus, tmp_path: Path, *, events: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    home = tmp_path / "home"
    home.mkdir()
    items = list(synthetic_log(bus, events, seed=seed))
    chunks: list[list[LogItem]] = []
    while sum(map(len, chunks)) < len(items):
        at = sum(map(len, chunks))
        chunks.append(items[at:at + rng.randrange(20, 300)])
    per_life = len(chunks) // (kills + 1)
    last = 0
    for life in range(kills + 1):
        share = chunks[life * per_life:(life + 1) * per_life] if life < kills else chunks[kills * per_life:]
        async with service_process(bus, home) as proc:
            await wait_for(lambda: answering(bus), timeout_s=60, what="the service to answer")

            async def kill_at_a_random_instant() -> None:
                # Fault injection, not a wait: the instant is the random variable under test.
                await asyncio.sleep(rng.uniform(0.02, 0.6))
                proc.send_signal(signal.SIGKILL)

            async with asyncio.TaskGroup() as tasks:
                if life < kills:
                    tasks.create_task(kill_at_a_random_instant())
                for chunk in share:  # the log keeps growing, whether the service lives or not
                    last = await append_batches(bus, chunk)
            if life < kills:
                assert await proc.wait() == -signal.SIGKILL
                continue
            result = await bus.query(
                "SELECT count(*), count(DISTINCT seq), max(seq) FROM events", min_seq=last, timeout_s=60
            )
            assert result.rows == [[last, last, last]]
            # That waited for the `events` lane only; a query naming no view waits for all of them.
            await bus.query("SELECT 1", min_seq=last, timeout_s=60)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert last == await bus.last_seq() == events
    assert file_checkpoints(home / "views.duckdb") == dict.fromkeys(VIEW_NAMES, last)
    crashed = file_hashes(home / "views.duckdb")
    assert crashed == await reference_hashes(bus, tmp_path / "reference.duckdb", last)


async def test_views_survive_sigkill_at_random_points(bus: Bus, tmp_path: Path) -> None:
    """`bus projections run` is SIGKILLed at random moments while events stream in and restarted:
    the views then equal, table by table (content hash), those of an uninterrupted fold.
    Batches and their checkpoint commit together, so nothing is lost or applied twice."""
    await _kill_while_folding(bus, tmp_path, events=3000, kills=3, seed=11)


@pytest.mark.soak
async def test_views_survive_many_sigkills(bus: Bus, tmp_path: Path) -> None:
    """The same, with 25 kills over 60,000 events."""
    await _kill_while_folding(bus, tmp_path, events=60_000, kills=25, seed=12)


async def test_restart_resumes_after_the_checkpoint(bus: Bus, tmp_path: Path) -> None:
    """A stopped service starts again from its checkpoint: no event is applied twice."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    first = await append_batches(bus, list(synthetic_log(bus, 500, seed=1)))
    async with ProjectionService(bus, settings) as service:
        await service.watermark.wait_for(first, 30)
    second = await append_batches(bus, list(synthetic_log(bus, 500, seed=2, first_seq=first + 1)))
    async with ProjectionService(bus, settings) as service:
        assert service.applied_seq == first
        result = await bus.query("SELECT count(*), count(DISTINCT seq) FROM events", min_seq=second)
    assert result.rows == [[second, second]]


async def test_rebuild_while_serving_equals_the_incremental_views(bus: Bus, tmp_path: Path) -> None:
    """A rebuild folds the log from seq 1 into new tables while the old ones keep answering
    (with events still arriving), then swaps; the result equals the incremental fold."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), batch_max=500)
    async with ProjectionService(bus, settings) as service:
        last = await append_batches(bus, list(synthetic_log(bus, 4000, seed=4)))
        await service.watermark.wait_for(last, 30)
        rebuilding = asyncio.create_task(service.rebuild())
        answers = 0
        try:
            while not rebuilding.done():
                result = await bus.query("SELECT count(*) FROM events")
                assert result.rows[0][0] >= last  # the old views stay whole while the new fill up
                answers += 1
                await asyncio.sleep(0.01)  # the pace of the queries asked while it rebuilds, not a wait
            report = await rebuilding
        finally:
            rebuilding.cancel()
        more = await append_batches(bus, list(synthetic_log(bus, 300, seed=5, first_seq=last + 1)))
        await service.watermark.wait_for(more, 30)
        status = await service.status()
        rebuilt = await service.content_hashes()
    assert answers > 0 and report.events >= last and sorted(report.views) == sorted(v.view for v in status.views)
    assert all(v.generation == 2 and v.applied_seq == more for v in status.views)
    assert rebuilt == await reference_hashes(bus, tmp_path / "reference.duckdb", more)


async def test_cli_status_and_rebuild_talk_to_the_service_or_open_the_file(bus: Bus, tmp_path: Path) -> None:
    """`bus projections status|rebuild` ask the running service; with none running they open the
    views file themselves and say so. A second service on the same file is refused."""
    home = tmp_path / "home"
    home.mkdir()
    last = await append_batches(bus, list(synthetic_log(bus, 800, seed=6)))
    async with service_process(bus, home) as proc:
        await wait_for(lambda: answering(bus), timeout_s=60, what="the service to answer")
        await bus.query("SELECT 1", min_seq=last)
        status = await cli(bus, home, "projections", "status")
        rebuilt = await cli(bus, home, "projections", "rebuild", "--view", "events")
        second = await cli(bus, home, "projections", "run")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    offline_status = await cli(bus, home, "projections", "status")
    offline_rebuild = await cli(bus, home, "projections", "rebuild", "--view", "messages")

    assert status.returncode == 0, status.stderr
    assert f"applied: seq {last}, lag 0 events" in status.stdout and "events" in status.stdout
    assert rebuilt.returncode == 0 and "rebuilt events" in rebuilt.stdout, rebuilt.stderr
    assert second.returncode == 2 and "open in another process" in second.stderr
    assert offline_status.returncode == 0 and "no projection service is running" in offline_status.stdout
    lines = {line.split()[0]: line.split() for line in offline_status.stdout.splitlines() if line.split()}
    assert lines["events"][1:5] == ["2", str(events_view.VERSION), "active", str(last)]
    assert offline_rebuild.returncode == 0, offline_rebuild.stderr
    assert "rebuilding" in offline_rebuild.stdout and "directly" in offline_rebuild.stdout
    assert "rebuilt messages" in offline_rebuild.stdout


def _thread_niceness(pid: int) -> dict[int, int]:
    """Every thread of `pid`: its niceness (/proc/<pid>/task/<tid>/stat, field 19)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            found[int(task.name)] = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads' niceness is read from Linux's /proc")
async def test_the_service_runs_every_thread_at_its_niceness(bus: Bus, tmp_path: Path) -> None:
    """`--nice N` is every thread's (the loop's, DuckDB's, the query workers'), so the fold
    yields the CPU to the bus as a whole; the default is DEFAULT_NICENESS; a niceness outside
    0-19 is refused with a clear error before anything starts."""
    home = tmp_path / "home"
    home.mkdir()
    last = await append_batches(bus, list(synthetic_log(bus, 300, seed=8)))
    own = os.getpriority(os.PRIO_PROCESS, 0)
    chosen = min(19, max(own, DEFAULT_NICENESS) + 2)
    seen: dict[str, dict[int, int]] = {}
    for label, options in (("chosen", ("--nice", str(chosen))), ("default", ())):
        async with service_process(bus, home, *options) as proc:
            await wait_for(lambda: answering(bus), timeout_s=60, what="the service to answer")
            await bus.query("SELECT count(*) FROM events", min_seq=last, timeout_s=30)
            seen[label] = _thread_niceness(proc.pid)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    refused = [await cli(bus, home, "projections", "run", "--nice", value) for value in ("20", "-1", "low")]

    # A folding, answering service has its loop, DuckDB's and the query workers' threads.
    assert len(seen["chosen"]) >= 4, seen
    assert set(seen["chosen"].values()) == {chosen}, seen
    assert set(seen["default"].values()) == {max(own, DEFAULT_NICENESS)}, seen
    for result in refused:
        assert result.returncode == 2, result
        assert "niceness" in result.stderr or "whole number" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


async def test_metrics_port_serves_prometheus_text(bus: Bus, tmp_path: Path) -> None:
    """`bus projections run --metrics-port P` serves the projection metrics over HTTP."""
    import urllib.request

    from bus.server import free_port_outside_ephemeral_range

    home = tmp_path / "home"
    home.mkdir()
    port = free_port_outside_ephemeral_range()
    proc = await asyncio.create_subprocess_exec(
        *_command(bus, home, "projections", "run"), "--metrics-port", str(port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    scraped: list[str] = []

    async def metrics_served() -> bool:
        # The endpoint opens once the views file is the service's, a moment after queries are.
        try:
            scraped.append(await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            ))
        except OSError:
            return False
        return True

    try:
        await wait_for(lambda: answering(bus), timeout_s=60, what="the service to answer")
        await wait_for(metrics_served, timeout_s=30, interval_s=0.05, what="the metrics endpoint to answer")
        text = scraped[-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert "continuum_projection_lag_events" in text and "continuum_query_seconds" in text
    assert "continuum_projection_events_applied_total" in text
    assert os.path.exists(home / "views.duckdb")
