"""Keeping the views current: read the log from the checkpoint, decode, fold, commit, repeat.

Reading, decoding and folding run at once, connected by bounded buffers (DuckDB releases the
GIL while it works):

    LogReader --records--> [read-ahead] --> decode thread --Batch--> lane queues --> lane threads
    (event loop)                             build_batch()                         Store.fold_lane()

Each fold lane (a group of views on its own DuckDB connection and thread, see
projections.views.LANES) takes everything waiting for it, so batches are large while catching
up, small (low latency) when live, and a slow lane holds back only its own views. After a lane
commits, its views' watermark advances, releasing the queries that read only them; once every
lane is past a sequence, the whole watermark does.

A live lane that no `min_seq` query waits for lingers (`ProjectionSettings.linger_s`): its batches
gather for a moment, so the lane a writer waits for (say, memory) folds on a free core instead of
sharing both with folds no one is waiting for, and the lingering lanes pay their per-fold cost once
for several batches. A query for its views, or a backlog, ends the wait.

A rebuild runs the same reading and decoding from sequence 1 into `building` generations, batch
by batch on the writer thread with every lane paused (`Store.apply_build`), so it interleaves
with the live folds and swaps between two of them.

No record ends the pipeline: one the decoder raises on goes in as an `events` row with the error
(`decode`), one a view cannot fold goes in with its error (projections.fold), one that kills the
process is recognised at the next start (projections.crashes). A fold the environment fails (out
of memory, disk full: FoldError) is retried, in smaller pieces, with backoff, for as long as it
takes: logged, counted (`continuum_projection_fold_retries_total`) and shown by status while it
lasts. Only a database DuckDB can no longer use (StoreUnusable) ends the service; the fold in
flight stays recorded for the next start. A commit DuckDB fails half-way (HalfCommitted: out of
memory during COMMIT, which is then not atomic) leaves the views it touched untrusted: the file is
opened again and those views are rebuilt from sequence 1 (the service starts that rebuild from
`on_reopened`, which gets them among the views to build), logged at error level and counted
(`continuum_projection_half_commits_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pyarrow as pa

from bus.errors import BusUnavailable
from bus.log_reader import LogReader, LogRecord
from projections.archive.reader import archived_batches
from projections.batch import Batch, build_batch, merge
from projections.config import ProjectionSettings
from projections.opening import FORGOTTEN, Opener
from projections.errors import ArchiveError, FoldError, RebuildError
from projections.fold import HalfCommitted, StoreInvalidated, StoreUnusable, describe, retry_delay
from projections.metrics import ProjectionMetrics
from projections.progress import Watermark
from projections.protocol import FoldRetry, RebuildReport
from projections.store import REOPENING, Applied, Store, SwappedSince

if TYPE_CHECKING:
    from bus import Bus

log = logging.getLogger("continuum.projections.runner")

T = TypeVar("T")
_REBUILD_READER_ATTEMPTS = 5
# What reading the log raises when reading it again later may work (the LogReader raises
# BusUnavailable: connection lost, consumer not created in time).
_READ_FAILURES = (BusUnavailable,)
# Live batches this small are decoded on the event loop (0.3-0.4 ms: Arrow's fixed costs): the
# hop to the decode thread and back costs more than that when the cores are busy (1.9 ms median
# measured on a memory write, out of ~19 from write to visible).
INLINE_DECODE_MAX = 16
# A lane lingers (see `Runner._linger`) only while fewer records than this (or half of
# `batch_max`) wait for it: beyond that, a fold's fixed cost is already spread thin.
LINGER_MAX_RECORDS = 5_000


class Source(Protocol):
    """What the pipeline reads from: a LogReader, or anything shaped like one."""

    restarts: int

    @property
    def head_seq(self) -> int: ...

    async def read(self, max_records: int) -> list[LogRecord]: ...


class Writer:
    """The one thread that touches the Store (DuckDB connections are not thread-safe)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="continuum-duckdb-writer")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread. If the caller is cancelled, `fn` still finishes
        (a DuckDB transaction is never abandoned half-way); later calls queue behind it."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """Wait for the queued work, then stop the thread."""
        self._pool.shutdown(wait=True)


class _ReadAhead:
    """Records read but not yet decoded; `put` waits while `limit` are waiting.

    `take` hands out records when the fold is waiting for work, or when a full batch is there.
    So while catching up, the next batch is decoded during the current commit (throughput);
    when live, records are taken fresh the moment the fold is free, instead of being decoded
    early into a batch that then waits a whole commit (latency).
    """

    def __init__(self, limit: int) -> None:
        self._items: list[LogRecord] = []
        self._limit = limit
        self._changed = asyncio.Condition()
        self._fold_waiting = True

    async def put(self, records: list[LogRecord]) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items) < self._limit)
            self._items.extend(records)
            self._changed.notify_all()

    async def take(self, max_records: int) -> list[LogRecord]:
        async with self._changed:
            await self._changed.wait_for(
                lambda: bool(self._items) and (self._fold_waiting or len(self._items) >= max_records)
            )
            taken = self._items[:max_records]
            del self._items[:max_records]
            self._changed.notify_all()
            return taken

    async def fold_waiting(self, waiting: bool) -> None:
        """Tell the decoder whether the fold is idle (then it takes whatever has arrived)."""
        async with self._changed:
            self._fold_waiting = waiting
            self._changed.notify_all()


class _LaneQueue:
    """Batches waiting for one lane; `put` waits while `limit` records wait. A lane that finds
    nothing waiting calls `on_idle` (the decoder then takes whatever records have arrived: a
    busy lane's next batch grows meanwhile, instead of many tiny ones being decoded for it)."""

    def __init__(self, limit: int, on_idle: Callable[[], Awaitable[None]], *, full: int, wake: asyncio.Event) -> None:
        self._batches: list[Batch] = []
        self._records = 0
        self._limit = limit
        self._on_idle = on_idle
        self._changed = asyncio.Condition()
        self._full = full
        self._wake = wake

    @property
    def has_work(self) -> bool:
        return bool(self._batches)

    @property
    def gathered(self) -> bool:
        """True once `full` records wait: a lane stops lingering (see `Runner._linger`)."""
        return self._records >= self._full

    async def put(self, batch: Batch) -> None:
        """Queue `batch`; sets the lane's wake event once `full` records wait (a lingering lane
        then folds at once: more would stall the feed of every lane)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._records < self._limit)
            self._batches.append(batch)
            self._records += batch.size
            self._changed.notify_all()
        if self.gathered:
            self._wake.set()

    async def ready(self) -> None:
        """Until a batch waits (telling the decoder the lane is idle first, if none does)."""
        if not self._batches:
            await self._on_idle()
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._batches))

    async def take(self, max_records: int) -> Batch:
        """Everything waiting (at least one batch, at most `max_records` unless one batch is
        larger), as one batch."""
        await self.ready()
        async with self._changed:  # (the lane is the only taker: the batches are still there)
            taken = [self._batches.pop(0)]
            size = taken[0].size
            while self._batches and size + self._batches[0].size <= max_records:
                taken.append(self._batches.pop(0))
                size += taken[-1].size
            self._records -= size
            self._changed.notify_all()
        return merge(taken)


class _LaneProgress:
    """The sequence (and its stream time) each lane has folded; all of them: the least."""

    def __init__(self, lanes: int, seq: int) -> None:
        self._seqs = [seq] * lanes
        self._times = [0] * lanes
        self.seq = seq
        self.time_ns = 0

    def folded(self, lane: int, seq: int, time_ns: int) -> bool:
        """Record a lane's fold; True if every lane is now further than before."""
        self._seqs[lane] = max(self._seqs[lane], seq)
        self._times[lane] = max(self._times[lane], time_ns)
        least = min(self._seqs)
        if least <= self.seq:
            return False
        self.seq = least
        self.time_ns = min(self._times)
        return True


class Runner:
    """Folds the log into the store: `run_live()` forever, `rebuild()` on request."""

    def __init__(
        self,
        bus: Bus,
        writer: Writer,
        settings: ProjectionSettings,
        metrics: ProjectionMetrics,
        watermark: Watermark,
        *,
        on_reopened: Callable[[list[str]], Awaitable[None]] | None = None,
        before_rewrite: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._bus = bus
        # Sealed private records are opened between decoding and folding (projections.opening).
        self._opener = Opener(bus.keys)
        # The last forget (privacy.forgotten) read live, and the last whose rows are erased from
        # the file too (`keep_erasing`).
        self._forget_seq = 0
        self.erased_seq = 0
        self._forget_read = asyncio.Event()
        self._writer = writer
        self._store = writer.store
        self._settings = settings
        self._metrics = metrics
        self.watermark = watermark
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="continuum-decode")
        self._build_lock = asyncio.Lock()
        self.rebuilding: list[str] = []
        self.head_seq = 0  # the log's end as last seen by the live reader
        self.lag_seconds: float | None = None
        # Folds the environment keeps failing, by lane (or "rebuild"), while they are retried.
        self._retrying: dict[str, FoldRetry] = {}
        # Set by a swap: the live pipeline starts over from the (new) checkpoint, so records it
        # read but could not apply (every view frozen during a rebuild) are read again.
        self._restart_live = asyncio.Event()
        # Held while the store is opened again (StoreInvalidated): no lane fold starts meanwhile.
        self._reopening = asyncio.Lock()
        # Told when it was, with the views to build (the service renews its query cursors).
        self._on_reopened = on_reopened
        # Closes every other connection to the file before it is rewritten (the query cursors).
        self._before_rewrite = before_rewrite
        # `Store.swaps` when the live pipeline started reading (None: no check, `fold_from`).
        self._live_swaps: int | None = None

    def close(self) -> None:
        self._decoder.shutdown(wait=True)

    @property
    def retrying(self) -> list[FoldRetry]:
        """The folds being retried now (the environment failed them), for status."""
        return list(self._retrying.values())

    # -- live -----------------------------------------------------------------------------

    async def run_live(self) -> None:
        """Keep the active views current until cancelled. Reader failures (server restart,
        lost connection) are retried from the checkpoint with backoff, fold failures where they
        happen (`_fold_retrying`). Raises StoreUnusable."""
        backoff = 0.2
        while True:
            # From the store's checkpoint (after any fold still running on the writer thread):
            # a batch committed after its awaiting task was cancelled still counts. Never from
            # the watermark when it is further: after a reopen (deferred checkpoints lost) and a
            # swap, views can be behind it, and records the reader skipped they would never get
            # (a lane folds only records above its views' checkpoint, so reading again is safe).
            settled, self._live_swaps = await self._writer.call(self._settled)
            self.watermark.advance(settled)
            start = settled + 1
            began = time.monotonic()
            try:
                if start <= self._store.log_floor:
                    start = await self._live_behind_the_log(start)
                await self._live_until_restart(start)
            except (BusUnavailable, BaseExceptionGroup) as exc:
                _reraise_if_cancelling(exc)
                failure = _only(exc, _READ_FAILURES)
                if time.monotonic() - began > 10:
                    backoff = 0.2
                log.warning("reading the log failed (%s); reading again from seq %d in %.1fs", failure, start, backoff)
                self._metrics.reader_restarts.inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _live_behind_the_log(self, start: int) -> int:
        """The active views need `start`, which has left the log (trimmed, or aged out, while
        they were not folding: a new views file over a trimmed log, or a service stopped during
        a trim). Fold what the archive holds from `start` into them, batch by batch on the
        writer thread, before the live reader starts. Returns the seq to read the log from.
        What neither the archive nor the log holds is logged (the views lack it; gap detection
        does not flag the log's own start). Raises StoreUnusable (via the fold's retries)."""
        floor = self._store.log_floor
        archive = self._settings.archive_dir
        folded = 0
        if archive is not None:
            try:
                async with contextlib.aclosing(
                    self._fold_archived(Path(archive), start - 1, self._store.apply, "live")
                ) as folding:
                    async for applied in folding:
                        folded += applied.events
                        self.watermark.advance(applied.last_seq)
            except ArchiveError as exc:
                log.error("the archive could not be read past seq %d: %s", self.watermark.seq, exc)
        settled, self._live_swaps = await self._writer.call(self._settled)
        self.watermark.advance(settled)
        if folded:
            log.info("folded seq %d..%d from the archive (the log starts at seq %d)", start, settled, floor + 1)
        if settled < floor:
            log.warning("records seq %d..%d left the log before these views applied them and %s: the views lack "
                        "them", settled + 1, floor,
                        "the archive does not hold them" if archive is not None else "no archive is served")
        return settled + 1

    async def _fold_archived(
        self, directory: Path, after: int, fold: Callable[[Batch], Applied], target: str
    ) -> AsyncIterator[Applied]:
        """(Use it under `contextlib.aclosing`.) Fold the archive's records after `after` with
        `fold` (on the writer thread) straight from the segment files, whole segments of at
        least archive.reader.BULK_RECORDS per batch, each opened first (sealed private
        records); yields what each fold applied. `target` is "live" (forgets read are noted,
        as from the log) or "rebuild". Raises ArchiveError, ArchiveCorrupt, StoreUnusable (via
        the fold's retries)."""
        async with contextlib.aclosing(archived_batches(directory, self._bus.subjects.stream, after)) as batches:
            async for sealed_batch in batches:
                batch = await self._opener.open(sealed_batch, self._offload)
                if target == "live" and batch.has_kind(FORGOTTEN):
                    self._note_forgets(batch)
                applied = await self._fold_retrying(
                    target, "archive" if target == "live" else target, batch,
                    lambda piece: self._writer.call(fold, piece),
                )
                if applied.events:
                    self._metrics.batch_size.labels(target).observe(applied.events)
                    self._metrics.applied.labels(target).inc(applied.events)
                yield applied

    def _settled(self) -> tuple[int, int]:
        """The store's checkpoint once no fold runs, and its swaps so far (one moment, on the
        writer thread, where swaps happen)."""
        return self._store.settled_applied_seq(), self._store.swaps

    async def _live_until_restart(self, start: int) -> None:
        """The live pipeline from `start`, until it fails or a swap asks for a fresh start."""
        async with asyncio.TaskGroup() as tasks:
            pipeline = tasks.create_task(self._pipeline(start_seq=start, fold=None, target="live"))
            restart = tasks.create_task(self._restart_live.wait())
            await asyncio.wait({pipeline, restart}, return_when=asyncio.FIRST_COMPLETED)
            pipeline.cancel()
            restart.cancel()
        self._restart_live.clear()

    # -- rebuild --------------------------------------------------------------------------

    async def rebuild(self, views: Sequence[str] = (), *, wait: bool = False) -> RebuildReport:
        """Rebuild `views` (all when empty) from sequence 1 while the active ones keep serving,
        then swap them in. With `wait`, first wait for a rebuild already running; else that is
        refused. Raises RebuildError (unknown view, one already running, the log could not be
        read); the active views are then unchanged."""
        if self._build_lock.locked() and not wait:
            raise RebuildError(f"a rebuild of {', '.join(self.rebuilding)} is already running; wait for it to finish")
        async with self._build_lock:
            try:
                # (With the incarnation, on the writer thread: a reopen queued behind the start
                # drops what it built, and the build must know.)
                names, incarnation = await self._writer.call(self._start_build, list(views))
            except ValueError as exc:
                raise RebuildError(str(exc)) from exc
            self.rebuilding = names
            fold = functools.partial(self._apply_build, incarnation)
            started = time.perf_counter()
            folded = 0

            def done(applied: Applied) -> bool:
                nonlocal folded
                folded += applied.events
                return applied.swapped

            archived = 0
            try:
                if not await self._writer.call(self._store.catch_up_build):
                    archived = await self._build(fold, done)
                self._restart_live.set()  # frozen views were swapped: read again from their checkpoint
            except Exception:
                # (Cancelled, the service is closing: the next open drops the building
                # generations it leaves, in Store._reconcile.)
                self._metrics.rebuilds.labels("failed").inc()
                await self._writer.call(self._store.abandon_build)
                raise
            finally:
                self.rebuilding = []
            seconds = time.perf_counter() - started
            await self._writer.call(self._store.drop_retired)
        self._metrics.rebuilds.labels("swapped").inc()
        log.info("rebuilt %s: %d events in %.2fs", ", ".join(names), folded, seconds)
        return RebuildReport(
            views=names, applied_seq=self.watermark.seq, events=folded, seconds=round(seconds, 3), archived=archived
        )

    def _start_build(self, views: list[str]) -> tuple[list[str], int]:
        return self._store.start_build(views), self._store.incarnation

    def _apply_build(self, incarnation: int, batch: Batch) -> Applied:
        """`Store.apply_build(batch)`, on the writer thread, unless the store was opened again
        since the build began (`incarnation`): that dropped the building generations. Raises
        RebuildError then, FoldError."""
        if self._store.incarnation != incarnation or not self._store.building:
            raise RebuildError("the views file was opened again after DuckDB invalidated it (out of memory), "
                               "which dropped the rebuild's work: ask for it again")
        return self._store.apply_build(batch)

    async def _build(self, fold: Callable[[Batch], Applied], done: Callable[[Applied], bool]) -> int:
        """Fold into the building views with `fold` until `done` says they swapped: the
        archive's segments first (when there is an archive), then the log. Returns the events
        folded from the archive. Raises RebuildError."""
        archive = self._settings.archive_dir
        archived = 0
        if archive is not None:
            swapped, archived = await self._build_from_archive(Path(archive), fold, done)
            if swapped:
                return archived
        for attempt in range(1, _REBUILD_READER_ATTEMPTS + 1):
            start = await self._writer.call(lambda: self._store.build_seq) + 1
            try:
                await self._pipeline(start_seq=start, fold=fold, target="rebuild", done=done)
                return archived
            except (BusUnavailable, BaseExceptionGroup) as exc:
                _reraise_if_cancelling(exc)
                failure = _only(exc, _READ_FAILURES)
                log.warning("rebuild could not read the log (attempt %d): %s", attempt, failure)
                if attempt == _REBUILD_READER_ATTEMPTS:
                    raise RebuildError(f"the rebuild could not read the log: {failure}") from failure
                await asyncio.sleep(0.2 * attempt)

    async def _build_from_archive(
        self, directory: Path, fold: Callable[[Batch], Applied], done: Callable[[Applied], bool]
    ) -> tuple[bool, int]:
        """Fold the archive's segments after the building checkpoint straight from their files
        (no log read, no decode: projections.archive.reader): whether the build swapped in, and
        the events folded. A
        segment that cannot be read ends the archive's share: the log is read from there, or,
        when the log no longer holds those records, RebuildError."""
        archived = 0
        try:
            after = await self._writer.call(lambda: self._store.build_seq)
            async with contextlib.aclosing(self._fold_archived(directory, after, fold, "rebuild")) as folding:
                async for applied in folding:
                    archived += applied.events
                    if applied.swapped:
                        self._after_swap()
                    if done(applied):
                        return True, archived
        except ArchiveError as exc:
            built = await self._writer.call(lambda: self._store.build_seq)
            if self._store.log_floor > built:
                raise RebuildError(f"the archive cannot be read past seq {built} ({exc}), and the log "
                                   f"starts at seq {self._store.log_floor + 1}") from exc
            log.warning("rebuild: the archive is read up to seq %d only (%s); the log from there", built, exc)
        return False, archived

    # -- the pipeline ---------------------------------------------------------------------

    async def _pipeline(
        self,
        *,
        start_seq: int,
        fold: Callable[[Batch], Applied] | None,
        target: str,
        done: Callable[[Applied], bool] | None = None,
    ) -> None:
        """Read from `start_seq` and fold: with `fold` (the rebuild's), batch by batch; without,
        into the active views lane by lane."""
        async with LogReader(self._bus, start_seq=start_seq, heartbeat_s=self._settings.heartbeat_s, name=target) as reader:
            await self._stages(reader, fold, target, done)

    async def fold_from(self, reader: Source, until_seq: int) -> None:
        """Fold what `reader` yields into the active views until `until_seq` is applied: the live
        pipeline over any source of records (the benchmark folds a log read into memory)."""
        await self._stages(reader, None, "live", None, until_seq=until_seq)

    async def _stages(
        self,
        reader: Source,
        fold: Callable[[Batch], Applied] | None,
        target: str,
        done: Callable[[Applied], bool] | None,
        *,
        until_seq: int | None = None,
    ) -> None:
        read_ahead = _ReadAhead(self._settings.read_ahead)
        decoded: asyncio.Queue[Batch] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as tasks:
            reading = tasks.create_task(self._read(reader, read_ahead), name=f"{target}-read")
            decoding = tasks.create_task(self._decode(read_ahead, decoded, live=fold is None), name=f"{target}-decode")
            try:
                if fold is None:
                    await self._fold_in_lanes(decoded, read_ahead, reader, until_seq)
                else:
                    await self._apply(decoded, read_ahead, fold, target, reader, done)
            finally:
                reading.cancel()
                decoding.cancel()

    async def _read(self, reader: Source, read_ahead: _ReadAhead) -> None:
        while True:
            await read_ahead.put(await reader.read(self._settings.batch_max))

    async def _decode(self, read_ahead: _ReadAhead, decoded: asyncio.Queue[Batch], *, live: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while True:
            records = await read_ahead.take(self._settings.batch_max)
            inline = len(records) <= INLINE_DECODE_MAX  # else off the event loop
            batch = decode(records) if inline else await loop.run_in_executor(self._decoder, decode, records)
            batch = await self._opener.open(batch, None if inline else self._offload)
            # What every lane's fold reads (the subject split), worked out once for all of them
            # here rather than by each lane's thread at once.
            if inline:
                batch.fold_table()
            else:
                await loop.run_in_executor(self._decoder, batch.fold_table)
            if live and batch.has_kind(FORGOTTEN):
                self._note_forgets(batch)
            await decoded.put(batch)

    async def _apply(
        self,
        decoded: asyncio.Queue[Batch],
        read_ahead: _ReadAhead,
        fold: Callable[[Batch], Applied],
        target: str,
        reader: Source,
        done: Callable[[Applied], bool] | None,
    ) -> None:
        metrics = self._metrics
        restarts_seen = reader.restarts
        while True:
            if decoded.empty():
                await read_ahead.fold_waiting(True)
                batch = await decoded.get()
                await read_ahead.fold_waiting(False)
            else:
                batch = decoded.get_nowait()
            started = time.perf_counter()
            applied = await self._fold_retrying(target, target, batch, lambda piece: self._writer.call(fold, piece))
            metrics.batch_seconds.labels(target).observe(time.perf_counter() - started)
            if applied.events:
                metrics.batch_size.labels(target).observe(applied.events)
                metrics.applied.labels(target).inc(applied.events)
            if applied.poisoned:
                metrics.poisoned.inc(applied.poisoned)
            if reader.restarts > restarts_seen:
                metrics.reader_restarts.inc(reader.restarts - restarts_seen)
                restarts_seen = reader.restarts
            if applied.swapped:
                self._after_swap()
            if done is not None and done(applied):
                return

    # -- live: one fold loop per lane -----------------------------------------------------

    async def _fold_in_lanes(
        self, decoded: asyncio.Queue[Batch], read_ahead: _ReadAhead, reader: Source, until_seq: int | None
    ) -> None:
        """Hand every decoded batch to each lane, and let each lane fold at its own pace (a
        slow view holds back only its own lane; a lane that fell behind folds what waits for it
        at once). Returns once every lane has applied `until_seq` (None: runs until cancelled)."""
        store = self._store
        progress = _LaneProgress(store.lane_count, self.watermark.seq)
        wakes = [asyncio.Event() for _ in range(store.lane_count)]
        full = min(LINGER_MAX_RECORDS, max(1, self._settings.batch_max // 2))
        queues = [
            _LaneQueue(self._settings.batch_max, lambda: read_ahead.fold_waiting(True), full=full, wake=wake)
            for wake in wakes
        ]
        reached = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            running = [
                tasks.create_task(self._fold_lane(lane, queue, wakes[lane], progress, reader, until_seq, reached),
                                  name=f"live-lane-{lane}")
                for lane, queue in enumerate(queues)
            ]
            running.append(tasks.create_task(self._feed_lanes(decoded, read_ahead, queues, reader), name="live-feed"))
            try:
                await reached.wait()
            finally:
                for task in running:
                    task.cancel()

    async def _feed_lanes(
        self, decoded: asyncio.Queue[Batch], read_ahead: _ReadAhead, queues: list[_LaneQueue], reader: Source
    ) -> None:
        restarts_seen = reader.restarts
        while True:
            batch = await decoded.get()
            undecodable = batch.table.column("error").length() - batch.table.column("error").null_count
            if undecodable:
                self._metrics.undecodable.inc(undecodable)
            if reader.restarts > restarts_seen:
                self._metrics.reader_restarts.inc(reader.restarts - restarts_seen)
                restarts_seen = reader.restarts
            for queue in queues:
                await queue.put(batch)
            if all(queue.has_work for queue in queues):
                # The next batch waits until a lane asks for one (`_LaneQueue.take`).
                await read_ahead.fold_waiting(False)

    async def _linger(self, lane: int, queue: _LaneQueue, wake: asyncio.Event) -> None:
        """Let batches gather for a lane no query waits for, up to `linger_s`: its fixed cost per
        fold is then paid once for several, and the lanes a query waits for get the cores. Ends
        at once when a query starts waiting for the lane's views, or when enough records wait
        that lingering gains nothing (`LINGER_MAX_RECORDS`, or half a batch).

        A lane whose writer is about to ask also waits for that query (a millisecond or two
        after the write's ack): measured on memory writes, that costs less than folding at once
        while the other lanes fold the same record on the same two cores (median write to
        visible 17.1 ms, against 23.9 ms when a lane awaited in the last second folded at once)."""
        linger_s = self._settings.linger_s
        if linger_s <= 0:
            return
        wake.clear()
        if queue.gathered or self.watermark.awaited(self._store.lane_views(lane)):
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(linger_s):
                await wake.wait()

    async def _fold_lane(
        self,
        lane: int,
        queue: _LaneQueue,
        wake: asyncio.Event,
        progress: _LaneProgress,
        reader: Source,
        until_seq: int | None,
        reached: asyncio.Event,
    ) -> None:
        store, metrics = self._store, self._metrics
        loop = asyncio.get_running_loop()
        name = "+".join(dict.fromkeys(store.specs[view].lane for view in store.lane_views(lane)))

        async def fold(piece: Batch) -> Applied:
            async with self._reopening:  # (uncontended: no wait) the lane's thread is the open store's
                thread = store.lane_thread(lane)
            return await loop.run_in_executor(thread, store.fold_lane, lane, piece, self._live_swaps)

        with self.watermark.demand(store.lane_views(lane), wake.set):
            while True:
                await queue.ready()
                await self._linger(lane, queue, wake)
                batch = await queue.take(self._settings.batch_max)
                started = time.perf_counter()
                # Cancelled meanwhile, the fold still finishes on the lane's thread (its commit
                # counts: a restart reads the checkpoint only once no fold runs).
                try:
                    applied = await self._fold_retrying("live", f"lane {name}", batch, fold)
                except SwappedSince:
                    # Batches read for the generations a rebuild replaced: the new ones may be
                    # behind them, and would skip what lies between. Read again from theirs.
                    self._restart_live.set()
                    await asyncio.Event().wait()  # (cancelled by the restart)
                metrics.batch_seconds.labels("live").observe(time.perf_counter() - started)
                self.watermark.advance(applied.last_seq, store.live_views(lane))
                if lane == 0 and applied.events:  # the first lane holds `events`: every record counts once
                    metrics.batch_size.labels("live").observe(applied.events)
                    metrics.applied.labels("live").inc(applied.events)
                if applied.poisoned:
                    metrics.poisoned.inc(applied.poisoned)
                if applied.rows.get("integrity"):
                    metrics.integrity_violations.inc(applied.rows["integrity"])
                    log.warning("integrity problems found in seq %d..%d: see the `integrity` view", batch.first_seq, batch.last_seq)
                if progress.folded(lane, applied.last_seq, batch.last_time_ns):
                    self._after_live(progress.seq, progress.time_ns, reader)
                if until_seq is not None and self.watermark.seq >= until_seq:
                    reached.set()

    async def _fold_retrying(
        self, target: str, where: str, batch: Batch, fold: Callable[[Batch], Awaitable[Applied]]
    ) -> Applied:
        """`fold(batch)`; a failure of the environment (FoldError: out of memory, disk full) is
        retried after `retry_delay`, each time on half as many records (a smaller transaction
        needs less memory), until it succeeds. Nothing a record causes gets here (the lane folds
        it as an error), so no record is ever given up on. A database DuckDB invalidated for want
        of memory (StoreInvalidated) is opened again, and the fold retried; a rebuild's work is
        lost with it (RebuildError). A commit DuckDB failed half-way (HalfCommitted) is handled
        alike: the store noted its views, and the reopen hands them to `on_reopened` to be
        rebuilt; retried, the fold then goes on from the checkpoint the file holds (the views it
        leaves wrong are those being rebuilt). Raises StoreUnusable, RebuildError."""
        done: Applied | None = None
        pending: Batch | None = batch
        size, attempt = batch.size, 0
        try:
            while pending is not None:
                piece = pending if size >= pending.size else pending.window(pending.after_seq, pending.seqs[size - 1])
                assert piece is not None
                incarnation = self._store.incarnation
                try:
                    applied = await fold(piece)
                except StoreUnusable:
                    raise
                except StoreInvalidated as exc:
                    if isinstance(exc, HalfCommitted):
                        self._metrics.half_commits.inc()
                        log.error("%s: %s; the views it touched (%s) are not trusted now: opening the views file "
                                  "again and rebuilding them from seq 1", where, exc, ", ".join(exc.views)
                                  if not exc.building else "the rebuild's, dropped")
                    else:
                        log.error("%s: %s; opening the views file again", where, exc)
                    await self.reopen(incarnation)
                    if target != "live":
                        raise RebuildError("the views file was opened again after DuckDB invalidated it (out of "
                                           "memory), which dropped the rebuild's work: ask for it again") from exc
                    continue
                except FoldError as exc:
                    attempt += 1
                    delay = retry_delay(attempt)
                    size = max(1, piece.size // 2)
                    self._retrying[where] = FoldRetry(
                        where=where, first_seq=piece.first_seq, last_seq=piece.last_seq, attempts=attempt,
                        since=self._retrying[where].since if where in self._retrying else datetime.now(UTC),
                        error=describe(exc),
                    )
                    self._metrics.fold_retries.labels(target).inc()
                    log.warning("%s: folding seq %d..%d failed, not for its records (%s); trying %d of them again "
                                "in %.1fs (attempt %d)", where, piece.first_seq, piece.last_seq, describe(exc),
                                size, delay, attempt + 1)
                    await asyncio.sleep(delay)
                    continue
                if attempt:
                    log.info("%s: folded seq %d..%d after %d retries", where, piece.first_seq, piece.last_seq, attempt)
                    self._retrying.pop(where, None)
                    attempt = 0
                done = applied if done is None else done.then(applied)
                pending = pending.window(piece.last_seq)
        finally:
            if attempt:  # cancelled (or the store gone) while retrying: no longer retrying here
                self._retrying.pop(where, None)
        assert done is not None
        return done

    async def _offload(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on the decode thread (off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._decoder, functools.partial(function, *args))

    def _note_forgets(self, batch: Batch) -> None:
        kinds = batch.table.column("kind").to_pylist()
        seqs = [seq for seq, kind in zip(batch.seqs, kinds) if kind == FORGOTTEN]
        if seqs and seqs[-1] > self._forget_seq:
            self._forget_seq = seqs[-1]
            self._forget_read.set()

    async def keep_erasing(self) -> None:
        """Until cancelled: once every view has folded a forget read live, rewrite the views file
        (Store.reopen with `rewrite`): DuckDB never clears freed blocks, so the rows the forget
        deleted would stay readable in the file. Queries wait meanwhile, as for any reopen; a
        rebuild in progress is dropped (ask for it again). Raises StoreUnusable."""
        while True:
            await self._forget_read.wait()
            self._forget_read.clear()
            seq = self._forget_seq
            while not await self.watermark.wait_for(seq, timeout_s=60.0):
                log.info("the forget at seq %d waits for every view to fold it before the file is rewritten", seq)
            started = time.perf_counter()
            await self.reopen(self._store.incarnation, rewrite=True)
            if not self._store.rewritten:
                log.error("forget at seq %d: the views file still holds the freed blocks; trying again in 5s", seq)
                await asyncio.sleep(5.0)
                self._forget_read.set()
                continue
            self.erased_seq = max(self.erased_seq, seq)
            log.warning("forget at seq %d: the views file was rewritten without its freed blocks in %.2fs",
                        seq, time.perf_counter() - started)

    async def reopen(self, incarnation: int, *, rewrite: bool = False) -> None:
        """Open the store again, after DuckDB invalidated it (or left it in a state only that
        mends), unless that was done since `incarnation` (several lanes and queries find out at
        once); then tell the service. With `rewrite`, the file is rewritten while it is closed
        (projections.compact). Raises StoreUnusable when the file cannot be opened."""
        async with self._reopening:
            if rewrite and self._before_rewrite is not None and incarnation == self._store.incarnation:
                await self._before_rewrite()
            try:
                stale = await self._writer.call(functools.partial(self._store.reopen, incarnation, rewrite=rewrite))
            except Exception as exc:
                raise StoreUnusable(f"could not open the views file again: {describe(exc)}") from exc
            if stale is None:
                return
            self._metrics.reopens.inc()
            log.warning("the views file is open again, from seq %d", self._store.applied_seq)
            try:
                if self._on_reopened is not None:
                    await self._on_reopened(stale)
            finally:
                self._store.folds_first.folded(REOPENING)  # the queries go on, on new cursors

    def _after_live(self, seq: int, time_ns: int, reader: Source) -> None:
        self.watermark.advance(seq)
        self.head_seq = max(self.head_seq, reader.head_seq)
        lag = max(0, self.head_seq - self.watermark.seq)
        self.lag_seconds = max(0.0, time.time() - time_ns / 1e9)
        self._metrics.lag_events.set(lag)
        self._metrics.lag_seconds.set(self.lag_seconds)
        for view in self._store.specs:  # a fixed set; the active generations change on the writer thread
            self._metrics.checkpoint.labels(view).set(self.watermark.seq)

    def _after_swap(self) -> None:
        for view in self._store.specs:
            self._metrics.checkpoint.labels(view).set(self.watermark.seq)


def decode(records: Sequence[LogRecord], build: Callable[[Sequence[LogRecord]], Batch] = build_batch) -> Batch:
    """`build(records)`: the records decoded (`build_batch`, which turns what it cannot decode
    into rows with the error). Should it raise all the same (a limit one record trips, a bug),
    the records are decoded in halves, and one that still fails alone becomes such a row, its
    `error` saying what was raised. Raises nothing but what `build` raises for an empty record."""
    try:
        return build(records)
    except Exception as exc:  # noqa: BLE001 - one record never stops the pipeline
        if len(records) == 1:
            return _undecodable(records[0], exc, build)
    half = len(records) // 2
    return merge([decode(records[:half], build), decode(records[half:], build)])


def _undecodable(record: LogRecord, exc: Exception, build: Callable[[Sequence[LogRecord]], Batch]) -> Batch:
    """`record` as a row with no fields but seq, time and subject, `error` saying why, `raw` its bytes."""
    log.warning("seq %d cannot be decoded (%s): kept with the error", record.seq, describe(exc))
    batch = build([record._replace(data=b"", header=b"")])
    table = batch.table
    for name, values in (("error", pa.array([f"cannot decode: {describe(exc)}"], pa.string())),
                         ("raw", pa.array([record.data], pa.binary()))):
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return dataclasses.replace(batch, table=table, kinds=frozenset(), claims=False)


def _reraise_if_cancelling(exc: BaseException) -> None:
    """A reader error seen while this task is being cancelled (the server went away during
    shutdown) must not turn into a retry: the cancellation wins."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc


def _only(exc: BaseException, kind: type[Exception] | tuple[type[Exception], ...]) -> Exception:
    """`exc` if it is a `kind`, or the single `kind` inside an exception group; anything else is
    re-raised (a fold failure must not be mistaken for a reader hiccup)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(kind)
        if rest is None and matched is not None:
            first = matched.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            return first  # type: ignore[return-value]
    raise exc
