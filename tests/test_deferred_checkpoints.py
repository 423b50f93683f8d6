"""Deferred checkpoints: a lane whose views have no statement for a batch opens no transaction;
its checkpoint moves in memory and reaches the file with the lane's next commit, after
`SAVE_EVERY_S`, or at close. A crash in between loses nothing: the lane folds those records
again, which again writes nothing, and the views equal those of a run never interrupted."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from bus import Bus
from bus.log_reader import LogReader, LogRecord
from projections import fold
from projections.batch import build_batch
from projections.store import Store, file_checkpoints, file_hashes
from schemas.payloads import Note
from schemas.payloads.memory import Citation, FactRecorded

STREAM = "CONTINUUM_DEFAULT"


async def _log(bus: Bus) -> list[LogRecord]:
    """Ten notes, a fact, ten notes: the memory lane has work in the middle batch only."""
    last = 0
    for i in range(10):
        last = (await bus.record("reader", Note(text=f"before {i}"))).ack.seq
    fact = FactRecorded(fact_id="f1", subject="s", statement="x", source=Citation(ref="p"), confidence=0.5, recorded_by="reader")
    last = (await bus.record("reader", fact)).ack.seq
    for i in range(10):
        last = (await bus.record("reader", Note(text=f"after {i}"))).ack.seq
    records: list[LogRecord] = []
    async with LogReader(bus, start_seq=1) as reader:
        while not records or records[-1].seq < last:
            records += await reader.read(1000)
    return records


def _fold_in(store: Store, records: list[LogRecord], cuts: list[int]) -> None:
    at = 0
    for cut in [*cuts, len(records)]:
        batch = build_batch(records[at:cut], after_seq=records[at - 1].seq if at else 0)
        for lane in range(store.lane_count):
            store.fold_lane(lane, batch)
        at = cut


def _fold_then_crash(path: str, records: list[LogRecord], cuts: list[int]) -> None:
    fold.SAVE_EVERY_S = 3600.0  # however slow this machine, nothing is due before the crash
    store = Store(path, stream=STREAM, lanes=3)
    store.open()
    _fold_in(store, records, cuts)
    os._exit(0)  # no close: deferred checkpoints are lost, as in a crash


async def test_a_lane_with_nothing_to_write_opens_no_transaction_and_saves_at_close(bus: Bus, tmp_path: Path) -> None:
    """Notes give the memory lane nothing to write: in memory its views move on, in the file
    they stay where they were until the lane's next commit (the fact), then move again only in
    memory; close writes the deferred checkpoints."""
    records = await _log(bus)
    path = tmp_path / "views.duckdb"
    store = Store(path, stream=STREAM, lanes=3)
    store.open()
    memory = store.lane_views(2)
    assert "facts" in memory

    def on_file(view: str) -> int:
        return store.cursor().execute(
            "SELECT applied_seq FROM _continuum.generations WHERE view = ? AND state = 'active'", [view]
        ).fetchall()[0][0]

    try:
        _fold_in(store, records[:10], [])
        assert store.active["facts"].applied_seq == records[9].seq
        assert on_file("facts") == 0
        assert on_file("events") == records[9].seq  # the log lane wrote, and committed its checkpoint

        _fold_in(store, records[:11], [10])  # the fact: the memory lane commits, checkpoint included
        assert on_file("facts") == records[10].seq

        _fold_in(store, records[:21], [11])
        assert store.active["facts"].applied_seq == records[20].seq
        assert on_file("facts") == records[10].seq
    finally:
        store.close()
    assert all(seq == records[20].seq for view, seq in file_checkpoints(path).items() if view in memory)


async def test_deferred_checkpoints_are_written_when_due(bus: Bus, tmp_path: Path, monkeypatch) -> None:
    """With nothing to write for a long stretch, the checkpoint still reaches the file once
    `SAVE_EVERY_EVENTS` records have gone by (so a restart does not refold the whole stretch)."""
    records = await _log(bus)
    monkeypatch.setattr(fold, "SAVE_EVERY_EVENTS", 4)
    path = tmp_path / "views.duckdb"
    store = Store(path, stream=STREAM, lanes=3)
    store.open()
    try:
        _fold_in(store, records[:10], [2, 4, 6, 8])
        on_file = store.cursor().execute(
            "SELECT applied_seq FROM _continuum.generations WHERE view = 'facts' AND state = 'active'"
        ).fetchall()[0][0]
        # Deferred after records 0-1, due with 2-3; deferred after 4-5, due with 6-7.
        assert on_file == records[7].seq
    finally:
        store.close()


async def test_a_crash_with_deferred_checkpoints_refolds_to_the_same_views(bus: Bus, tmp_path: Path) -> None:
    """A process folds the log in small batches and dies without closing: the memory lane's
    checkpoint in the file is behind what it had folded. Opening the file again and folding the
    log from each view's checkpoint gives views identical to an uninterrupted run."""
    records = await _log(bus)
    cuts = [3, 6, 10, 11, 15, 18]
    crashed = tmp_path / "crashed.duckdb"
    child = multiprocessing.get_context("spawn").Process(target=_fold_then_crash, args=(str(crashed), records, cuts))
    child.start()
    child.join(60)
    assert child.exitcode == 0

    behind = file_checkpoints(crashed)
    assert behind["facts"] == records[10].seq and behind["events"] == records[-1].seq

    store = Store(crashed, stream=STREAM, lanes=3)
    store.open()
    try:
        _fold_in(store, records, [5, 12])
    finally:
        store.close()

    clean = tmp_path / "clean.duckdb"
    store = Store(clean, stream=STREAM, lanes=3)
    store.open()
    try:
        _fold_in(store, records, cuts)
    finally:
        store.close()
    assert file_hashes(crashed) == file_hashes(clean)
    assert set(file_checkpoints(crashed).values()) == {records[-1].seq}
