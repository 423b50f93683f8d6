"""Folds first: how the folds and the queries share DuckDB's memory.

DuckDB has one `memory_limit` for the whole database, shared by every connection: a query that
takes all of it makes the folds beside it fail for memory. A failed fold is retried, but its
rollback needs memory too, and so does a commit; when either fails, DuckDB invalidates the
database, and the service can fold no more until it is restarted. So when a fold runs out of
memory, the queries give way:

1. the queries running now are stopped (each answers `too_large`, saying why), and the fold's
   lane waits for them to let go before it rolls back;
2. no new query starts until that lane has folded again (each waits, within its own time
   limit), so its retry finds the memory.

The gate opens after `HOLD_MAX_S` even if the lane has not folded yet: a fold too large for
the memory on its own (the runner retries it in smaller pieces) must not stop the queries for
as long as that takes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import duckdb

# The longest the queries are held back for a lane that has not folded again.
HOLD_MAX_S = 10.0
# How long a lane waits for each running query to let go of the memory.
LET_GO_WAIT_S = 1.0


def out_of_memory(exc: BaseException) -> bool:
    """Whether DuckDB failed `exc`'s statement for want of memory: refused it (a commit that
    could not allocate says so in a TransactionException), or invalidated the database because
    a rollback or commit could not allocate (a FatalException naming the original error)."""
    if isinstance(exc, duckdb.OutOfMemoryException):
        return True
    if isinstance(exc, duckdb.TransactionException | duckdb.FatalException):
        return any(sign in str(exc) for sign in _OUT_OF_MEMORY)
    return False


def lost_spill(exc: BaseException) -> bool:
    """Whether DuckDB failed for a block it had set aside in its temp directory and cannot read
    back (evicted by a query thread, which the sandbox keeps off the disk): its in-memory state
    refers to data it no longer has, and only opening the file again (its WAL is whole) mends
    that."""
    return isinstance(exc, duckdb.IOException) and "duckdb_temp_" in str(exc)


_OUT_OF_MEMORY = ("Out of Memory Error", "failed to allocate", "could not allocate", "failed to pin")


class FoldsFirst:
    """The gate between the folds and the queries (see the module docstring). Thread-safe: the
    lanes call `short` and `folded` from their threads, queries `admit` from theirs."""

    def __init__(self, *, hold_max_s: float = HOLD_MAX_S) -> None:
        self._hold_max_s = hold_max_s
        self._changed = threading.Condition()
        self._short: set[str] = set()
        self._closed_at: float | None = None
        self._stoppers: list[Callable[[float], None]] = []

    def add_queries(self, stop: Callable[[float], None]) -> None:
        """Register what stops one query worker's running query: `stop(wait_s)` interrupts it
        and waits up to `wait_s` for it to let go."""
        with self._changed:
            self._stoppers.append(stop)

    def remove_queries(self, stop: Callable[[float], None]) -> None:
        """Forget a query worker registered with `add_queries` (closed)."""
        with self._changed:
            if stop in self._stoppers:
                self._stoppers.remove(stop)

    def short(self, lane: str) -> None:
        """`lane`'s fold ran out of memory: hold new queries back and stop the running ones.
        Call it before the fold's rollback."""
        with self._changed:
            self._short.add(lane)
            if self._closed_at is None:
                self._closed_at = time.monotonic()
            stoppers = list(self._stoppers)
        for stop in stoppers:
            stop(LET_GO_WAIT_S)

    def folded(self, lane: str) -> None:
        """`lane` folded: the queries it held back may start (once no other lane is short)."""
        with self._changed:
            if lane not in self._short:
                return
            self._short.discard(lane)
            if not self._short:
                self._closed_at = None
                self._changed.notify_all()

    @property
    def holding(self) -> bool:
        """Whether new queries are being held back now."""
        with self._changed:
            return self._holding()

    def admit(self, wait_s: float) -> bool:
        """Wait until queries may start, at most `wait_s` seconds; return whether they may."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            while self._holding():
                assert self._closed_at is not None
                left = min(deadline, self._closed_at + self._hold_max_s) - time.monotonic()
                if left <= 0:
                    return not self._holding()
                self._changed.wait(left)
            return True

    def _holding(self) -> bool:
        return self._closed_at is not None and time.monotonic() - self._closed_at < self._hold_max_s
