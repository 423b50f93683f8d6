"""Reading the archive for the projection service: the segments a view or a rebuild may use,
and the view kept in step with the directory.

Only segments whose chain holds (from their metadata: links, ranges, stream) are used; from the
first broken one on, nothing (a log warning says which and why, `bus archive verify` tells more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from projections.archive import view
from projections.batch import BATCH_SCHEMA, Batch, batch_of_table, merge
from projections.archive.segment import GENESIS, parse_name
from projections.archive.verify import Segment, read_meta, segment_paths
from projections.errors import ArchiveCorrupt, ArchiveError

log = logging.getLogger("continuum.projections.archive")

# The fold's batch columns, in their order (projections.batch).
BATCH_COLUMNS = tuple(BATCH_SCHEMA.names)

# Segments are folded at least this many records at a time: DuckDB writes a table's new rows
# straight to the views file when one transaction appends a row group of them (122,880 rows);
# fewer go through the WAL, to be written again by a checkpoint (which DuckDB runs inside a
# commit once the WAL passes `checkpoint_threshold`: in the middle of a rebuild). Measured on
# 1M archived events: folded a segment (100k) at a time they left a 632 MB WAL, a checkpoint of
# ~4 s still to run; two at a time, 139 MB, the rest already in the file (1.8 s to close).
BULK_RECORDS = 122_880


def usable_segments(directory: Path, stream: str) -> tuple[list[Segment], str | None]:
    """The segments of `directory` in log order up to the first that breaks the chain, and what
    broke it (None: nothing). Raises ArchiveError when the directory cannot be listed."""
    segments: list[Segment] = []
    prev_chain, after = GENESIS, 0
    for path in segment_paths(directory):
        try:
            segment = read_meta(path)
        except ArchiveCorrupt as exc:
            return segments, str(exc)
        meta = segment.meta
        if meta.stream != stream or meta.after_seq != after or meta.prev_chain_sha256 != prev_chain:
            return segments, f"{path.name}: does not follow the segment before it (run `bus archive verify`)"
        segments.append(segment)
        prev_chain, after = meta.chain_sha256, meta.last_seq
    return segments, None


class ArchiveView:
    """Keeps the `archive_events` view in step with the segment files: `refresh()` lists the
    directory (names only) and redefines the view when the names changed. `define` runs the
    view's SQL on the store (on its writer thread)."""

    def __init__(self, directory: Path, stream: str, define: Callable[[str, str], Awaitable[None]]) -> None:
        self._directory = directory
        self._stream = stream
        self._define = define
        self._names: tuple[str, ...] | None = None
        self._lock = asyncio.Lock()
        self.segments: list[Segment] = []

    async def refresh(self) -> None:
        """Redefine the view if the segment files changed since the last time. Raises
        ArchiveError (the directory cannot be listed), duckdb.Error."""
        names = await asyncio.to_thread(self._listed)
        if names == self._names:
            return
        async with self._lock:
            names = await asyncio.to_thread(self._listed)
            if names == self._names:
                return
            segments, problem = await asyncio.to_thread(usable_segments, self._directory, self._stream)
            if problem is not None:
                log.warning("archive_events stops before a broken segment: %s", problem)
            await self._define(view.NAME, view.select_over([s.path for s in segments]))
            self.segments = segments
            self._names = names

    def _listed(self) -> tuple[str, ...]:
        try:
            if not self._directory.exists():
                return ()
            return tuple(sorted(p.name for p in self._directory.iterdir() if parse_name(p.name) is not None))
        except OSError as exc:
            raise ArchiveError(f"cannot list the archive {self._directory}: {exc}") from exc


def read_batch(segment: Segment, after_seq: int) -> Batch | None:
    """The records of `segment` after `after_seq` as a fold batch, read straight from the file
    (the columns decoded when it was sealed: nothing is decoded here). None when it holds none
    after `after_seq`. Raises ArchiveCorrupt when the file cannot be read or does not hold
    what its metadata says."""
    meta, name = segment.meta, segment.path.name
    try:
        table = pq.read_table(segment.path, columns=[*BATCH_COLUMNS, "stored_ns"], page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise ArchiveCorrupt(f"{name}: cannot be read ({str(exc).splitlines()[0] if str(exc) else exc!r})") from exc
    seqs = table.column("seq")
    if table.num_rows != meta.count or seqs[0].as_py() != meta.first_seq or seqs[-1].as_py() != meta.last_seq:
        raise ArchiveCorrupt(f"{name}: its records are not the {meta.count} of seq {meta.first_seq}..{meta.last_seq} "
                             "its metadata says")
    if after_seq >= meta.first_seq:
        table = table.filter(pc.greater(table.column("seq"), after_seq))
        if table.num_rows == 0:
            return None
    last_time_ns = table.column("stored_ns")[-1].as_py()
    try:
        return batch_of_table(table.drop_columns(["stored_ns"]), last_time_ns=last_time_ns)
    except (ValueError, pa.ArrowException) as exc:  # columns of other types than the fold's
        raise ArchiveCorrupt(f"{name}: its columns are not the fold's ({exc})") from exc


async def archived_batches(
    directory: Path, stream: str, after_seq: int, *, bulk_records: int = BULK_RECORDS
) -> AsyncIterator[Batch]:
    """(Use it under `contextlib.aclosing`.) The usable segments' records after `after_seq` as
    batches of at least `bulk_records` (whole segments; the last batch may hold fewer), in log
    order, the next segment read (in a thread) while the caller folds. Raises ArchiveCorrupt (a
    segment that cannot be read: what was read before it is yielded first), ArchiveError (the
    directory cannot be listed)."""
    segments, problem = await asyncio.to_thread(usable_segments, directory, stream)
    if problem is not None:
        log.warning("the archive is used up to a broken segment only: %s", problem)
    wanted = [s for s in segments if s.meta.last_seq > after_seq]
    if not wanted:
        return
    pending: list[Batch] = []
    reading = asyncio.ensure_future(asyncio.to_thread(read_batch, wanted[0], after_seq))
    try:
        for index in range(len(wanted)):
            try:
                batch = await reading
            except ArchiveCorrupt:
                if pending:
                    yield merge(pending)
                raise
            if index + 1 < len(wanted):
                reading = asyncio.ensure_future(asyncio.to_thread(read_batch, wanted[index + 1], after_seq))
            if batch is not None:
                pending.append(batch)
            if pending and (sum(b.size for b in pending) >= bulk_records or index + 1 == len(wanted)):
                batch, pending = merge(pending), []
                yield batch
    finally:
        if not reading.done():
            # The caller stopped early (or failed): the read in flight (a thread: it cannot be
            # stopped) is waited for, not left behind; its own failure gives way to the caller's.
            with contextlib.suppress(Exception):
                await reading
