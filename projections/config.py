"""Typed, frozen settings of the projection service, built in entry points and passed down."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec

VIEWS_FILE = "views.duckdb"
DEFAULT_BATCH_MAX = 131_072
# One DuckDB thread per statement: the fold lanes and query workers are the parallelism, and
# DuckDB's own threads only contend with them (measured on 2 cores: bulk fold 104-121k ->
# 143-148k events/s, a live lane's 150-event fold 34-39 -> 24-31 ms). A log that keeps one lane
# busy alone folds slower (1M memory events caught up in 24 s instead of 19): raise it there.
DEFAULT_DUCKDB_THREADS = 1
DEFAULT_LINGER_S = 0.05
# The service's CPU niceness (Linux: 0 normal, 19 lowest). The views are derived from the log and
# catch up; the log's writers and readers cannot wait. Folding live at ~30k events/s takes a
# whole core, so on a small machine the fold and the bus fought for the CPU: with the service at
# 0, a browser following traffic (0.05 of a core) cost durable publishing 9-10% (`bus bench
# --section console`, 2 cores); at 10 the fold takes what the bus leaves. On an idle machine
# niceness changes nothing; under load the views fall further behind (a `min_seq` query waits).
DEFAULT_NICENESS = 10
# How much a query may grow the service's memory (DuckDB's cache of the views file aside): enough
# for aggregations over millions of events; a runaway string_agg or cross join stops here.
DEFAULT_QUERY_MEMORY_LIMIT = 1024**3
# A query request's bytes at most: SQL text and parameters, far past any real query.
DEFAULT_MAX_REQUEST_BYTES = 1024**2


class QuerySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of the read-only query service."""

    # Threads answering queries, each with its own DuckDB connection to the views.
    workers: int = 2
    # Queries being answered at once; further requests wait in the subscription's queue.
    max_concurrent: int = 64
    # Hard caps on what a request may ask for (it may ask for less).
    max_rows: int = 100_000
    max_timeout_s: float = 60.0
    # How long a query with `min_seq` waits for the views to apply that sequence before it is
    # answered with a `lag` failure (never longer than the request's own timeout).
    max_lag_wait_s: float = 5.0
    queue_group: str = "continuum-projections"
    # How much one query may grow the process's resident memory, DuckDB's cache of the views
    # file not counted (checked every 10 ms; over it, the query is interrupted: `too_large`).
    # None: DEFAULT_QUERY_MEMORY_LIMIT, or half of ProjectionSettings.memory_limit if less
    # (the folds share DuckDB's memory, and must keep room to commit).
    memory_limit_bytes: int | None = None
    # A request's bytes at most (the server's max_payload bounds it anyway); over it: `too_large`.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_concurrent < 1 or self.max_rows < 1:
            raise ValueError("query workers, max_concurrent and max_rows must be at least 1")
        if (self.memory_limit_bytes is not None and self.memory_limit_bytes < 1) or self.max_request_bytes < 1:
            raise ValueError("query memory_limit_bytes and max_request_bytes must be at least 1")


class ProjectionSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the views live and how the log is folded into them."""

    db_path: str
    # Events applied in one transaction at most. Live traffic makes smaller batches on its own:
    # the runner takes whatever has arrived while the previous batch was being applied. While
    # catching up, a batch above a DuckDB row group (122,880 rows) is written straight into the
    # file instead of through the WAL: ~30% more events/s than batches of 20k.
    batch_max: int = DEFAULT_BATCH_MAX
    # Events read ahead of the fold; reading pauses beyond this (bounded memory, ~0.5 KB each).
    read_ahead: int = 2 * DEFAULT_BATCH_MAX
    # The push consumer's idle heartbeat; a reader that hears nothing for 2 of them starts a new
    # consumer (its node died or hung): this bounds how long a failover leaves the views behind.
    heartbeat_s: float = 1.0
    # Connections folding at once, at most one per lane of views (projections.views.LANES:
    # log, runtime, memory, delivery; with fewer, lanes share connections in turn, and
    # `delivery` folds with `log`). DuckDB runs these statements on one core each; a query
    # waiting for its write is released when the lanes of the views it reads have committed.
    lanes: int = 4
    # How long a lane may let live batches gather while no query waits for its views (a
    # `min_seq` query for them ends the wait at once): the lanes a writer waits for then get the
    # cores, and the others pay their fold's fixed cost once per several batches. Views no one
    # waits for are this much staler at most; 0 folds every batch the moment it is decoded.
    linger_s: float = DEFAULT_LINGER_S
    # fsync the views file at every commit. Off: the views are rebuilt from the (fsynced) log
    # if the machine goes down while the file is unsynced (projections.unsynced).
    fsync: bool = False
    # DuckDB resources (None: DuckDB's defaults, 80% of RAM and one thread per core).
    memory_limit: str | None = None
    threads: int | None = DEFAULT_DUCKDB_THREADS
    query: QuerySettings = QuerySettings()
    # This service's name among those folding the same log (each with its own file): status and
    # rebuild requests can address it (`--service`). "": <host>-<file name>.
    service_name: str = ""
    # The namespace's archive of sealed segments (`bus archive`), read by the `archive_events`
    # view and by rebuilds (None: no archive; `bus projections run` passes <home>/archive/<ns>).
    archive_dir: str | None = None

    def __post_init__(self) -> None:
        if self.service_name and not _SERVICE_NAME.fullmatch(self.service_name):
            raise ValueError(f"invalid service name {self.service_name!r}: use 1-64 letters, digits, '_' or '-'")
        if self.batch_max < 1 or self.read_ahead < self.batch_max:
            raise ValueError("batch_max must be >= 1 and read_ahead >= batch_max")
        if self.linger_s < 0:
            raise ValueError("linger_s must be 0 or more")
        if self.heartbeat_s <= 0 or self.lanes < 1:
            raise ValueError("heartbeat_s must be positive and lanes at least 1")
        duckdb_limit = self._duckdb_memory_bytes()
        if duckdb_limit is not None and (self.query.memory_limit_bytes or 0) > duckdb_limit:
            raise ValueError(
                f"the query memory limit ({format_bytes(self.query.memory_limit_bytes or 0)}) is over DuckDB's "
                f"memory_limit ({self.memory_limit}): a query could take all of it and make the folds fail"
            )

    @property
    def service(self) -> str:
        """The service's name: `service_name`, else `<host>-<views file stem>` (made a subject token)."""
        if self.service_name:
            return self.service_name
        raw = f"{socket.gethostname().split('.')[0]}-{Path(self.db_path).stem}"
        return re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:64] or "projections"

    def query_memory_limit(self) -> int:
        """The bytes one query may grow the service by (see `QuerySettings.memory_limit_bytes`)."""
        if self.query.memory_limit_bytes is not None:
            return self.query.memory_limit_bytes
        duckdb_limit = self._duckdb_memory_bytes()
        return DEFAULT_QUERY_MEMORY_LIMIT if duckdb_limit is None else min(DEFAULT_QUERY_MEMORY_LIMIT, duckdb_limit // 2)

    def _duckdb_memory_bytes(self) -> int | None:
        try:
            return parse_bytes(self.memory_limit) if self.memory_limit else None
        except ValueError:
            return None  # a form only DuckDB reads (it says so at open)

    @classmethod
    def for_home(cls, home: Path, **overrides: object) -> ProjectionSettings:
        """Settings with the views file at `<home>/views.duckdb`."""
        return cls(db_path=str(Path(home) / VIEWS_FILE), **overrides)  # type: ignore[arg-type]


_SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """`"512MB"`, `"1GiB"`, `"1.5 GB"` or `"1048576"` as bytes (KB/MB/GB are powers of 1000,
    KiB/MiB/GiB of 1024, as DuckDB reads them). Raises ValueError."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "b").lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 512MB, 1GiB, 1048576)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(size: int) -> str:
    """`size` for a message: `1 GiB`, `488.3 MiB`, `1000 bytes`."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} bytes"


def lower_cpu_priority(niceness: int) -> None:
    """Make every thread of this process at least `niceness` nice (0-19; a thread already nicer
    is left so). On Linux niceness is each thread's own and a new thread takes its creator's:
    call it from entry points before they start threads of their own (importing DuckDB has
    already started its allocator's). Does nothing where the platform has no niceness. Raises
    ValueError for a niceness outside 0-19."""
    if not 0 <= niceness <= 19:
        raise ValueError(f"niceness must be 0-19, not {niceness}")
    if not hasattr(os, "getpriority"):
        return
    tasks = Path("/proc/self/task")
    threads = [int(entry.name) for entry in tasks.iterdir()] if tasks.is_dir() else [0]
    for thread in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, thread) < niceness:
                os.setpriority(os.PRIO_PROCESS, thread, niceness)
        except ProcessLookupError:
            pass  # the thread ended meanwhile


@contextlib.contextmanager
def tuned_gc(threshold: int = 50_000) -> Iterator[None]:
    """Run the block with a higher young-generation threshold for the cycle collector.

    Folding allocates a few container objects per event (envelopes, header dicts, rows) that all
    die by reference counting; with CPython's default threshold (700) the collector runs every
    few hundred events and re-scans the read-ahead buffer each time, which halves the fold rate.
    For entry points (`bus projections run`, the benchmark) only: it is process-wide, and the
    previous thresholds are restored on exit.
    """
    previous = gc.get_threshold()
    gc.set_threshold(threshold, previous[1], previous[2])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


@contextlib.contextmanager
def quick_gil_handoff(interval_s: float = 0.0005) -> Iterator[None]:
    """Run the block with a shorter GIL switch interval (CPython's default is 5 ms).

    Every DuckDB statement takes the GIL a few times (to start, to scan the Arrow batch, to hand
    back its result). While another thread runs Python (the event loop, the decoder), each of
    those waits up to one switch interval: measured on a 300-event live batch of the bus's own
    views, 12 ms alone, 31 ms next to a thread busy 2 ms in every 3, 21 ms with 0.5 ms. For
    entry points only: it is process-wide, and the previous interval is restored on exit.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
