"""Running one read-only query on one DuckDB connection, safely.

Layers of protection, each enough on its own for what it covers:
1. The SQL must be exactly one statement, and a SELECT (DESCRIBE, SHOW, SUMMARIZE, FROM-first
   and VALUES parse as SELECT too). Anything else is `not_allowed` before it runs.
2. It runs in a `BEGIN TRANSACTION READ ONLY` transaction that is always rolled back: no write
   to the views or the checkpoints can happen, whatever the SQL turns out to do.
3. The database was opened with `enable_external_access = false`, extension autoload off and
   `lock_configuration = true`: no host file, no network, no extension, no SET.
4. A row limit (rows past it are not read; the result says `truncated`) and a time limit (a
   timer interrupts the connection).

`QueryExecutor` is synchronous and not thread-safe: one per query thread.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import duckdb

from projections.recent import Recent
from schemas.query import QueryErrorKind, QueryFailure, QueryResult

_READ_BATCH = 4096
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


class _Watchdog:
    """Calls `interrupt` when an armed deadline passes: one thread for an executor's life, not
    one per query (starting a thread costs more than a point lookup's result conversion)."""

    def __init__(self, interrupt: Callable[[], None]) -> None:
        self._interrupt = interrupt
        self._changed = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="continuum-query-watchdog", daemon=True)
        self._thread.start()

    def arm(self, timeout_s: float) -> None:
        with self._changed:
            self._deadline = time.monotonic() + timeout_s
            self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._deadline = None
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._changed:
            while not self._closed:
                if self._deadline is None:
                    self._changed.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._changed.wait(remaining)
                    continue
                self._deadline = None
                self._interrupt()  # under the lock: a run that disarmed first is never interrupted


_CHECKS_REMEMBERED = 256


class QueryExecutor:
    """Answers queries on one connection (a cursor of the views database)."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection) -> None:
        self._cursor = cursor
        self._running = threading.Lock()
        self._watchdog = _Watchdog(cursor.interrupt)
        # `_check` verdicts of recent SQL texts (a parse each, ~0.3 ms; clients repeat queries).
        self._checked: Recent[str, QueryFailure | None] = Recent(_CHECKS_REMEMBERED)

    def interrupt(self) -> None:
        """Stop the query running now, if any (from another thread)."""
        self._cursor.interrupt()

    def close(self) -> None:
        self._watchdog.close()
        self._cursor.close()

    def run(
        self, sql: str, params: list[Any], *, max_rows: int, timeout_s: float, applied_seq: int
    ) -> QueryResult | QueryFailure:
        """Run `sql` read-only; at most `max_rows` rows, at most `timeout_s` seconds. Never raises
        for anything the SQL does: the failure is the answer."""
        started = time.perf_counter()
        refusal = self._check(sql)
        if refusal is not None:
            return refusal
        cursor = self._cursor
        with self._running:
            try:
                cursor.execute("BEGIN TRANSACTION READ ONLY").fetchall()
                self._watchdog.arm(timeout_s)
                try:
                    columns, types, rows, truncated = self._fetch(sql, params, max_rows)
                finally:
                    self._watchdog.disarm()
                    cursor.execute("ROLLBACK").fetchall()
            except duckdb.InterruptException:
                return _failure("timeout", f"the query ran past its time limit of {timeout_s:.3g}s; narrow it or add a LIMIT")
            except _NOT_ALLOWED as exc:
                return _failure("not_allowed", f"not allowed on the read-only query service: {_first_line(exc)}")
            except _BAD_SQL as exc:
                return _failure("bad_sql", str(exc))
            except duckdb.OutOfMemoryException as exc:
                return _failure("too_large", f"the query needs more memory than the service has: {_first_line(exc)}")
            except duckdb.Error as exc:
                return _failure("internal", f"{type(exc).__name__}: {exc}")
        return QueryResult(
            columns=columns, types=types, rows=rows, applied_seq=applied_seq, truncated=truncated,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def _check(self, sql: str) -> QueryFailure | None:
        known, verdict = self._checked.lookup(sql)
        if not known:
            verdict = self._parse_check(sql)
            self._checked.add(sql, verdict)
        return verdict

    def _parse_check(self, sql: str) -> QueryFailure | None:
        try:
            statements = self._cursor.extract_statements(sql)
        except duckdb.Error as exc:
            return _failure("bad_sql", str(exc))
        if len(statements) != 1:
            return _failure("not_allowed", f"send exactly one statement per query (got {len(statements)})")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            name = str(kind).rsplit(".", 1)[-1]
            return _failure("not_allowed", f"only SELECT queries are answered (this is {name}); the views are read-only")
        return None

    def _fetch(self, sql: str, params: list[Any], max_rows: int) -> tuple[list[str], list[str], list[list[Any]], bool]:
        cursor = self._cursor
        cursor.execute(sql, params or None)
        columns = [d[0] for d in cursor.description]
        types = [str(d[1]) for d in cursor.description]
        # Through Arrow, not fetchall(): DuckDB's Python rows need pytz for TIMESTAMPTZ.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "extra copy of the rows": negligible for capped results
            reader = cursor.to_arrow_reader(min(_READ_BATCH, max_rows + 1))
        rows: list[list[Any]] = []
        truncated = False
        try:
            for record_batch in reader:
                room = max_rows - len(rows)
                if record_batch.num_rows > room:
                    record_batch = record_batch.slice(0, room)
                    truncated = True
                cells = [column.to_pylist() for column in record_batch.columns]
                rows.extend(map(list, zip(*cells)))
                if truncated:
                    break
        finally:
            reader.close()
        return columns, types, rows, truncated


def _failure(kind: QueryErrorKind, message: str) -> QueryFailure:
    return QueryFailure(kind=kind, message=message)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
