"""The views file is written without an fsync per commit, and is trusted again only within the
boot that wrote it: a file left unsynced by another boot is set aside and refolded from the log."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest
from conftest import read_records, wait_for

from bus import Bus
from projections.batch import build_batch
from projections.store import Store
from projections.workload import append_batches, synthetic_log
from projections.writeback import WritebackPacer

STREAM = "CONTINUUM_DEFAULT"


def _fsync_mode(store: Store) -> str:
    return store.con.execute("SELECT current_setting('fsync_mode')").fetchone()[0]


async def _folded_file(bus: Bus, path: Path, boot_id: str) -> int:
    """A views file with a log folded into it and closed cleanly; returns its checkpoint."""
    last = await append_batches(bus, list(synthetic_log(bus, 200, seed=4)))
    store = Store(path, stream=STREAM, boot_id=boot_id)
    store.open()
    try:
        store.apply(build_batch(await read_records(bus, last)))
        return store.applied_seq
    finally:
        store.close()


async def test_an_open_file_is_marked_with_its_boot_and_a_clean_close_clears_the_mark(bus: Bus, tmp_path: Path) -> None:
    """While open, the file is written unsynced and `<file>.unsynced` names the boot; after a
    clean close the marker is gone. With `fsync=True` there is no marker and DuckDB syncs."""
    path = tmp_path / "views.duckdb"
    store = Store(path, stream=STREAM, boot_id="boot-a")
    store.open()
    try:
        assert (tmp_path / "views.duckdb.unsynced").read_text().strip() == "boot-a"
        assert _fsync_mode(store) == "NONE"
    finally:
        store.close()
    assert not (tmp_path / "views.duckdb.unsynced").exists()

    synced = Store(tmp_path / "synced.duckdb", stream=STREAM, fsync=True)
    synced.open()
    try:
        assert _fsync_mode(synced) == "STANDARD"
        assert not (tmp_path / "synced.duckdb.unsynced").exists()
    finally:
        synced.close()


async def test_a_file_left_unsynced_by_another_boot_is_set_aside(bus: Bus, tmp_path: Path) -> None:
    """A marker from another boot (the machine went down mid-write) makes the next open move the
    file aside and start empty, so the views are folded again from the log; the old file is kept
    for inspection."""
    path = tmp_path / "views.duckdb"
    applied = await _folded_file(bus, path, "boot-a")
    assert applied > 0
    (tmp_path / "views.duckdb.unsynced").write_text("boot-a\n")  # as a crash would leave it

    store = Store(path, stream=STREAM, boot_id="boot-b")
    store.open()
    try:
        assert store.applied_seq == 0
    finally:
        store.close()
    [aside] = tmp_path.glob("views.duckdb.unclean-*")
    with duckdb.connect(str(aside), read_only=True) as old:
        assert old.execute("SELECT max(applied_seq) FROM _continuum.generations").fetchone()[0] == applied


async def test_a_file_left_by_a_process_crash_in_this_boot_is_kept(bus: Bus, tmp_path: Path) -> None:
    """A marker from this same boot is a process crash: the kernel wrote everything out, so the
    file and its checkpoint are kept."""
    path = tmp_path / "views.duckdb"
    applied = await _folded_file(bus, path, "boot-a")
    (tmp_path / "views.duckdb.unsynced").write_text("boot-a\n")

    store = Store(path, stream=STREAM, boot_id="boot-a")
    store.open()
    try:
        assert store.applied_seq == applied
    finally:
        store.close()
    assert not list(tmp_path.glob("views.duckdb.unclean-*"))


def _settle(path: Path) -> None:
    """Date `path`'s modification a second back: as the pacer sees a file nobody wrote lately."""
    past = time.time_ns() - 1_000_000_000
    os.utime(path, ns=(past, past))


def test_the_pacer_syncs_what_changed_since_its_last_sync_and_skips_what_is_missing(tmp_path: Path) -> None:
    """`sync_changed` syncs a file once per change (size or time), not again while it is
    unchanged, and skips a path that does not exist (a WAL after a checkpoint)."""
    written = tmp_path / "views.duckdb"
    written.write_bytes(b"x" * 4096)
    _settle(written)
    pacer = WritebackPacer(written, others=(tmp_path / "views.duckdb.wal",), interval_s=60)
    pacer.start()
    assert pacer.sync_changed() == 1
    assert pacer.sync_changed() == 0
    with open(written, "ab") as out:
        out.write(b"y" * 4096)
    _settle(written)
    assert pacer.sync_changed() == 1
    (tmp_path / "views.duckdb.wal").write_bytes(b"w")
    _settle(tmp_path / "views.duckdb.wal")
    assert pacer.sync_changed() == 1
    assert pacer.sync_changed() == 0
    assert pacer.syncs == 3
    pacer.close()
    with pytest.raises(ValueError):
        WritebackPacer(written, interval_s=0)


def test_a_file_written_just_now_is_synced_again_though_its_size_and_time_look_the_same(tmp_path: Path) -> None:
    """A write in the same tick of the kernel's coarse clock as the pacer's last look, in place
    (same size), leaves the file's (size, time) as they were: the pacer syncs a file modified
    that recently again at its next look, so such a write is not left to the kernel's bulk
    writeback. (The same tick is made certain here by putting the time back.)"""
    written = tmp_path / "views.duckdb"
    written.write_bytes(b"x" * 4096)
    pacer = WritebackPacer(written, interval_s=60)
    pacer.start()
    try:
        before = os.stat(written).st_mtime_ns
        assert pacer.sync_changed() == 1
        with open(written, "r+b") as out:
            out.write(b"z" * 4096)
        os.utime(written, ns=(before, before))
        assert pacer.sync_changed() == 1
        _settle(written)
        assert pacer.sync_changed() == 1  # its time changed (settled now)
        assert pacer.sync_changed() == 0
    finally:
        pacer.close()


async def test_an_unsynced_store_writes_its_folds_back_while_open_and_stops_at_close(bus: Bus, tmp_path: Path) -> None:
    """An open unsynced store syncs its file in the background after a fold (not waiting for the
    kernel's bulk writeback, which stalls the server's fsyncs); the thread ends at close. A store
    that fsyncs every commit has no pacer."""
    last = await append_batches(bus, list(synthetic_log(bus, 300, seed=5)))
    store = Store(tmp_path / "views.duckdb", stream=STREAM, boot_id="boot-a", writeback_interval_s=0.05)
    # This store's thread, by identity: a pacer another test left closing may share its name.
    others = {t for t in threading.enumerate() if t.name == "continuum-writeback"}
    store.open()
    try:
        pacer = store.writeback
        assert pacer is not None
        await wait_for(lambda: pacer.syncs >= 1, timeout_s=10, what="the opened file synced")
        before = pacer.syncs
        store.apply(build_batch(await read_records(bus, last)))
        await wait_for(lambda: pacer.syncs > before, timeout_s=10, what="the fold written back")
        ours = {t for t in threading.enumerate() if t.name == "continuum-writeback"} - others
        assert len(ours) == 1
    finally:
        store.close()
    assert store.writeback is None
    assert not any(t.is_alive() for t in ours)

    synced = Store(tmp_path / "synced.duckdb", stream=STREAM, fsync=True)
    synced.open()
    try:
        assert synced.writeback is None
    finally:
        synced.close()


_OPEN_ELSEWHERE = (
    "import sys; from projections.store import Store, StoreLocked\n"
    "store = Store(sys.argv[1], stream=sys.argv[2], boot_id='boot-a')\n"
    "try:\n    store.open()\nexcept StoreLocked:\n    print('locked')\nelse:\n    print('opened'); store.close()\n"
)


async def _open_elsewhere(path: Path) -> str:
    """What another process gets opening the views file at `path`: "locked" or "opened" (its
    output; its errors fail the test). Awaited, not run on the loop: the bus stays served."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OPEN_ELSEWHERE, str(path), STREAM,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=120)
    assert child.returncode == 0, err.decode()
    return out.decode().strip()


async def test_while_the_pacer_writes_back_another_process_still_cannot_open_the_file(bus: Bus, tmp_path: Path) -> None:
    """DuckDB locks the views file with a POSIX lock, which any close of a descriptor of the
    file in the process would drop: after the pacer has synced the file many times, a second
    process opening it is still refused (StoreLocked), and can open it once the store closed."""
    path = tmp_path / "views.duckdb"
    last = await append_batches(bus, list(synthetic_log(bus, 200, seed=6)))
    store = Store(path, stream=STREAM, boot_id="boot-a", writeback_interval_s=0.02)
    store.open()
    try:
        pacer = store.writeback
        assert pacer is not None
        records = await read_records(bus, last)
        synced = pacer.syncs  # (before the fold: the pacer may sync it while it commits)
        store.apply(build_batch(records))
        await wait_for(lambda: pacer.syncs >= synced + 1, timeout_s=10, what="the fold written back")
        assert await _open_elsewhere(path) == "locked"
    finally:
        store.close()
    assert await _open_elsewhere(path) == "opened"
