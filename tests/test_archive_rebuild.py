"""Fast rebuild: `bus projections rebuild` folds the archived ranges straight from their Parquet
files (no log read, no decode), then the live tail from the log; the rebuilt views equal a
rebuild from the log alone, table by table (content hash).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bus import Bus
from bus.errors import QueryError
from projections.archive.archiver import run_archive
from projections.archive.config import ArchiveSettings
from projections.archive.reader import archived_batches
from projections.batch import Batch
from projections.config import ProjectionSettings
from projections.errors import ArchiveCorrupt
from projections.service import ProjectionService
from projections.workload import LogItem, append_batches, synthetic_log
from schemas.ids import new_id
from schemas.payloads import Note

from conftest import wait_for
from test_memory_views import _record_memory_workload


async def mixed_log(bus: Bus) -> int:
    """Every view's kinds: conversations, broadcasts, fenced events, reports, dead letters,
    expiries, memory (blocks, turns, facts), and records that are not envelopes at all."""
    items = list(synthetic_log(bus, 5_000, seed=3))
    items.insert(1_234, LogItem(bus.subjects.inbox("planner", "mallory"), b"not an envelope", new_id()))
    items.insert(3_210, LogItem(bus.subjects.event("scout", "note"), b'{"id": 7}', new_id()))
    await append_batches(bus, items)
    return await _record_memory_workload(bus, seed=7)


async def caught_up(bus: Bus, seq: int) -> None:
    """Until the service's views have applied `seq` (a `min_seq` query waits 5 s at most; on a
    busy machine the first fold of the log can take longer)."""
    async def applied() -> bool:
        try:
            await bus.query("SELECT 1", min_seq=seq, timeout_s=10)
        except QueryError as exc:
            if exc.kind != "lag":
                raise
            return False
        return True

    await wait_for(applied, timeout_s=120, what=f"the views to apply seq {seq}")


async def rebuilt_hashes(bus: Bus, settings: ProjectionSettings, last: int) -> tuple[dict[str, str], int, int]:
    async with ProjectionService(bus, settings) as service:
        await caught_up(bus, last)
        report = await service.rebuild(wait=True)
        assert report.applied_seq >= last
        return await service.content_hashes(), report.events, report.archived


async def test_a_rebuild_from_the_archive_equals_one_from_the_log(bus: Bus, tmp_path: Path) -> None:
    """Archived segments plus a live tail, folded by a rebuild, give every view's tables exactly
    as a rebuild from the log alone; the archive's share is folded from its files."""
    await mixed_log(bus)
    archive = ArchiveSettings(directory=tmp_path / "archive" / "default", segment_records=1_500)
    run = await run_archive(bus, archive)
    assert len(run.sealed) >= 3
    archived_upto = run.last_seq
    last = (await bus.send("keeper", Note(text="the tail"))).ack.seq  # after the archive: read from the log
    assert last > archived_upto

    from_log, log_events, none = await rebuilt_hashes(bus, ProjectionSettings(db_path=str(tmp_path / "log.duckdb")), last)
    from_archive, events, archived = await rebuilt_hashes(
        bus, ProjectionSettings(db_path=str(tmp_path / "archive.duckdb"), archive_dir=str(archive.directory)), last,
    )
    assert none == 0 and archived == archived_upto and events == log_events
    assert from_archive == from_log
    rows = {table: int(value.split(":")[0]) for table, value in from_archive.items()}
    assert rows["events.events"] == log_events
    assert all(rows[t] > 0 for t in ("messages.messages", "facts.facts", "dead_letters.dead_letters", "agents.agents"))


async def test_a_rebuild_past_a_damaged_segment_reads_the_log_from_there(bus: Bus, tmp_path: Path) -> None:
    """A segment that cannot be read ends the archive's share: the rebuild reads the log from the
    last segment it folded, and the views still equal a rebuild from the log."""
    await mixed_log(bus)
    archive = ArchiveSettings(directory=tmp_path / "archive" / "default", segment_records=2_000)
    run = await run_archive(bus, archive)
    second = archive.directory / run.sealed[1][0].name
    second.write_bytes(second.read_bytes()[:-200])  # its footer gone
    last = await bus.last_seq()
    from_log, _, _ = await rebuilt_hashes(bus, ProjectionSettings(db_path=str(tmp_path / "log.duckdb")), last)
    from_archive, _, archived = await rebuilt_hashes(
        bus, ProjectionSettings(db_path=str(tmp_path / "archive.duckdb"), archive_dir=str(archive.directory)), last,
    )
    assert archived == run.sealed[0][0].count
    assert from_archive == from_log


async def test_the_archive_is_folded_whole_segments_at_a_time_a_bulk_at_least(bus: Bus, tmp_path: Path) -> None:
    """Segments are read into batches of at least `bulk_records` (so DuckDB writes the big
    tables straight to the file, not through its WAL), whole segments each, in log order, from
    the first record after the checkpoint; a segment that cannot be read ends the batches, the
    records read before it are still handed out first."""
    await append_batches(bus, list(synthetic_log(bus, 1_000, seed=4)))
    archive = ArchiveSettings(directory=tmp_path / "archive" / "default", segment_records=150, seal_partial=True)
    run = await run_archive(bus, archive)
    last = run.last_seq  # (the run records its own events after the log it sealed)
    assert [meta.count for meta, _ in run.sealed] == [150] * 6 + [last - 900]
    stream = bus.subjects.stream

    async def batches(after: int) -> list[Batch]:
        async with contextlib.aclosing(archived_batches(archive.directory, stream, after, bulk_records=400)) as read:
            return [batch async for batch in read]

    whole = await batches(0)
    assert [b.size for b in whole] == [450, 450, last - 900]
    assert [seq for b in whole for seq in b.seqs] == list(range(1, last + 1))
    assert [b.size for b in await batches(200)] == [400, last - 600]  # 201..600: the rest of one, two more

    fifth = archive.directory / run.sealed[4][0].name
    # Zeros in the middle of its `payload` column's pages, which the fold reads (the footer, at
    # the end, holds: the segment is listed, its records cannot be read).
    group = pq.read_metadata(fifth).row_group(0)
    payload = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "payload")
    at = payload.data_page_offset + payload.total_compressed_size // 2
    data = bytearray(fifth.read_bytes())
    data[at:at + 16] = bytes(16)
    fifth.write_bytes(bytes(data))
    read: list[Batch] = []
    with pytest.raises(ArchiveCorrupt):
        async with contextlib.aclosing(archived_batches(archive.directory, stream, 0, bulk_records=400)) as batches_read:
            async for batch in batches_read:
                read.append(batch)
    assert [(b.first_seq, b.last_seq) for b in read] == [(1, 450), (451, 600)]
