"""Running one read-only query on one DuckDB connection, safely.

Layers of protection, each enough on its own for what it covers:
1. The SQL must be exactly one SELECT (DESCRIBE, SHOW, SUMMARIZE, FROM-first and VALUES parse as
   SELECT too) that reads only relations of the views file and value-generating table functions
   (projections.statement). Anything else is `not_allowed` (or `bad_sql`) before it runs.
2. The thread running it may open no file at all (projections.sandbox, set up by the service):
   not the views file, its WAL or its temp directory, which DuckDB itself would allow. So a
   query does not spill to disk either: one that would is `too_large` (the folds still may).
3. It runs in a `BEGIN TRANSACTION READ ONLY` transaction that is always rolled back: no write
   to the views or the checkpoints can happen, whatever the SQL turns out to do.
4. The database was opened with `enable_external_access = false`, extension autoload off and
   `lock_configuration = true`: no host file but its own, no network, no extension, no SET.
5. Limits, each answered with a failure naming it: rows (rows past it are not read; the result
   says `truncated`), time (the watchdog interrupts the connection: `timeout`), memory (the
   watchdog interrupts a query that grew the process past its limit: `too_large`) and result
   bytes (`too_large`, before more rows are converted).

Memory is measured as the process's resident size minus DuckDB's cache of the views file
(reading a large view fills the cache, which DuckDB evicts as it needs): a query's own hash
tables, sorts, aggregate states and result rows. It is checked every `MEMORY_POLL_S`, so a
query can overshoot by what it allocates in that time; DuckDB's own `memory_limit` still bounds
what it tracks. DuckDB checks for an interrupt between chunks of rows: a single value built in
one step (`repeat('x', 10^9)`, `range(10^9)`) is not stopped half-way.

`QueryExecutor` is synchronous and not thread-safe: one per query thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import duckdb
import pyarrow as pa

from projections.config import format_bytes
from projections.fold import rollback
from projections.memory_share import FoldsFirst
from projections.recent import Recent
from projections.scopes import scoped_sql
from projections.statement import check
from schemas.query import QueryFailure, QueryResult, failure

__all__ = ["MEMORY_POLL_S", "QueryExecutor", "fetch_rows", "warm_up"]

MEMORY_POLL_S = 0.01
# How often a fold short of memory interrupts a query again until it lets go (make_room).
MAKE_ROOM_POLL_S = 0.01
_READ_BATCH = 1024
_BAD_SQL: tuple[type[duckdb.Error], ...] = (
    duckdb.ParserException,
    duckdb.CatalogException,
    duckdb.BinderException,
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
    duckdb.NotImplementedException,
    duckdb.TypeMismatchException,
    duckdb.SyntaxException,
)
_NOT_ALLOWED: tuple[type[duckdb.Error], ...] = (duckdb.PermissionException, duckdb.TransactionException)
# DuckDB tags of its cache of the views file's blocks (evicted as it needs: not a query's).
_CACHE = (
    "SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory() "
    "WHERE tag IN ('BASE_TABLE', 'METADATA', 'ART_INDEX')"
)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ResultTooLarge(Exception):
    """The rows read so far are already over the result's byte limit."""


class _Footprint:
    """The process's resident memory that is not DuckDB's cache of the views file (Linux)."""

    def __init__(self, probe: duckdb.DuckDBPyConnection) -> None:
        self._probe = probe
        self.available = os.path.exists("/proc/self/statm")

    def resident(self) -> int:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE

    def cached(self) -> int:
        return int(self._probe.execute(_CACHE).fetchone()[0])


class _Watchdog:
    """Interrupts the running query when its deadline passes, or when the process grew past
    `memory_limit` while it ran: one thread for an executor's life, not one per query (starting
    a thread costs more than a point lookup's result conversion). `tripped` says why."""

    def __init__(self, interrupt: Callable[[], None], footprint: _Footprint, memory_limit: int) -> None:
        self._interrupt = interrupt
        self._footprint = footprint
        self._memory_limit = memory_limit
        self._changed = threading.Condition()
        self._deadline: float | None = None
        self._armed = False  # from arm to disarm: a query is (about to be) running
        self._baseline: tuple[int, int] | None = None
        self.tripped: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="continuum-query-watchdog", daemon=True)
        self._thread.start()

    def arm(self, timeout_s: float) -> None:
        with self._changed:
            self._deadline = time.monotonic() + timeout_s
            self._armed = True
            self._baseline = None
            self.tripped = None
            self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._deadline = None
            self._armed = False
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def stop_for_folds(self) -> None:
        """Interrupt the running query, if any, for the folds (see QueryExecutor.make_room).
        Again if it was interrupted already: an interrupt DuckDB received before the query
        started executing is lost."""
        with self._changed:
            if self._armed and not self._closed:
                self._trip("folds")

    def _watch(self) -> None:
        watch_memory = self._footprint.available
        with self._changed:
            while not self._closed:
                if self._deadline is None:
                    self._changed.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    self._trip("timeout")
                    continue
                self._changed.wait(min(remaining, MEMORY_POLL_S) if watch_memory else remaining)
                # Still under the lock: a run that disarmed first is never interrupted.
                if watch_memory and self._deadline is not None and not self._closed and self._over_memory():
                    self._trip("memory")

    def _over_memory(self) -> bool:
        """Measured from the first poll, 10 ms in: a query that ends sooner costs nothing here."""
        footprint = self._footprint
        try:
            resident = footprint.resident()
            if self._baseline is None:
                self._baseline = (resident, footprint.cached())
                return False
            grown = resident - self._baseline[0]
            if grown <= self._memory_limit:
                return False  # (the cache only makes the query's own share smaller)
            return grown - (footprint.cached() - self._baseline[1]) > self._memory_limit
        except (OSError, ValueError, duckdb.Error):
            return False  # (closing): the time limit must keep being watched

    def _trip(self, why: str) -> None:
        self._deadline = None
        self.tripped = why
        with contextlib.suppress(duckdb.Error):  # (its connection closed with a database reopened)
            self._interrupt()


_CHECKS_REMEMBERED = 256


def _held_back(timeout_s: float) -> QueryFailure:
    return failure("timeout", f"the query waited its whole time limit of {timeout_s:.3g}s for the views to fold: "
                              "they were short of the memory they share with queries")


class QueryExecutor:
    """Answers queries on one connection (a cursor of the views database); `probe`, another
    cursor, measures DuckDB's cache for the memory limit."""

    def __init__(
        self,
        cursor: duckdb.DuckDBPyConnection,
        probe: duckdb.DuckDBPyConnection,
        *,
        memory_limit_bytes: int,
        max_result_bytes: int,
        folds_first: FoldsFirst | None = None,
        incarnation: int = 0,
    ) -> None:
        self._cursor = cursor
        # Queries give way to a fold short of memory (projections.memory_share).
        self._folds_first = folds_first
        # Set when the store was opened again (projections.store.Store.reopen): this executor's
        # cursors were closed with the old database; it is closed once its query ends.
        self.retired = False
        # A query whose ROLLBACK DuckDB refused (out of memory) left its transaction open and
        # aborted: the next query rolls it back first.
        self._unsettled = False
        # Set when DuckDB said it invalidated the database: the service opens it again.
        self.invalidated = False
        # The Store.incarnation its cursors belong to.
        self.incarnation = incarnation
        self.closed = False
        self._probe = probe
        self._running = threading.Lock()
        self._memory_limit = memory_limit_bytes
        self._max_result_bytes = max_result_bytes
        footprint = _Footprint(probe)
        self.measures_memory = footprint.available
        self._watchdog = _Watchdog(cursor.interrupt, footprint, memory_limit_bytes)
        if folds_first is not None:
            folds_first.add_queries(self.make_room)
        self._temp_directory = str(cursor.execute("SELECT current_setting('temp_directory')").fetchone()[0] or "")
        # `check` verdicts of recent SQL texts (a parse each, ~0.3 ms; clients repeat queries).
        self._checked: Recent[str, QueryFailure | None] = Recent(_CHECKS_REMEMBERED)

    def interrupt(self) -> None:
        """Stop the query running now, if any (from another thread)."""
        self._cursor.interrupt()

    def make_room(self, wait_s: float) -> None:
        """Stop the query running now, if any, because a fold ran out of DuckDB's memory (see
        projections.memory_share); wait up to `wait_s` for it to let go. Called from a fold
        lane's thread."""
        deadline = time.monotonic() + wait_s
        while True:
            # Repeated until the query lets go: one armed just after an interrupt (it had been
            # admitted before the fold ran short) is stopped within one poll of starting.
            self._watchdog.stop_for_folds()
            if self._running.acquire(timeout=max(0.0, min(MAKE_ROOM_POLL_S, deadline - time.monotonic()))):
                self._running.release()
                return
            if time.monotonic() >= deadline:
                return

    def close(self) -> None:
        self.closed = True
        if self._folds_first is not None:
            self._folds_first.remove_queries(self.make_room)
        self._watchdog.close()
        with contextlib.suppress(duckdb.Error):  # (closed already with a database reopened)
            self._cursor.close()
            self._probe.close()

    def run(
        self, sql: str, params: list[Any], *, max_rows: int, timeout_s: float, applied_seq: int,
        scope: str | None = None,
    ) -> QueryResult | QueryFailure:
        """Run `sql` read-only; at most `max_rows` rows, at most `timeout_s` seconds; in agent
        `scope`'s rows only when given (projections.scopes). Never raises for anything the SQL
        does: the failure is the answer."""
        started = time.perf_counter()
        refusal = self._check(sql, scope)
        if refusal is not None:
            return refusal
        if scope is not None:
            sql = scoped_sql(sql.rstrip().rstrip(";"), scope)
        cursor = self._cursor
        if self.retired:
            return failure("internal", "the views file was opened again while this query waited: send it again")
        if not self._admitted(started, timeout_s):
            return _held_back(timeout_s)
        with self._running:
            # A fold that ran short between `admit` and here: wait for it again, without the
            # lock its make_room waits on. From here on, one that runs short stops this query
            # (make_room interrupts it as soon as it is armed).
            while self._folds_first is not None and self._folds_first.holding:
                self._running.release()
                try:
                    if not self._admitted(started, timeout_s):
                        return _held_back(timeout_s)
                finally:
                    self._running.acquire()
            if self.retired:  # the store was opened again while this query waited to be admitted
                return failure("internal", "the views file was opened again while this query waited: send it again")
            timeout_s = max(0.001, timeout_s - (time.perf_counter() - started))
            try:
                if self._unsettled:
                    self._unsettled = not rollback(cursor)
                    if self._unsettled:
                        return failure("too_large", "the service is short of memory (DuckDB refused to end the "
                                                    "previous query): try again in a moment")
                try:
                    columns, types, rows, truncated = self._fetch(sql, params, max_rows, timeout_s)
                except duckdb.IOException as exc:
                    if not self._cleanup_refused(exc):
                        raise
                    # DuckDB removing, on this thread (kept off the disk), a file a fold spilled:
                    # not the query's doing, and done once.
                    columns, types, rows, truncated = self._fetch(sql, params, max_rows, timeout_s)
            except duckdb.InterruptException:
                return self._interrupted(timeout_s)
            except ResultTooLarge:
                return failure("too_large", f"the result is over the server's message limit of {self._max_result_bytes} "
                                            "bytes: select fewer rows or columns")
            except duckdb.OutOfMemoryException as exc:
                return failure("too_large", f"the query needs more memory than DuckDB may use: {_first_line(exc)}")
            except duckdb.IOException as exc:
                return self._file_refused(exc)
            except _NOT_ALLOWED as exc:
                return failure("not_allowed", f"not allowed on the read-only query service: {_first_line(exc)}")
            except _BAD_SQL as exc:
                return failure("bad_sql", str(exc))
            except duckdb.FatalException as exc:
                self.invalidated = True
                return failure("internal", f"DuckDB invalidated the views database ({_first_line(exc)}): it is being "
                                           f"opened again; send the query again")
            except duckdb.Error as exc:
                return failure("internal", f"{type(exc).__name__}: {exc}")
            except (ValueError, OverflowError, pa.ArrowException) as exc:
                return failure("bad_sql", f"a value of the result has no JSON form: {type(exc).__name__}: {exc}")
        return QueryResult(
            columns=columns, types=types, rows=rows, applied_seq=applied_seq, truncated=truncated,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def _admitted(self, started: float, timeout_s: float) -> bool:
        """Whether the folds let queries start within what is left of `timeout_s`."""
        folds_first = self._folds_first
        return folds_first is None or folds_first.admit(max(0.0, timeout_s - (time.perf_counter() - started)))

    def _fetch(
        self, sql: str, params: list[Any], max_rows: int, timeout_s: float
    ) -> tuple[list[str], list[str], list[list[Any]], bool]:
        """`fetch_rows` in a read-only transaction, always rolled back, under the watchdog."""
        cursor = self._cursor
        cursor.execute("BEGIN TRANSACTION READ ONLY").fetchall()
        self._watchdog.arm(timeout_s)
        try:
            return fetch_rows(cursor, sql, params, max_rows, self._max_result_bytes)
        finally:
            self._watchdog.disarm()
            self._unsettled = not rollback(cursor)

    def _cleanup_refused(self, exc: duckdb.IOException) -> bool:
        return bool(self._temp_directory) and self._temp_directory in str(exc) and "Could not remove file" in str(exc)

    def _interrupted(self, timeout_s: float) -> QueryFailure:
        why = self._watchdog.tripped
        if why == "memory":
            return failure(
                "too_large",
                f"the query grew the service's memory past its limit of {format_bytes(self._memory_limit)} per query: "
                "aggregate less, narrow it, or add a LIMIT",
            )
        if why == "folds":
            return failure(
                "too_large",
                "the query was stopped: it held memory the views needed to fold (queries and folds share "
                "DuckDB's memory_limit): aggregate less, narrow it, or add a LIMIT",
            )
        if why == "timeout":
            return failure("timeout", f"the query ran past its time limit of {timeout_s:.3g}s; narrow it or add a LIMIT")
        return failure("internal", "the query was interrupted: the service is stopping")

    def _file_refused(self, exc: duckdb.IOException) -> QueryFailure:
        if self._temp_directory and self._temp_directory in str(exc):
            return failure(
                "too_large",
                "the query needs more memory than the service lets it use, and queries may not spill to disk: "
                f"aggregate less, narrow it, or add a LIMIT ({_first_line(exc)})",
            )
        return failure("not_allowed", f"the query service reads and writes no files: {_first_line(exc)}")

    def _check(self, sql: str, scope: str | None) -> QueryFailure | None:
        key = sql if scope is None else f"{scope}\0{sql}"
        known, verdict = self._checked.lookup(key)
        if not known:
            verdict = check(self._cursor, sql, scope)
            self._checked.add(key, verdict)
        return verdict


def fetch_rows(
    cursor: duckdb.DuckDBPyConnection, sql: str, params: list[Any], max_rows: int, max_bytes: int
) -> tuple[list[str], list[str], list[list[Any]], bool]:
    """Run `sql` and read at most `max_rows` rows: (columns, type names, rows, truncated).
    Raises duckdb.Error, and ResultTooLarge once the rows read pass `max_bytes` (of Arrow data,
    about their size as JSON) without converting further."""
    cursor.execute(sql, params or None)
    columns = [d[0] for d in cursor.description]
    types = [str(d[1]) for d in cursor.description]
    # Through Arrow, not fetchall(): DuckDB's Python rows need pytz for TIMESTAMPTZ.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "extra copy of the rows": negligible for capped results
        reader = cursor.to_arrow_reader(min(_READ_BATCH, max_rows + 1))
    rows: list[list[Any]] = []
    truncated = False
    read_bytes = 0
    try:
        for record_batch in reader:
            room = max_rows - len(rows)
            if record_batch.num_rows > room:
                record_batch = record_batch.slice(0, room)
                truncated = True
            read_bytes += record_batch.nbytes
            if read_bytes > max_bytes:
                raise ResultTooLarge(read_bytes)
            cells = [column.to_pylist() for column in record_batch.columns]
            rows.extend(map(list, zip(*cells)))
            if truncated:
                break
    finally:
        reader.close()
    return columns, types, rows, truncated


def warm_up() -> None:
    """Convert values of every DuckDB type once, through `check` and `fetch_rows`, on a private
    in-memory database: what they import lazily (and any time zone file) is loaded before a
    query thread is sandboxed and can open no file."""
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'").fetchall()
        con.execute("CREATE TABLE warm AS SELECT * FROM test_all_types()").fetchall()
        sql = "SELECT * FROM main.warm, range(?)"
        check(con, sql)
        fetch_rows(con, "SELECT * FROM main.warm WHERE false", [], 1, 1 << 30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            columns = con.execute(sql, [1]).to_arrow_table().columns
        for column in columns:
            for chunk in column.chunks:
                for index in range(len(chunk)):
                    with contextlib.suppress(ValueError, OverflowError, pa.ArrowException):
                        chunk[index].as_py()  # (the extreme values some types hold do not convert)
    finally:
        con.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
