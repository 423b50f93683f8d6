"""`archive_events`: the archive answers `bus query` through a view the service defines over the
segment files, while the query's own SQL still reads no file (statement check and sandbox).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from bus import Bus
from bus.errors import QueryError
from bus.identity import CredentialRegistry
from projections.archive.archiver import run_archive
from projections.archive.config import ArchiveSettings
from projections.config import ProjectionSettings
from projections.service import ProjectionService

from conftest import read_records
from test_archive import publish_notes
from test_archive_rebuild import caught_up


def archive_settings(tmp_path: Path, **overrides: object) -> ArchiveSettings:
    return ArchiveSettings(directory=tmp_path / "archive" / "default", segment_records=1_000, **overrides)  # type: ignore[arg-type]


async def test_archived_records_are_queryable_by_id_with_their_exact_bytes(bus: Bus, tmp_path: Path) -> None:
    """A point lookup by id finds the archived record with its exact bytes and decoded columns;
    segments sealed while the service runs are seen by the next query naming the view."""
    await publish_notes(bus, 2_000)
    archive = archive_settings(tmp_path)
    await run_archive(bus, archive)
    records = [r for r in await read_records(bus, 2_000) if r.seq <= 2_000]
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), archive_dir=str(archive.directory))
    async with ProjectionService(bus, settings):
        counted = await bus.query("SELECT count(*), min(seq), max(seq) FROM archive_events")
        assert counted.rows == [[2_000, 1, 2_000]]
        target = records[1_234]
        await caught_up(bus, target.seq)
        wanted = await bus.query("SELECT id FROM events WHERE seq = ?", params=[target.seq])
        found = await bus.query(
            "SELECT seq, kind, payload->>'text', data, stored_ns, segment FROM archive_events WHERE id = ?",
            params=[wanted.rows[0][0]],
        )
        assert len(found.rows) == 1
        seq, kind, text, data, stored_ns, segment = found.rows[0]
        assert (seq, kind, stored_ns) == (target.seq, "note", target.time_ns)
        assert text == "note 1234"
        assert base64.b64decode(data) == target.data
        assert segment == "seg-00000000000000001001-00000000000000002000.parquet"

        await publish_notes(bus, 1_000, start=2_000)
        await run_archive(bus, archive)
        grown = await bus.query("SELECT count(*), max(seq) FROM archive_events")
        assert grown.rows == [[3_000, 3_000]]


async def test_an_empty_archive_is_an_empty_view(bus: Bus, tmp_path: Path) -> None:
    """Before anything is archived the view exists, with its columns, and has no rows."""
    await publish_notes(bus, 10)
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), archive_dir=str(tmp_path / "archive" / "none"))
    async with ProjectionService(bus, settings):
        result = await bus.query("SELECT count(*) FROM archive_events")
        assert result.rows == [[0]]
        columns = await bus.query("SELECT * FROM archive_events")
        assert "data" in columns.columns and "segment" in columns.columns and "payload" in columns.columns


async def test_queries_still_read_no_file_of_their_own(bus: Bus, tmp_path: Path, identity: CredentialRegistry) -> None:
    """The archive's files are readable only through the service's view: a query naming a
    segment file, or reading it with a table function, is refused; so is an agent's query."""
    await publish_notes(bus, 1_000)
    archive = archive_settings(tmp_path)
    run = await run_archive(bus, archive)
    path = archive.directory / run.sealed[0][0].name
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), archive_dir=str(archive.directory))
    async with ProjectionService(bus, settings):
        assert (await bus.query("SELECT count(*) FROM archive_events")).rows == [[1_000]]
        for sql in (
            f"SELECT count(*) FROM read_parquet('{path}')",
            f"SELECT count(*) FROM '{path}'",
            f"SELECT count(*) FROM parquet_scan('{path}')",
            f"SELECT * FROM glob('{archive.directory}/*')",
        ):
            with pytest.raises(QueryError) as info:
                await bus.query(sql)
            assert info.value.kind == "not_allowed", sql
        with pytest.raises(QueryError) as info:
            await bus.query("SELECT count(*) FROM archive_events", scope="keeper")
        assert info.value.kind == "not_allowed"
