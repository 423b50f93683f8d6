"""Folds and queries share DuckDB's memory_limit (projections.memory_share). A fold that runs out
of it while a query holds the memory stops that query before rolling back, and new queries wait
until the lane has folded: DuckDB's rollback and commit need memory too, and one that fails
invalidates the whole database (or, refused outright, left the lane's transaction open and
aborted, so that every later fold failed)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from bus import Bus
from bus.log_reader import LogReader, LogRecord
from projections.batch import build_batch
from projections.fold import FoldError, StoreInvalidated, StoreUnusable
from projections.memory_share import LET_GO_WAIT_S, FoldsFirst, out_of_memory
from projections.store import REOPENING, Store
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


async def _records(bus: Bus, count: int) -> list[LogRecord]:
    last = await append_batches(bus, list(synthetic_log(bus, count, seed=3)))
    records: list[LogRecord] = []
    async with LogReader(bus, start_seq=1) as reader:
        while not records or records[-1].seq < last:
            records += await reader.read(1000)
    return records


def _batches(records: list[LogRecord], size: int) -> Iterator:
    for at in range(0, len(records), size):
        yield build_batch(records[at:at + size], after_seq=records[at - 1].seq if at else 0)


@dataclass
class Outcome:
    out_of_memory: int = 0  # folds that failed for memory (FoldError), retried
    invalidated: int = 0  # folds after which DuckDB had invalidated the database, reopened
    most_attempts: int = 0  # the most attempts one fold needed


def _fold_all(store: Store, records: list[LogRecord], size: int) -> Outcome:
    """Fold `records` `size` at a time on every lane as the runner does: retried after a
    FoldError (at most 50 times), the store opened again after a StoreInvalidated."""
    outcome = Outcome()
    last_error: Exception | None = None
    for batch in _batches(records, size):
        for lane in range(store.lane_count):
            for attempt in range(1, 51):
                incarnation = store.incarnation
                try:
                    store.fold_lane(lane, batch)
                    outcome.most_attempts = max(outcome.most_attempts, attempt)
                    break
                except StoreInvalidated:
                    outcome.invalidated += 1
                    store.reopen(incarnation)
                    store.folds_first.folded(REOPENING)  # (as the runner does, with new query cursors)
                except FoldError as exc:
                    assert not isinstance(exc, StoreUnusable), exc
                    assert "aborted" not in str(exc), exc
                    outcome.out_of_memory += 1
                    last_error = exc
            else:
                pytest.fail(f"lane {lane} could not fold seq {batch.first_seq}..{batch.last_seq} in 50 attempts: {last_error}")
    return outcome


def _folded_once(store: Store, records: list[LogRecord]) -> None:
    rows = store.cursor().execute("SELECT count(*), count(DISTINCT seq), max(seq) FROM events").fetchall()
    assert rows == [(len(records), len(records), records[-1].seq)]


@pytest.mark.timeout(300)
async def test_folds_beside_a_query_that_exhausts_duckdbs_memory_fold_everything_once(bus: Bus, tmp_path: Path) -> None:
    """A query exhausts DuckDB's 96 MB again and again while 800 events are folded 25 at a time:
    folds fail for memory, but a lane's retry finds the memory (the query was stopped and the
    next waits), no lane is left in an aborted transaction, and every event is folded once."""
    records = await _records(bus, 800)
    store = Store(tmp_path / "views.duckdb", stream=STREAM, lanes=2, memory_limit="96MB")
    store.open()
    try:
        with MemoryHog(store) as hog:
            outcome = _fold_all(store, records, 25)
        assert hog.refused > 0 and outcome.out_of_memory + outcome.invalidated > 0, "nothing was tested"
        # Invalidated (DuckDB failed its own rollback at the first collision, before the gate
        # could act), a retry may need one more attempt.
        assert outcome.most_attempts <= 2 + outcome.invalidated, outcome
        _folded_once(store, records)
    finally:
        store.close()


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
