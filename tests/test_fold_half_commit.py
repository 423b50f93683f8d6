"""A commit DuckDB fails half-way (out of memory during COMMIT) can keep a lane's checkpoint
without the views' rows (or the rows without the checkpoint): the views it touched are not
trusted from then on, and are rebuilt from sequence 1 while the others serve, whether the file
is opened again by the running service or by the next process (projections.fold HalfCommitted,
Store.note_half_commit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus import Bus
from conftest import wait_for
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from projections.status import format_report
from projections.store import Store
from projections.workload import append_batches, synthetic_log
from test_fold_memory import reference_hashes, settled

STREAM = "CONTINUUM_DEFAULT"
FIRST, MORE = 300, 50
WHY = "a commit of seq 301..325 failed half-way"


def _half_commit(store: Store, views: list[str], checkpoint: int) -> None:
    """What DuckDB left in the measured failure: the lane's checkpoint moved to `checkpoint` in
    `_continuum.generations` without the views' rows (autocommit, on a connection of its own:
    no lane is folding, the log is caught up); then the note the lane makes (Store._fold_shares)."""
    with store.cursor() as con:
        con.execute(
            "UPDATE _continuum.generations SET applied_seq = ? WHERE state = 'active' AND list_contains(?, view)",
            [checkpoint, views],
        ).fetchall()
    store.note_half_commit(views, WHY)


async def _complete(bus: Bus, service: ProjectionService, tmp_path: Path, last: int) -> None:
    """Every view settles at `last`, holds each event once, and equals an undisturbed fold."""
    assert service.store is not None
    await wait_for(lambda: settled(service, last), timeout_s=60, interval_s=0.05, what="the views rebuilt and caught up")
    rows = service.store.cursor().execute("SELECT count(*), count(DISTINCT seq), max(seq) FROM events").fetchall()
    assert rows == [(last, last, last)]
    assert not Path(f"{service.store.path}.untrusted").exists()
    with service.store.cursor() as con:
        assert con.execute("SELECT count(*) FROM _continuum.untrusted_views").fetchall() == [(0,)]
    assert await service.content_hashes() == await reference_hashes(bus, tmp_path / "reference.duckdb", last)


@pytest.mark.timeout(180)
async def test_a_half_way_commit_seen_by_the_running_service_rebuilds_the_views_it_touched(
    bus: Bus, tmp_path: Path
) -> None:
    """The service notes a half-way commit, opens the file again (as after HalfCommitted) and
    finds the `log` lane's checkpoint 25 events ahead of its rows: it does not fold from there
    (those events would be missing) but rebuilds exactly that lane's views from seq 1, shows
    them as not trusted meanwhile, and ends with every view complete and trusted."""
    first = await append_batches(bus, list(synthetic_log(bus, FIRST, seed=5)))
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), batch_max=25, read_ahead=25)
    async with ProjectionService(bus, settings) as service:
        store, runner = service.store, service.runner
        assert store is not None and runner is not None
        assert await service.watermark.wait_for(first, 60)
        lane = next(i for i in range(store.lane_count) if "events" in store.lane_views(i))
        views = store.live_views(lane)
        _half_commit(store, views, first + 25)

        await runner.reopen(store.incarnation)
        # (No await since: the rebuild the reopen asked for has not swapped yet.)
        assert store.untrusted == dict.fromkeys(views, WHY)
        assert sorted(store.frozen) == sorted(views)
        report = await service.status()
        assert report.untrusted == dict.fromkeys(views, WHY)
        assert any(line.startswith(f"NOT TRUSTED: {', '.join(sorted(views))} (") for line in format_report(report))

        last = await append_batches(bus, list(synthetic_log(bus, MORE, seed=6, first_seq=first + 1)))
        await _complete(bus, service, tmp_path, last)
        assert sorted(g.view for g in store.active.values() if g.generation > 1) == sorted(views)


@pytest.mark.timeout(180)
async def test_a_half_way_commit_before_a_crash_is_rebuilt_by_the_next_process(bus: Bus, tmp_path: Path) -> None:
    """A process notes a half-way commit and ends before it could open the file again (the note
    is only beside the file, in `<views>.untrusted`): the next service start distrusts the same
    views, rebuilds them from seq 1, and ends complete; the note is gone once the file has it."""
    path = tmp_path / "views.duckdb"
    first = await append_batches(bus, list(synthetic_log(bus, FIRST, seed=5)))
    settings = ProjectionSettings(db_path=str(path), batch_max=25, read_ahead=25)
    async with ProjectionService(bus, settings) as service:
        assert await service.watermark.wait_for(first, 60)
        assert service.store is not None
        lane = next(i for i in range(service.store.lane_count) if "events" in service.store.lane_views(i))
        views = service.store.live_views(lane)
        _half_commit(service.store, views, first + 25)
    assert Path(f"{path}.untrusted").exists()
    last = await append_batches(bus, list(synthetic_log(bus, MORE, seed=6, first_seq=first + 1)))

    async with ProjectionService(bus, settings) as service:
        await _complete(bus, service, tmp_path, last)
        assert service.store is not None
        assert sorted(g.view for g in service.store.active.values() if g.generation > 1) == sorted(views)
