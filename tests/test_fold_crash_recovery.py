"""No record takes the projection service down: what a view's fold raises on a record makes it an
error row, what the environment fails is retried, and a record that kills the process is
recognised after a restart and never folded with its content again (projections.crashes).

The hard crashes are real: child processes whose test-only view calls `os.abort()` (SIGABRT, as a
C library's assertion would) on a marked record, run by the public Python API (a ViewSpec added
to the views of a `ProjectionService` or `Store`)."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import msgspec
import pytest
from conftest import read_records, wait_for

from bus import Bus, BusConfig, BusUnavailable, QueryError
from bus.log_reader import LogRecord
from projections import fold
from projections.batch import build_batch
from projections.config import ProjectionSettings
from projections.crashes import CHUNK
from projections.fold import Cause, cause_of, retry_delay
from projections.inflight import SLOT_BYTES, Header, InFlight, current_oom_kills, how_it_died
from projections.rebuild import request_rebuild
from projections.runner import decode
from projections.service import ProjectionService
from projections.status import format_report, request_status
from projections.store import Store, file_checkpoints, file_hashes, open_read_only
from projections.unsynced import current_boot_id
from projections.views import VIEWS, Tx, ViewSpec, render
from schemas.payloads import Note

if TYPE_CHECKING:
    from projections.batch import Batch

STREAM = "CONTINUUM_DEFAULT"
CRASH = "crash!"
_spawn = multiprocessing.get_context("spawn")


# -- test-only views -----------------------------------------------------------------------


def _crashing_fold(tx: Tx, s: str, batch: Batch) -> int:
    """Notes into `seen`; the process dies (SIGABRT) on a batch holding the note "crash!"."""
    if tx.rows("SELECT count(*) FROM batch WHERE error IS NULL AND payload->>'text' = ?", [CRASH])[0][0]:
        os.abort()
    return tx.run(render("INSERT INTO {s}.seen SELECT seq, payload->>'text' FROM batch "
                         "WHERE error IS NULL AND kind = 'note'", s))


# In the `log` lane, with `events`: the record's `events` row waits for the same commit.
CRASHING = ViewSpec(
    name="crashing", version=1, tables="CREATE TABLE {s}.seen (seq BIGINT, text VARCHAR)",
    relations={"seen": "SELECT * FROM {s}.seen"}, fold=_crashing_fold, lane="log",
)


def _dooming_fold(tx: Tx, s: str, batch: Batch) -> int:
    """Notes into `doomed`; the process dies on a batch holding a message to agent `doom`, even
    one emptied of its content (the subject stays)."""
    if tx.rows("SELECT count(*) FROM batch WHERE subject LIKE '%.inbox.doom.%'")[0][0]:
        os.abort()
    return tx.run(render("INSERT INTO {s}.doomed SELECT seq, payload->>'text' FROM batch "
                         "WHERE error IS NULL AND kind = 'note'", s))


DOOMING = ViewSpec(
    name="dooming", version=1, tables="CREATE TABLE {s}.doomed (seq BIGINT, text VARCHAR)",
    relations={"doomed": "SELECT * FROM {s}.doomed"}, fold=_dooming_fold, lane="log",
)
CHILD_VIEWS = {"crashing": CRASHING, "dooming": DOOMING}


def _holding_fold(tx: Tx, s: str, batch: Batch) -> int:
    """Notes into `held`; with HOLD_READY set, a batch holding the note "hold" makes it create that
    file and hang, so that the test can kill the process in the middle of the fold."""
    ready = os.environ.get("HOLD_READY")
    if ready and tx.rows("SELECT count(*) FROM batch WHERE payload->>'text' = 'hold'")[0][0]:
        Path(ready).touch()
        time.sleep(600)
    return tx.run(render("INSERT INTO {s}.held SELECT seq, payload->>'text' FROM batch "
                         "WHERE error IS NULL AND kind = 'note'", s))


HOLDING = ViewSpec(
    name="holding", version=1, tables="CREATE TABLE {s}.held (seq BIGINT, text VARCHAR)",
    relations={"held": "SELECT * FROM {s}.held"}, fold=_holding_fold, lane="runtime",
)


class FragileView:
    """Notes into `notes`. Its Python trips over odd notes, as a view's bug would: "recurse"
    raises RecursionError, "keyless" KeyError; and it fails on any batch holding a message to
    agent `stubborn`, whatever the record holds (its subject survives the emptying)."""

    def fold(self, tx: Tx, s: str, batch: Batch) -> int:
        texts = {row[0] for row in tx.rows("SELECT payload->>'text' FROM batch WHERE error IS NULL AND kind = 'note'")}
        if "recurse" in texts:
            raise RecursionError("maximum recursion depth exceeded while walking the note")
        if "keyless" in texts:
            return {"present": 1}["absent"]
        if tx.rows("SELECT count(*) FROM batch WHERE subject LIKE '%.inbox.stubborn.%'")[0][0]:
            raise ValueError("a message to stubborn")
        return tx.run(render("INSERT INTO {s}.notes SELECT seq, payload->>'text' FROM batch "
                             "WHERE error IS NULL AND kind = 'note'", s))

    def spec(self) -> ViewSpec:
        return ViewSpec(
            name="fragile", version=1, tables="CREATE TABLE {s}.notes (seq BIGINT, text VARCHAR)",
            relations={"fragile_notes": "SELECT * FROM {s}.notes"}, fold=self.fold, lane="runtime",
        )


class SqueezedView:
    """Notes into `squeezed`; while `squeezing` is set, a batch holding the note "squeeze" makes
    it raise DuckDB's OutOfMemoryException, as a fold does when memory_limit is reached."""

    def __init__(self) -> None:
        self.squeezing = threading.Event()
        self.squeezing.set()
        self.refused: list[int] = []  # sizes of the batches refused

    def fold(self, tx: Tx, s: str, batch: Batch) -> int:
        if self.squeezing.is_set() and tx.rows("SELECT count(*) FROM batch WHERE payload->>'text' = 'squeeze'")[0][0]:
            self.refused.append(batch.size)
            raise duckdb.OutOfMemoryException("Out of Memory Error: failed to allocate data of size 64.0 MiB")
        return tx.run(render("INSERT INTO {s}.squeezed SELECT seq, payload->>'text' FROM batch "
                             "WHERE error IS NULL AND kind = 'note'", s))

    def spec(self) -> ViewSpec:
        return ViewSpec(
            name="squeezed", version=1, tables="CREATE TABLE {s}.squeezed (seq BIGINT, text VARCHAR)",
            relations={"squeezed": "SELECT * FROM {s}.squeezed"}, fold=self.fold, lane="memory",
        )


# -- helpers --------------------------------------------------------------------------------


async def rows(bus: Bus, sql: str, *params: Any, min_seq: int | None = None) -> list[dict[str, Any]]:
    return (await bus.query(sql, list(params), min_seq=min_seq, timeout_s=30)).records()


async def answering(bus: Bus) -> bool:
    try:
        await bus.query("SELECT 1", timeout_s=2)
    except (BusUnavailable, QueryError):
        return False
    return True


async def notes(bus: Bus, *texts: str) -> list[int]:
    return [(await bus.send("alice", Note(text=text))).ack.seq for text in texts]


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _log_to(path: str) -> None:
    logging.basicConfig(filename=path, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def _exit_code(child: Any, timeout_s: float) -> int | None:
    await asyncio.to_thread(child.join, timeout_s)
    return child.exitcode


@contextmanager
def _reaped(child: Any) -> Iterator[Any]:
    try:
        yield child
    finally:
        if child.exitcode is None:
            child.kill()
            child.join(10)


# -- the classification --------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "cause"), [
    (duckdb.ConversionException("Conversion Error: Could not convert string 'one' to INT32"), Cause.RECORDS),
    (duckdb.BinderException("Binder Error: column not found"), Cause.RECORDS),
    (duckdb.InternalException("INTERNAL Error: assertion failed"), Cause.RECORDS),
    (duckdb.TypeMismatchException("Type mismatch"), Cause.RECORDS),
    (RecursionError("maximum recursion depth exceeded"), Cause.RECORDS),
    (MemoryError(), Cause.RECORDS),
    (KeyError("kind"), Cause.RECORDS),
    (duckdb.OutOfMemoryException("Out of Memory Error: could not allocate"), Cause.ENVIRONMENT),
    (duckdb.IOException("IO Error: No space left on device"), Cause.ENVIRONMENT),
    (duckdb.InterruptException("INTERRUPT Error: Interrupted!"), Cause.ENVIRONMENT),
    (duckdb.TransactionException("TransactionContext Error: Conflict"), Cause.ENVIRONMENT),
    (OSError(28, "No space left on device"), Cause.ENVIRONMENT),
    (duckdb.FatalException("FATAL Error: database has been invalidated"), Cause.DATABASE),
    (duckdb.ConnectionException("Connection Error: Connection already closed"), Cause.DATABASE),
])
def test_a_fold_failure_is_blamed_on_the_records_the_environment_or_the_database(exc: BaseException, cause: Cause) -> None:
    """What a fold raises decides what happens: the records' fault (folded as errors), the
    environment's (retried, never poisoned), or a database DuckDB gave up on (the process
    restarts)."""
    assert cause_of(exc) is cause


def test_retries_back_off_to_a_ceiling_and_never_give_up() -> None:
    """Retry delays double from 0.2 s and stay at 30 s, however many attempts."""
    assert [retry_delay(n) for n in range(1, 10)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0]
    assert retry_delay(10_000) == 30.0


# -- (a) exceptions that are not DuckDB data errors ----------------------------------------


async def test_a_view_raising_any_exception_on_a_record_gets_it_as_an_error_and_the_service_goes_on(
    bus: Bus, tmp_path: Path
) -> None:
    """A view whose Python raises RecursionError or KeyError on a record, or that fails on a
    record whatever it holds, never stops the service: the record is isolated from its batch,
    logged in `_continuum.fold_errors` with what was raised (the last one: left out of that view),
    counted, shown by status; every other view and record is folded, and so is what comes after."""
    view = FragileView()
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    async with ProjectionService(bus, settings, views=(*VIEWS, view.spec())) as service:
        before = await notes(bus, "one", "two")
        recurse, keyless = await notes(bus, "recurse", "keyless")
        stubborn = (await bus.send("stubborn", Note(text="to stubborn"))).ack.seq
        after = await notes(bus, "three")

        folded = await rows(bus, "SELECT seq, text FROM fragile_notes ORDER BY seq", min_seq=after[-1])
        errors = {r["seq"]: r for r in await rows(bus, "SELECT * FROM _continuum.fold_errors")}
        events = await rows(bus, "SELECT seq, error FROM events ORDER BY seq")
        status = await service.status()
        later = await notes(bus, "four")
        folded_later = await rows(bus, "SELECT text FROM fragile_notes WHERE seq = ?", later[0], min_seq=later[0])

    assert [(r["seq"], r["text"]) for r in folded] == [(before[0], "one"), (before[1], "two"), (after[0], "three")]
    assert sorted(errors) == [recurse, keyless, stubborn] and {r["view"] for r in errors.values()} == {"fragile"}
    assert "RecursionError: maximum recursion depth exceeded" in errors[recurse]["error"]
    assert "KeyError: 'absent'" in errors[keyless]["error"]
    assert "ValueError: a message to stubborn" in errors[stubborn]["error"] and "left out" in errors[stubborn]["error"]
    assert [e["seq"] for e in events] == list(range(1, after[-1] + 1)) and all(e["error"] is None for e in events)
    assert service.metrics.poisoned._value.get() == 3 and status.fold_errors == {"fragile": 3}
    assert folded_later == [{"text": "four"}]


async def test_a_record_the_decoder_raises_on_becomes_an_events_row_with_the_error(bus: Bus, tmp_path: Path) -> None:
    """Should decoding raise on a record all the same (a limit it trips, a bug), the batch is
    decoded in halves and that record alone becomes a row with `error` saying what was raised
    and `raw` its bytes; the records around it decode as usual, and `events` keeps them all."""
    seqs = await notes(bus, *(f"note {i}" for i in range(9)))
    records = await read_records(bus, seqs[-1])
    bad = records[5]

    def build(part: Any) -> Batch:
        if any(r.data == bad.data for r in part):
            raise RecursionError("maximum recursion depth exceeded in the decoder")
        return build_batch(part)

    batch = decode(records, build)
    store = Store(tmp_path / "views.duckdb", stream=STREAM)
    store.open()
    try:
        store.apply(batch)
        stored = store.con.execute("SELECT seq, kind, error, raw FROM events ORDER BY seq").fetchall()
    finally:
        store.close()
    assert [row[0] for row in stored] == seqs
    for seq, kind, error, raw in stored:
        if seq == bad.seq:
            assert kind is None and raw == bad.data
            assert error == "cannot decode: RecursionError: maximum recursion depth exceeded in the decoder"
        else:
            assert (kind, error, raw) == ("note", None, None)


# -- (b) transient failures ----------------------------------------------------------------


async def test_a_fold_the_environment_fails_is_retried_until_it_succeeds_and_nothing_is_poisoned(
    bus: Bus, tmp_path: Path
) -> None:
    """A fold failing with DuckDB's OutOfMemoryException is retried with backoff on fewer records
    each time, counted and shown by status (FOLD RETRYING) while it lasts; the other lanes fold
    what has been read meanwhile. Once memory is there again, every record is folded as it is:
    none becomes an error."""
    view = SqueezedView()
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    async with ProjectionService(bus, settings, views=(*VIEWS, view.spec())) as service:
        seqs = await notes(bus, "one", "squeeze", "three")
        # The `log` lane is not held up by the `memory` lane's retries (until its queue is full).
        assert len(await rows(bus, "SELECT seq FROM events WHERE seq <= ?", seqs[-1], min_seq=seqs[-1])) == seqs[-1]

        async def retried_thrice() -> bool:
            report = await service.status()
            return bool(report.retrying) and report.retrying[0].attempts >= 3

        await wait_for(retried_thrice, timeout_s=30, what="three retries of the squeezed fold")
        status = await service.status()
        retries = service.metrics.fold_retries.labels("live")._value.get()
        view.squeezing.clear()
        folded = await rows(bus, "SELECT text FROM squeezed ORDER BY seq", min_seq=seqs[-1])
        errors = await rows(bus, "SELECT * FROM _continuum.fold_errors")
        after = await service.status()

    [retry] = status.retrying
    assert retry.where == "lane memory" and "Out of Memory Error" in retry.error and retry.first_seq <= seqs[1] <= retry.last_seq
    assert any(line.startswith("FOLD RETRYING: lane memory") for line in format_report(status))
    assert retries >= 3 and view.refused[-1] == 1  # down to the one record
    assert folded == [{"text": "one"}, {"text": "squeeze"}, {"text": "three"}]
    assert errors == [] and after.retrying == [] and service.metrics.poisoned._value.get() == 0


# -- (b) hard crashes ----------------------------------------------------------------------


def _serve(url: str, monitor_url: str | None, credentials: str | None, db: str, log_path: str) -> None:
    """A child process: the projection service with the CRASHING view, until SIGTERM."""
    _no_core_dumps()
    _log_to(log_path)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        config = BusConfig(url=url, monitor_url=monitor_url, name="projections", credentials=credentials)
        async with Bus(config) as bus:
            async with ProjectionService(bus, ProjectionSettings(db_path=db), views=(*VIEWS, CRASHING)):
                await stop.wait()

    asyncio.run(main())


class _Service:
    """The service as a child process, one life after another; its log in `service.log`."""

    def __init__(self, bus: Bus, tmp_path: Path) -> None:
        self._args = (bus.config.url, bus.config.monitor_url, bus.config.credentials, str(tmp_path / "views.duckdb"),
                      str(tmp_path / "service.log"))
        self.log = tmp_path / "service.log"

    def start(self) -> Any:
        child = _spawn.Process(target=_serve, args=self._args)
        child.start()
        return child

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"


async def test_a_record_that_kills_the_service_is_skipped_after_restarts_and_a_rebuild_agrees(
    bus: Bus, tmp_path: Path
) -> None:
    """The service (a child process) dies of SIGABRT while folding a batch holding a killer
    record. Restarted, it folds that batch again one record at a time and dies on the killer
    again. Restarted once more, it knows the record: folded without its content as an error
    ("crashed the projection service") in the views that had not folded it, logged in
    `_continuum.fold_errors` and `_continuum.fold_crashes`; every other record, and everything
    after, is folded; it answers queries. A full rebuild skips it too: the views are identical."""
    service = _Service(bus, tmp_path)
    db = tmp_path / "views.duckdb"
    with _reaped(service.start()) as first:
        await wait_for(lambda: answering(bus), timeout_s=60, what="the service to answer")
        before = await notes(bus, "b1", "b2", "b3")
        await rows(bus, "SELECT count(*) FROM seen", min_seq=before[-1])
        burst = await notes(bus, "a1", "a2", CRASH, "c1", "c2")
        killer = burst[2]
        assert await _exit_code(first, 60) == -signal.SIGABRT, service.tail()

    with _reaped(service.start()) as second:  # folds the batch again, a record at a time: dies on the killer
        assert await _exit_code(second, 90) == -signal.SIGABRT, service.tail()
    assert "folding them again one at a time" in service.log.read_text()

    with _reaped(service.start()) as third:
        await wait_for(lambda: answering(bus), timeout_s=60, what="the service to answer after the crashes")
        seen = await rows(bus, "SELECT seq, text FROM seen ORDER BY seq", min_seq=burst[-1])
        later = await notes(bus, "d1")
        seen_later = await rows(bus, "SELECT text FROM seen WHERE seq = ?", later[0], min_seq=later[0])
        events = await rows(bus, "SELECT seq, kind, error FROM events ORDER BY seq", min_seq=later[0])
        await bus.query("SELECT 1", min_seq=later[0], timeout_s=30)  # every lane
        errors = await rows(bus, "SELECT view, seq, error FROM _continuum.fold_errors")
        crashes = await rows(bus, "SELECT seq, views, strikes FROM _continuum.fold_crashes")
        status = await request_status(bus)
        third.terminate()
        assert await _exit_code(third, 60) == 0, service.tail()

    texts = ["b1", "b2", "b3", "a1", "a2", "c1", "c2"]
    assert [(r["seq"], r["text"]) for r in seen] == list(zip([*before, *burst[:2], *burst[3:]], texts))
    assert seen_later == [{"text": "d1"}]
    assert [e["seq"] for e in events] == list(range(1, later[0] + 1))
    [killed] = [e for e in events if e["seq"] == killer]
    assert killed["kind"] is None and "crashed the projection service" in killed["error"]
    assert all(e["error"] is None for e in events if e["seq"] != killer)
    assert {e["seq"] for e in errors} == {killer} and {"events", "crashing"} <= {e["view"] for e in errors}
    assert all("crashed the projection service" in e["error"] for e in errors)
    assert [(c["seq"], c["strikes"]) for c in crashes] == [(killer, 1)] and "crashing" in crashes[0]["views"]
    assert status.fold_errors["crashing"] == 1
    assert not (tmp_path / "views.duckdb.folding").exists()  # a clean stop leaves no fold in flight

    live = file_hashes(db)
    with _reaped(service.start()) as fourth:
        await wait_for(lambda: answering(bus), timeout_s=60, what="the service to answer")
        report = await request_rebuild(bus, [], timeout_s=120)
        fourth.terminate()
        assert await _exit_code(fourth, 60) == 0, service.tail()
    assert sorted(report.views) == sorted(spec.name for spec in (*VIEWS, CRASHING))
    assert file_hashes(db) == live
    assert set(file_checkpoints(db).values()) == {later[0]}
    con = open_read_only(db)
    try:
        rebuilt_errors = con.execute("SELECT DISTINCT seq FROM _continuum.fold_errors").fetchall()
        generations = con.execute("SELECT DISTINCT generation FROM _continuum.generations").fetchall()
    finally:
        con.close()
    assert rebuilt_errors == [(killer,)] and generations == [(2,)]


def _fold_in_child(db: str, records: list[LogRecord], result: str, log_path: str, view: str = "crashing") -> None:
    """A child process: fold `records` as one batch into a Store with the view named `view`
    (CHILD_VIEWS); then rebuild every view; write the hashes before and after to `result`."""
    _no_core_dumps()
    _log_to(log_path)
    store = Store(db, stream=STREAM, views=(*VIEWS, CHILD_VIEWS[view]), lanes=3)
    store.open()
    try:
        store.apply(build_batch(records))
        folded = store.content_hashes()
        store.start_build([])
        store.apply_build(build_batch(records))
        store.drop_retired()
        rebuilt = store.content_hashes()
    finally:
        store.close()
    Path(result).write_text(json.dumps({"folded": folded, "rebuilt": rebuilt}))


async def test_a_killer_in_a_large_batch_is_known_after_two_more_crashes(bus: Bus, tmp_path: Path) -> None:
    """A batch of more than CHUNK records kills the process. The next start folds it in chunks
    (those before the killer's chunk commit) and dies; the one after folds that chunk a record at
    a time and dies on the killer; the fourth skips exactly the killer and folds the rest, and
    rebuilding then gives the same views."""
    count = 3 * CHUNK
    at = 2 * CHUNK - 60  # in the second chunk
    texts = [CRASH if i == at else f"note {i}" for i in range(count)]
    seqs = await notes(bus, *texts)
    records = await read_records(bus, seqs[-1])
    db, result, log_path = tmp_path / "views.duckdb", tmp_path / "result.json", tmp_path / "fold.log"

    def life() -> Any:
        child = _spawn.Process(target=_fold_in_child, args=(str(db), records, str(result), str(log_path)))
        child.start()
        return child

    checkpoints = []
    for _ in range(3):
        with _reaped(life()) as child:
            assert await _exit_code(child, 120) == -signal.SIGABRT, log_path.read_text()[-3000:]
        checkpoints.append(file_checkpoints(db)["crashing"])
    with _reaped(life()) as child:
        assert await _exit_code(child, 120) == 0, log_path.read_text()[-3000:]

    assert checkpoints == [0, seqs[CHUNK - 1], seqs[at - 1]]  # nothing; the first chunk; up to the killer
    hashes = json.loads(result.read_text())
    assert hashes["folded"] == hashes["rebuilt"]
    con = open_read_only(db)
    try:
        seen = con.execute("SELECT text FROM seen ORDER BY seq").fetchall()
        errors = con.execute("SELECT DISTINCT seq FROM _continuum.fold_errors").fetchall()
        crashes = con.execute("SELECT seq, strikes FROM _continuum.fold_crashes").fetchall()
        suspects = con.execute("SELECT count(*) FROM _continuum.fold_suspects").fetchall()
    finally:
        con.close()
    assert [t for (t,) in seen] == [t for t in texts if t != CRASH]
    assert errors == [(seqs[at],)] and crashes == [(seqs[at], 1)] and suspects == [(0,)]


async def test_a_record_that_kills_even_without_its_content_is_left_out(bus: Bus, tmp_path: Path) -> None:
    """A record whose mere subject kills the fold dies a third time, folded without its content;
    from the next start on it is left out of the views of the lane it killed (`events` too: no
    row), still logged in `_continuum.fold_errors`; everything else is folded, and a rebuild
    gives the same views."""
    seqs = await notes(bus, "n1", "n2")
    doom = (await bus.send("doom", Note(text="to doom"))).ack.seq
    seqs += await notes(bus, "n3", "n4")
    records = await read_records(bus, seqs[-1])
    db, result, log_path = tmp_path / "views.duckdb", tmp_path / "result.json", tmp_path / "fold.log"
    codes = []
    for _ in range(4):
        child = _spawn.Process(target=_fold_in_child, args=(str(db), records, str(result), str(log_path), "dooming"))
        child.start()
        with _reaped(child):
            codes.append(await _exit_code(child, 120))
    assert codes == [-signal.SIGABRT] * 3 + [0], log_path.read_text()[-3000:]

    hashes = json.loads(result.read_text())
    assert hashes["folded"] == hashes["rebuilt"]
    con = open_read_only(db)
    try:
        doomed = con.execute("SELECT text FROM doomed ORDER BY seq").fetchall()
        events = con.execute("SELECT seq FROM events ORDER BY seq").fetchall()
        errors = con.execute("SELECT view, seq, error FROM _continuum.fold_errors").fetchall()
        crashes = con.execute("SELECT seq, strikes FROM _continuum.fold_crashes").fetchall()
    finally:
        con.close()
    assert [t for (t,) in doomed] == ["n1", "n2", "n3", "n4"]
    assert [s for (s,) in events] == seqs
    assert crashes == [(doom, 2)]
    assert {seq for _, seq, _ in errors} == {doom} and {"events", "dooming"} <= {view for view, _, _ in errors}
    assert all(error.endswith("that crashed it too: left out") for _, _, error in errors)


def _fold_and_hang(db: str, records: list[LogRecord], ready: str) -> None:
    """A child process: fold `records` with the HOLDING view, which hangs mid-fold (see it)."""
    os.environ["HOLD_READY"] = ready
    store = Store(db, stream=STREAM, views=(*VIEWS, HOLDING), lanes=3)
    store.open()
    store.apply(build_batch(records))


async def test_a_process_killed_for_another_reason_loses_nothing_and_blames_no_record(bus: Bus, tmp_path: Path) -> None:
    """SIGKILL in the middle of a fold leaves no fault report and counts no OOM kill: the next
    start folds the records again as usual, suspects none, blames none, and the views equal
    those of a fold never interrupted."""
    seqs = await notes(bus, *(["hold"] + [f"note {i}" for i in range(CHUNK + 100)]))
    records = await read_records(bus, seqs[-1])
    db, ready = tmp_path / "views.duckdb", tmp_path / "holding"
    with _reaped(_spawn.Process(target=_fold_and_hang, args=(str(db), records, str(ready)))) as child:
        child.start()
        await wait_for(ready.exists, timeout_s=60, what="the fold to hang")
        assert "\"lane\":\"runtime\"" in db.with_name("views.duckdb.folding").read_text()  # the fold in flight
        child.kill()
        assert await _exit_code(child, 30) == -signal.SIGKILL

    store = Store(db, stream=STREAM, views=(*VIEWS, HOLDING), lanes=3)
    store.open()
    try:
        suspected = store.crash_guard.suspects if store.crash_guard else None
        store.apply(build_batch(records[:100]))
        store.apply(build_batch(records[100:]))
        state = store.con.execute(
            "SELECT (SELECT count(*) FROM _continuum.fold_errors), (SELECT count(*) FROM _continuum.fold_crashes), "
            "(SELECT count(*) FROM _continuum.fold_suspects)").fetchall()
    finally:
        store.close()
    clean = Store(tmp_path / "clean.duckdb", stream=STREAM, views=(*VIEWS, HOLDING), lanes=3)
    clean.open()
    try:
        clean.apply(build_batch(records))
    finally:
        clean.close()

    assert suspected == [] and state == [(0, 0, 0)]
    assert file_hashes(db) == file_hashes(tmp_path / "clean.duckdb")
    assert not db.with_name("views.duckdb.folding").exists() and not db.with_name("views.duckdb.faults").exists()


# -- how a death is read -------------------------------------------------------------------


@pytest.mark.parametrize(("header", "report", "oom_kills", "kind"), [
    (Header(boot="b1", oom_kills=3), "Fatal Python error: Segmentation fault\n\nThread 0x...", 3, "fault"),
    (Header(boot="b1", oom_kills=3), "lane log folding seq 5..9 (live): the database became unusable", 3, "fault"),
    (Header(boot="b1", oom_kills=3), "", 4, "oom"),
    (Header(boot="b0", oom_kills=3), "", 4, "unknown"),  # another boot: the counts are not comparable
    (Header(boot="b1", oom_kills=3), "", 3, "unknown"),  # SIGKILL, or an exit
    (Header(boot="b1", oom_kills=None), "", 4, "unknown"),
    (None, "", 4, "unknown"),
])
def test_how_the_last_process_died_is_read_from_what_it_left(
    header: Header | None, report: str, oom_kills: int, kind: str
) -> None:
    """A fault report (faulthandler's, or the service's note of a fatal database error) means a
    crash; an OOM kill counted since it started, in the same boot, means the OOM killer; anything
    else tells nothing (SIGKILL, an exit)."""
    assert how_it_died(header, report, boot="b1", oom_kills=oom_kills).kind == kind


def _left_behind(db: Path, *folds: InFlight, oom: bool) -> None:
    """`<db>.folding` as a process leaves it when the OOM killer (`oom`) or a SIGKILL ends it."""
    kills = current_oom_kills()
    assert kills is not None
    lines = [Header(boot=current_boot_id(), oom_kills=kills - 1 if oom else kills), *folds]
    db.with_name(db.name + ".folding").write_bytes(
        b"".join(msgspec.json.encode(line).ljust(SLOT_BYTES - 1) + b"\n" for line in lines))


async def test_a_record_is_blamed_for_the_oom_killer_only_after_two_deaths_alone_on_it(bus: Bus, tmp_path: Path) -> None:
    """The OOM killer may have been meant for another process: a batch in flight when it struck
    is folded again one record at a time, and a record folded alone when it struck is folded
    alone again; only the second such death makes it a crasher. (Real OOM kills are not induced
    here: the folding file is written as the killed process leaves it, the kernel's count of OOM
    kills one higher than at its start.)"""
    seqs = await notes(bus, *(f"note {i}" for i in range(10)))
    records = await read_records(bus, seqs[-1])
    db = tmp_path / "views.duckdb"
    victim = seqs[4]

    def opened() -> tuple[list[Any], list[Any]]:
        store = Store(db, stream=STREAM, lanes=3)
        store.open()
        assert store.crash_guard is not None
        found = store.crash_guard.suspects, store.crash_guard.crashes
        store.close()
        return found

    _left_behind(db, InFlight(lane="log", target="live", level="batch", first=seqs[0], last=seqs[-1], count=10), oom=True)
    after_batch = opened()
    alone = InFlight(lane="log", target="live", level="record", first=victim, last=victim, count=1)
    _left_behind(db, alone, oom=True)
    after_once = opened()
    _left_behind(db, alone, oom=False)  # a SIGKILL meanwhile: tells nothing
    after_kill = opened()
    _left_behind(db, alone, oom=True)
    after_twice = opened()

    store = Store(db, stream=STREAM, lanes=3)
    store.open()
    try:
        store.apply(build_batch(records))
        events = store.con.execute("SELECT seq, error FROM events ORDER BY seq").fetchall()
    finally:
        store.close()
    assert [(s.level, s.first, s.last) for s in after_batch[0]] == [("record", seqs[0], seqs[-1])] and not after_batch[1]
    assert [(s.first, s.last, s.deaths) for s in after_once[0]] == [(seqs[0], seqs[-1], 0), (victim, victim, 1)]
    assert after_once[1] == [] and after_kill == after_once
    assert [c.seq for c in after_twice[1]] == [victim] and "OOM killer struck, twice" in after_twice[1][0].error
    assert [seq for seq, error in events if error] == [victim] and len(events) == 10


class FatalView:
    """Notes into `fatal_notes`; a batch holding the note "fatal" makes it raise DuckDB's
    FatalException, as DuckDB does once it has invalidated the database."""

    def fold(self, tx: Tx, s: str, batch: Batch) -> int:
        if tx.rows("SELECT count(*) FROM batch WHERE error IS NULL AND payload->>'text' = 'fatal'")[0][0]:
            raise duckdb.FatalException("FATAL Error: Failed: database has been invalidated because of a previous fatal error")
        return tx.run(render("INSERT INTO {s}.fatal_notes SELECT seq FROM batch WHERE error IS NULL AND kind = 'note'", s))

    def spec(self) -> ViewSpec:
        return ViewSpec(name="fatal", version=1, tables="CREATE TABLE {s}.fatal_notes (seq BIGINT)",
                        relations={"fatal_notes": "SELECT * FROM {s}.fatal_notes"}, fold=self.fold, lane="runtime")


async def test_a_database_duckdb_gives_up_on_ends_the_fold_and_the_next_start_treats_it_as_a_crash(
    bus: Bus, tmp_path: Path
) -> None:
    """A fold DuckDB fails with a fatal error raises StoreUnusable (the process must start again),
    leaves the fold recorded and notes the fault; the next start folds that batch a record at a
    time, and when the record does it again, the start after that folds it without its content."""
    seqs = await notes(bus, "one", "fatal", "three")
    records = await read_records(bus, seqs[-1])
    db = tmp_path / "views.duckdb"
    views = (*VIEWS, FatalView().spec())
    reports = []
    for _ in range(2):
        store = Store(db, stream=STREAM, views=views, lanes=3)
        store.open()
        try:
            with pytest.raises(fold.StoreUnusable):
                store.apply(build_batch(records))
        finally:
            store.close()
        reports.append(db.with_name("views.duckdb.faults").read_text())
    store = Store(db, stream=STREAM, views=views, lanes=3)
    store.open()
    try:
        store.apply(build_batch(records))
        folded = store.con.execute("SELECT seq FROM fatal_notes ORDER BY seq").fetchall()
        crashes = store.con.execute("SELECT seq FROM _continuum.fold_crashes").fetchall()
    finally:
        store.close()
    assert all("database has been invalidated" in report for report in reports)
    assert f"seq {seqs[0]}..{seqs[2]}" in reports[0] and f"seq {seqs[1]}..{seqs[1]}" in reports[1]  # the batch; alone
    assert folded == [(seqs[0],), (seqs[2],)] and crashes == [(seqs[1],)]
