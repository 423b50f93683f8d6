"""Folds and queries share DuckDB's memory_limit (projections.memory_share). A fold that runs out
of it while a query holds the memory stops that query before rolling back, and new queries wait
until the lane has folded: DuckDB's rollback and commit need memory too, and one that fails
invalidates the whole database (or, refused outright, left the lane's transaction open and
aborted, so that every later fold failed). A commit that fails half-way leaves the views it
touched untrusted, and they are rebuilt (tests/test_fold_half_commit.py pins that alone)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from pathlib import Path

import duckdb
import pytest

from bus import Bus
from conftest import wait_for
from projections.config import ProjectionSettings
from projections.memory_share import LET_GO_WAIT_S, FoldsFirst, out_of_memory
from projections.service import ProjectionService
from projections.store import Store
from projections.workload import append_batches, synthetic_log

STREAM = "CONTINUUM_DEFAULT"
HOG = "SELECT len(list(repeat('x', 1000))) FROM range(3000000)"  # grows until DuckDB refuses


class MemoryHog:
    """A thread running HOG on its own cursor of `store` again and again, as a query worker
    would: stopped by the store's FoldsFirst (`make_room`), and admitted by it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cursor = store.cursor()
        self._folds_first = store.folds_first
        store.folds_first.add_queries(self.make_room)
        self._running = threading.Lock()
        self._stop = threading.Event()
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name="memory-hog")

    def __enter__(self) -> MemoryHog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.make_room(5.0)
        self._thread.join()
        with contextlib.suppress(duckdb.Error):
            self._cursor.close()

    def make_room(self, wait_s: float) -> None:
        # As QueryExecutor.make_room: interrupted again until it lets go (an interrupt that
        # arrives before the query starts executing is lost).
        deadline = time.monotonic() + wait_s
        while True:
            with contextlib.suppress(duckdb.Error):  # (closed with the database it was a cursor of)
                self._cursor.interrupt()
            if self._running.acquire(timeout=max(0.0, min(0.01, deadline - time.monotonic()))):
                self._running.release()
                return
            if time.monotonic() >= deadline:
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            self._folds_first.admit(5.0)
            with self._running:
                if self._folds_first.holding:
                    continue  # a fold ran short since `admit` (as QueryExecutor.run)
                try:
                    self._cursor.execute(HOG).fetchall()
                except duckdb.ConnectionException:
                    # The store was opened again (reopen closes every cursor): a new cursor,
                    # once it is open (it is reopened on the folding thread).
                    self._stop.wait(0.01)
                    with contextlib.suppress(duckdb.Error, RuntimeError):
                        self._cursor = self._store.cursor()
                except duckdb.Error:
                    self.refused += 1


def _retries_and_reopens(service: ProjectionService) -> float:
    registry = service.metrics.registry
    return ((registry.get_sample_value("continuum_projection_fold_retries_total", {"target": "live"}) or 0)
            + (registry.get_sample_value("continuum_projection_reopens_total") or 0))


async def settled(service: ProjectionService, last: int) -> bool:
    """Every view active at `last` or beyond, none untrusted, no rebuild running: read on the
    writer thread (`status`), so never half-way through a reopen."""
    assert service.runner is not None
    try:
        report = await service.status()
    except duckdb.Error:  # (DuckDB's memory is the hog's just now)
        return False
    return (not report.untrusted and not report.rebuilding and not service.runner.rebuilding
            and bool(report.views) and all(v.state == "active" and v.applied_seq >= last for v in report.views))


async def reference_hashes(bus: Bus, path: Path, last: int) -> dict[str, str]:
    """The views of an undisturbed fold of the log through `last`."""
    async with ProjectionService(bus, ProjectionSettings(db_path=str(path))) as reference:
        assert await reference.watermark.wait_for(last, 60)
        return await reference.content_hashes()


@pytest.mark.timeout(300)
async def test_folds_beside_a_query_that_exhausts_duckdbs_memory_fold_everything_once(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The projection service folds 400 events, 25 at a time per lane, while a query exhausts
    DuckDB's 96 MB again and again: folds fail for memory, and a lane's retry finds the memory
    (the query was stopped and the next waits); DuckDB may invalidate the database or fail a
    commit half-way (then the views it touched are rebuilt from seq 1), and in the end every
    view holds every event once: equal to an undisturbed fold."""
    caplog.set_level(logging.INFO, logger="continuum.projections.runner")
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), memory_limit="96MB", batch_max=25,
                                  read_ahead=25, linger_s=0)
    async with ProjectionService(bus, settings) as service:
        assert service.store is not None
        with MemoryHog(service.store) as hog:
            last = await append_batches(bus, list(synthetic_log(bus, 400, seed=3)))
            await wait_for(lambda: settled(service, last), timeout_s=240, interval_s=0.1,
                           what="every view folded through the log's end and trusted")
        assert hog.refused > 0 and _retries_and_reopens(service) > 0, "nothing was tested"
        # Invalidated (DuckDB failed its own rollback at the first collision, before the gate
        # could act), a fold may need one more retry.
        reopens = service.metrics.registry.get_sample_value("continuum_projection_reopens_total") or 0
        retries = [int(m.group(1)) for r in caplog.records if (m := re.search(r"after (\d+) retries", r.getMessage()))]
        assert max(retries, default=0) <= 1 + reopens, retries
        rows = service.store.cursor().execute("SELECT count(*), count(DISTINCT seq), max(seq) FROM events").fetchall()
        assert rows == [(400, 400, last)]
        folded = await service.content_hashes()
    assert folded == await reference_hashes(bus, tmp_path / "reference.duckdb", last)


# -- the gate alone ---------------------------------------------------------------------------


def test_a_short_lane_stops_the_running_queries_and_holds_new_ones_until_it_folds() -> None:
    gate = FoldsFirst(hold_max_s=60.0)
    stopped: list[float] = []
    gate.add_queries(stopped.append)
    assert gate.admit(0.0)

    gate.short("log")
    gate.short("memory")
    assert stopped == [LET_GO_WAIT_S, LET_GO_WAIT_S] and gate.holding
    assert not gate.admit(0.05)  # its whole wait, then refused

    admitted = threading.Event()
    waiter = threading.Thread(target=lambda: gate.admit(30.0) and admitted.set())
    waiter.start()
    gate.folded("log")
    assert not admitted.wait(0.05)  # "memory" is still short
    gate.folded("memory")
    waiter.join(10)
    assert admitted.is_set() and not gate.holding


def test_the_gate_opens_after_its_longest_hold_even_if_the_lane_never_folds() -> None:
    gate = FoldsFirst(hold_max_s=0.2)
    gate.short("log")
    started = time.monotonic()
    assert gate.admit(30.0)
    assert 0.15 < time.monotonic() - started < 5


def test_out_of_memory_is_told_from_duckdbs_errors() -> None:
    con = duckdb.connect(config={"memory_limit": "16MB"})
    with pytest.raises(duckdb.Error) as refused:
        con.execute("SELECT len(list(repeat('x', 1000))) FROM range(1000000)").fetchall()
    assert out_of_memory(refused.value)
    with pytest.raises(duckdb.Error) as other:
        con.execute("SELECT 1 / 'x'").fetchall()
    assert not out_of_memory(other.value)
