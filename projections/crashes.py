"""Records that crash the process folding them: the suspects, and the crashers.

A record's content may kill the process that folds it (a segfault in a C library, a stack
overflow, the OOM killer): there is no exception to catch, and at the next start the same record
would kill it again, forever. So before a fold, its lane records it in `<views>.folding`, and
clears it after (projections.inflight: one pwrite each way; with the rest of this module ~5 us
per lane fold, measured, against 15-50 ms for the fold). A fold still recorded at the next start
was running when the process died. How it died (`inflight.Death`: a fatal signal leaves
faulthandler's report in `<views>.faults`, the kernel counts OOM kills) decides what that means:

    unknown (a SIGKILL, an exit)    nothing about the records: they are folded again as usual,
                                    so a kill that has nothing to do with them costs nothing
    fault (a fatal signal, or DuckDB gave up on the database), or oom (the OOM killer struck):

      the fold was                  so
      a batch, as it came           its records become suspects, folded again in chunks (of
                                    `CHUNK` records, or more to make at most `MAX_CHUNKS`); one
                                    record at a time if the batch held no more than `CHUNK`
      a chunk of suspects           its records become suspects, folded one at a time
      one suspect, alone            a fault: it is a crasher. An OOM kill, which may have been
                                    meant for another process's memory: a crasher the second
                                    time it dies alone on it (`fold_suspects.deaths` counts)

So a record that segfaults or aborts the fold kills the process at most twice more before the
next start skips it (once more when its batch held at most `CHUNK` records, as live batches do);
one that brings the OOM killer, once more than that; one that makes the process exit without a
signal (or while something else holds faulthandler) is never recognised. While suspects of a target (the live views,
or a rebuild) wait, every fold of that target runs alone (`CrashGuard.alone`): the one fold in
flight at a death is the only one running.

A crasher is never folded with its content again: it goes in with every field but seq, stored_at
and subject emptied and `error` saying it crashed the service (folds skip such rows; `events`
keeps one), and each view logs it in `_continuum.fold_errors`. That holds for every view that had
not folded it when the crash was found; the views that had keep it as they folded it, so that a
rebuild, which makes the same choice, equals the live views. Should it crash even so, it is left
out of those views altogether. Suspects and crashers live in the views file
(`_continuum.fold_suspects`, `_continuum.fold_crashes`): they outlive restarts and rebuilds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from projections.batch import Batch
from projections.inflight import Death, FaultFile, FoldingFile, Header, InFlight, current_oom_kills, how_it_died
from projections.unsynced import current_boot_id

log = logging.getLogger("continuum.projections.crashes")

LIVE, BUILD = "live", "build"  # the targets: the active views, or a rebuild's building ones
# How a piece of a batch is folded: as it came, as a chunk of suspects, one suspect alone, or (a
# known crasher) without its content.
BATCH, CHUNK_OF_SUSPECTS, SUSPECT, CRASHER = "batch", "chunk", "record", "crasher"
CHUNK = 256
MAX_CHUNKS = 64  # what a death folds again at most, in commits per lane
OOM_DEATHS = 2  # deaths alone on a record, the OOM killer's, that make it a crasher
_TABLES = (
    """CREATE TABLE IF NOT EXISTS _continuum.fold_crashes (
        seq      BIGINT PRIMARY KEY,
        views    VARCHAR[] NOT NULL,  -- the views that fold it without its content
        strikes  INTEGER NOT NULL,    -- deaths as a crasher: 1 folds it emptied, 2 or more leaves it out
        error    VARCHAR NOT NULL,
        found_us BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS _continuum.fold_suspects (
        target    VARCHAR NOT NULL,   -- live | build
        level     VARCHAR NOT NULL,   -- chunk | record: how its records are folded again
        first_seq BIGINT NOT NULL,
        last_seq  BIGINT NOT NULL,
        deaths    INTEGER NOT NULL DEFAULT 0)  -- OOM kills while its one record was folded alone""",
)


@dataclass(frozen=True)
class Crash:
    """A record known to crash the process that folds it."""

    seq: int
    views: frozenset[str]  # the views that fold it without its content
    strikes: int  # 1 folds it emptied; 2 or more (it killed the process even so) leaves it out
    error: str


@dataclass(frozen=True)
class Suspects:
    """Records to fold again with care: in chunks, or one at a time."""

    target: str
    level: str  # chunk | record
    first: int
    last: int
    deaths: int = 0


class CrashGuard:
    """What the fold lanes of one store consult and record about crashes. Thread-safe."""

    def __init__(
        self,
        file: FoldingFile,
        faults: FaultFile,
        crashes: Iterable[Crash],
        suspects: Iterable[Suspects],
        checkpoint: Callable[[str], int],
    ) -> None:
        self._file = file
        self._faults = faults
        self._crashes = {c.seq: c for c in crashes}
        self._crash_seqs = sorted(self._crashes)
        self._suspects = list(suspects)
        self._checkpoint = checkpoint
        self._alone = threading.Lock()
        self._in_flight: set[int] = set()

    @classmethod
    def load(
        cls,
        con: duckdb.DuckDBPyConnection,
        path: Path,
        *,
        views: Collection[str],
        slots: int,
        checkpoint: Callable[[str], int],
    ) -> CrashGuard:
        """Read what the last process left in flight in `<path>.folding` and how it died, turn
        that into suspects or crashers in the views file (before the store drops unfinished
        rebuilds: a crash's views are judged by their checkpoints), and start afresh with `slots`
        lanes, fatal faults reported in `<path>.faults`. `views` are the views this code folds;
        `checkpoint(target)` is a target's checkpoint now. Raises OSError, duckdb.Error."""
        for statement in _TABLES:
            con.execute(statement).fetchall()
        file = FoldingFile(path.with_name(path.name + ".folding"))
        faults = FaultFile(path.with_name(path.name + ".faults"))
        header, left = file.left_behind()
        report = faults.report()
        boot = current_boot_id()
        if report.strip():
            log.error("the last projection service died of a fault:\n%s", report.strip()[-4000:])
        if left:
            _record(con, left, how_it_died(header, report, boot=boot, oom_kills=current_oom_kills()), views)
        crashes = [
            Crash(seq, frozenset(names), strikes, error)
            for seq, names, strikes, error in con.execute(
                "SELECT seq, views, strikes, error FROM _continuum.fold_crashes ORDER BY seq").fetchall()
        ]
        suspects = [Suspects(*row) for row in con.execute(
            "SELECT target, level, first_seq, last_seq, deaths FROM _continuum.fold_suspects ORDER BY first_seq").fetchall()]
        file.start(slots, Header(boot=boot, oom_kills=current_oom_kills()))
        try:
            faults.watch()
        except BaseException:
            file.close(remove=True)
            raise
        return cls(file, faults, crashes, suspects, checkpoint)

    def close(self) -> None:
        """Close the files, removing them unless a fold is left in flight, or a fault reported
        (the next start then reads them)."""
        self._faults.close()
        self._file.close(remove=not self._in_flight)

    @property
    def crashes(self) -> list[Crash]:
        return [self._crashes[seq] for seq in self._crash_seqs]

    @property
    def suspects(self) -> list[Suspects]:
        return list(self._suspects)

    def crash(self, seq: int) -> Crash:
        return self._crashes[seq]

    # -- folding --------------------------------------------------------------------------

    @contextlib.contextmanager
    def alone(self, target: str) -> Iterator[None]:
        """Run the block as the only fold of `target` while suspects of it wait (else at once)."""
        if not any(s.target == target for s in self._suspects):
            yield
            return
        with self._alone:
            yield

    def plan(self, batch: Batch, target: str, views: Collection[str]) -> list[tuple[Batch, str]]:
        """`batch` as the pieces to fold in turn, each with how: `BATCH` (as it came), a chunk of
        suspects, one suspect, or a known crasher of one of `views`. Nearly always one piece."""
        seqs = batch.seqs
        first, last = batch.first_seq, batch.last_seq
        at = bisect_left(self._crash_seqs, first)
        crashers = []
        while at < len(self._crash_seqs) and self._crash_seqs[at] <= last:
            seq = self._crash_seqs[at]
            if not self._crashes[seq].views.isdisjoint(views):
                crashers.append(seq)
            at += 1
        suspects = [s for s in self._suspects if s.target == target and s.first <= last and s.last >= first]
        if not crashers and not suspects:
            return [(batch, BATCH)]
        # How each record is folded, and with how many records at most in its piece.
        how = [(BATCH, batch.size)] * batch.size
        # Records suspected twice over (a chunk that crashed, within a batch that did) go one at a time.
        for suspect in sorted(suspects, key=lambda s: s.level == SUSPECT):
            lo, hi = bisect_left(seqs, suspect.first), bisect_right(seqs, suspect.last)
            how[lo:hi] = [(suspect.level, chunk_size(suspect) if suspect.level == CHUNK_OF_SUSPECTS else 1)] * (hi - lo)
        for seq in crashers:
            at = bisect_left(seqs, seq)
            if at < len(seqs) and seqs[at] == seq:
                how[at] = (CRASHER, 1)
        pieces: list[tuple[Batch, str]] = []
        start = 0
        while start < batch.size:
            level, most = how[start]
            end, limit = start + 1, min(batch.size, start + most)
            while end < limit and how[end][0] == level:
                end += 1
            piece = batch.window(seqs[start - 1] if start else batch.after_seq, seqs[end - 1])
            assert piece is not None
            pieces.append((piece, level))
            start = end
        return pieces

    @contextlib.contextmanager
    def in_flight(self, slot: int, fold: InFlight, *, keep_on: type[BaseException]) -> Iterator[None]:
        """Record `fold` in `slot` for the block; blank the slot when the block ends, unless it
        raises `keep_on` (the process cannot go on: the next start must see the fold).
        Raises OSError from writing the slot."""
        self._file.write(slot, fold)
        self._in_flight.add(slot)
        try:
            yield
        except keep_on as exc:
            self._faults.note(f"lane {fold.lane} folding seq {fold.first}..{fold.last} ({fold.target}): {exc}")
            raise
        except BaseException:
            self._clear(slot)
            raise
        self._clear(slot)

    def _clear(self, slot: int) -> None:
        self._file.clear(slot)
        self._in_flight.discard(slot)

    def settle(self, target: str, con: duckdb.DuckDBPyConnection) -> None:
        """Forget the suspects of `target` its checkpoint has passed (their records are folded).
        Call it inside `alone(target)`."""
        if not any(s.target == target for s in self._suspects):
            return
        done = self._checkpoint(target)
        passed = [s for s in self._suspects if s.target == target and s.last <= done]
        if not passed:
            return
        try:
            con.execute("DELETE FROM _continuum.fold_suspects WHERE target = ? AND last_seq <= ?", [target, done]).fetchall()
        except duckdb.Error as exc:  # the next fold tries again; meanwhile they only cost a lock
            log.warning("could not forget the suspects folded up to seq %d: %s", done, exc)
            return
        self._suspects = [s for s in self._suspects if s not in passed]
        for suspect in passed:
            log.info("seqs %d..%d folded again without a crash (%s)", suspect.first, suspect.last, target)


def chunk_size(suspects: Suspects) -> int:
    """How many records a chunk of `suspects` holds at most: CHUNK, or enough for MAX_CHUNKS."""
    return max(CHUNK, -(-(suspects.last - suspects.first + 1) // MAX_CHUNKS))


def _record(con: duckdb.DuckDBPyConnection, left: list[InFlight], death: Death, views: Collection[str]) -> None:
    """Turn the folds a dead process left in flight into suspects or crashers, as its `death`
    says (see the module docstring), in one transaction."""
    if death.kind == "unknown":
        for fold in left:
            log.warning("the service stopped while lane %s folded seqs %d..%d (%s) with no sign of a crash (%s): "
                        "folding them again as usual", fold.lane, fold.first, fold.last, fold.target, death.detail)
        return
    con.execute("BEGIN TRANSACTION").fetchall()
    try:
        for fold in left:
            alone = sum(f.target == fold.target for f in left) == 1
            if fold.level in (SUSPECT, CRASHER) and alone:
                _record_death_alone(con, fold, death, views)
                continue
            # A batch, a chunk, or (never while suspects wait: folds then run alone) a record
            # folded beside another, which cannot be blamed on its own: fold them again.
            level = CHUNK_OF_SUSPECTS if fold.level == BATCH and fold.count > CHUNK else SUSPECT
            log.warning(
                "the service died (%s) while lane %s folded seqs %d..%d (%d records, %s): folding them again %s",
                death.detail, fold.lane, fold.first, fold.last, fold.count, fold.target,
                "in chunks" if level == CHUNK_OF_SUSPECTS else "one at a time",
            )
            _suspect(con, fold.target, level, fold.first, fold.last)
        con.execute("COMMIT").fetchall()
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK").fetchall()
        raise


def _suspect(con: duckdb.DuckDBPyConnection, target: str, level: str, first: int, last: int, deaths: int = 0) -> None:
    con.execute("DELETE FROM _continuum.fold_suspects WHERE target = ? AND level = ? AND first_seq = ? AND last_seq = ?",
                [target, level, first, last]).fetchall()
    con.execute("INSERT INTO _continuum.fold_suspects VALUES (?, ?, ?, ?, ?)", [target, level, first, last, deaths]).fetchall()


def _record_death_alone(con: duckdb.DuckDBPyConnection, fold: InFlight, death: Death, views: Collection[str]) -> None:
    """The process died (of `death`) while `fold`'s one record was folded alone."""
    seq = fold.first
    known = con.execute("SELECT views, strikes FROM _continuum.fold_crashes WHERE seq = ?", [seq]).fetchall()
    if fold.level == CRASHER and known:
        log.error("seq %d killed the service again (%s), folded without its content: from now on views %s leave "
                  "it out", seq, death.detail, ", ".join(sorted(known[0][0])))
        con.execute("UPDATE _continuum.fold_crashes SET strikes = strikes + 1 WHERE seq = ?", [seq]).fetchall()
        return
    if death.kind == "oom":
        deaths = 1 + max((d for (d,) in con.execute(
            "SELECT deaths FROM _continuum.fold_suspects WHERE target = ? AND first_seq = ? AND last_seq = ?",
            [fold.target, seq, seq]).fetchall()), default=0)
        if deaths < OOM_DEATHS:
            log.warning("the OOM killer struck while lane %s folded seq %d alone (%s): folding it alone again",
                        fold.lane, seq, fold.target)
            _suspect(con, fold.target, SUSPECT, seq, seq, deaths)
            return
    # The views that folded it already keep it (a rebuild folds it the same way for them).
    state = "active" if fold.target == LIVE else "building"
    folded = {view for (view,) in con.execute(
        "SELECT view FROM _continuum.generations WHERE state = ? AND applied_seq >= ?", [state, seq]).fetchall()}
    skipping = sorted((set(views) | set(known[0][0] if known else ())) - folded)
    how = "the OOM killer struck, twice" if death.kind == "oom" else death.detail
    error = (f"it crashed the projection service ({how}) while lane {fold.lane} folded it alone, after a crash "
             "while folding its batch: folded without its content")
    log.error("seq %d: %s, into views %s", seq, error, ", ".join(skipping))
    con.execute(
        "INSERT OR REPLACE INTO _continuum.fold_crashes VALUES (?, ?, ?, ?, ?)",
        [seq, skipping, known[0][1] if known else 1, error, time.time_ns() // 1000],
    ).fetchall()
