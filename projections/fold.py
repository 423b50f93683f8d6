"""Applying batches to views, exactly once: one lane is one DuckDB connection and its thread.

A lane folds a batch into its generations and advances their checkpoints in one transaction,
so a crash leaves each view either before or after the batch, never half-way. The store splits
the views over a few lanes that run at once: DuckDB runs each of these statements on one core,
so two lanes fold ~1.6x faster on two cores (measured: 110k -> 181k events/s, all views).

A record whose content makes a view's fold fail (a data error from DuckDB, or any exception the
records cause: see below) is found by halving
the batch, and folded into that view with its `error` set (folds skip such rows) and logged in
`_continuum.fold_errors`: one bad event never stops the views, and it fails the same way in a
rebuild, so rebuilt views still equal live ones. Should the view fail on it even so, it gets the
record with its content emptied as well, and failing that, not at all.

What a failure says about its cause decides what happens (`cause_of`):

    the records      any exception from a view's fold but those below: DuckDB's data, binder and
                     internal errors, RecursionError, MemoryError (with overcommit, Python runs
                     out of memory on one huge allocation, which a record's content asks for;
                     the machine running out kills the process instead), a view's bug that odd
                     data trips. Found by halving, folded as an error: deterministic, so retrying
                     would fail forever.
    the environment  DuckDB out of memory (its memory_limit, shared by every lane and query), I/O
                     (disk full), interrupted, a conflicting transaction; OSError. Nothing is
                     wrong with the records: FoldError, nothing committed; the runner retries.
                     The decode limits (schemas.limits) bound what one record can ask of a fold.
    memory, badly    DuckDB could not roll the failed fold back, or invalidated the database
                     because a rollback could not allocate (a query held DuckDB's memory:
                     projections.memory_share): StoreInvalidated. What the file holds is whole;
                     the runner opens it again (Store.reopen) and retries. No record is to
                     blame: not kept as in flight.
    a half commit    DuckDB ran out of memory during COMMIT: HalfCommitted (a StoreInvalidated).
                     Its commit is not atomic then: measured, it kept the lane's checkpoint
                     without the views' rows; the opposite half (rows without their checkpoint)
                     is as possible. Neither refolding nor skipping the batch is right, so the
                     views of that transaction are suspect: the store records them
                     (`Store.note_half_commit`) and, once the file is open again, rebuilds them
                     from sequence 1 while the others serve.
    the database     DuckDB invalidated it after another fatal error, or the connection is gone:
                     StoreUnusable. The process must start again; the fold stays recorded as in
                     flight, so that start treats its records as suspects (projections.crashes).

Before a fold starts, its lane records it in `<views>.folding`, and clears it when the fold
returns: a fold whose process crashed in the middle is recognised at the next start and its
records are folded again with care; a record that crashes the process is folded without its
content from then on (see projections.crashes).

A batch that no view of a lane has a statement for (most batches, for the memory views) costs
that lane no transaction: its checkpoint moves in memory and reaches the file with the lane's
next commit, within a second, or at close. After a crash the lane folds those records again,
which again writes nothing, so the views are the same either way.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from projections.batch import Batch
from projections.crashes import BUILD, CRASHER, LIVE, CrashGuard
from projections.errors import FoldError
from projections.inflight import InFlight
from projections.memory_share import FoldsFirst, lost_spill, out_of_memory
from projections.views import Tx, ViewSpec

log = logging.getLogger("continuum.projections.fold")

# A fold that writes nothing (no view of the lane has a statement for the batch) skips its
# transaction; its checkpoint is written with the lane's next commit, or after this long.
SAVE_EVERY_S = 1.0
SAVE_EVERY_EVENTS = 50_000

# How a view that cannot fold a record gets it, each tried when the one before failed: with
# `error` set (its content kept, folds skip it), with its content emptied too, or not at all.
MARKED, EMPTIED, LEFT_OUT = 1, 2, 3
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 30.0
# What `Lane._left_broken` says of a commit DuckDB failed part-way (HalfCommitted).
HALF_COMMITTED = "failed half-way through a commit"


class Cause(enum.Enum):
    """What a failed fold says about where the fault lies (see the module docstring)."""

    RECORDS = "records"  # isolate the record, fold it as an error
    ENVIRONMENT = "environment"  # retry later; the records are fine
    DATABASE = "database"  # the database is unusable: start the process again


def cause_of(exc: BaseException) -> Cause:
    """Where the fault lies for an exception a fold raised (pure: see the module docstring)."""
    if isinstance(exc, duckdb.FatalException | duckdb.ConnectionException):
        return Cause.DATABASE
    if isinstance(exc, duckdb.OperationalError | duckdb.InterruptException | OSError):
        return Cause.ENVIRONMENT  # out of memory, I/O, HTTP, transaction conflicts, busy
    return Cause.RECORDS


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...) of a fold the environment
    failed: doubling from RETRY_FIRST_S, at most RETRY_MAX_S. Retries never stop: the records
    cannot be skipped (they are good) and stopping would only end the service."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** min(attempt - 1, 16))


class StoreInvalidated(FoldError):
    """DuckDB invalidated the database because a rollback or commit could not get memory, or
    could not roll back a failed fold at all (a query beside the folds held the memory: DuckDB
    has one memory_limit for all). No record is to blame, so the fold is not kept as in
    flight; what was committed is in the file, and `Store.reopen` goes on from it."""


class HalfCommitted(StoreInvalidated):
    """DuckDB ran out of memory half-way through the COMMIT of a fold of `views`: some of the
    transaction's writes may be in the file and others not (the checkpoint without the rows, or
    the rows without the checkpoint), so what those views hold can no longer be trusted.
    `building` says whether they were a rebuild's generations (dropped at the reopen anyway)."""

    def __init__(self, message: str, *, views: tuple[str, ...], first_seq: int, last_seq: int, building: bool) -> None:
        super().__init__(message)
        self.views = views
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.building = building


class StoreUnusable(FoldError):
    """DuckDB can no longer use the database (a fatal error invalidated it, or the connection is
    gone): nothing more is folded in this process. The fold stays recorded as in flight, so the
    next start folds its records again with care (projections.crashes)."""


@dataclass
class Generation:
    """One generation of one view in the file."""

    view: str
    generation: int
    version: int
    state: str
    applied_seq: int
    applied_us: int | None
    relations: list[str] = field(default_factory=list)

    @property
    def schema(self) -> str:
        return f"v_{self.view}_{self.generation}"


@dataclass(frozen=True)
class Applied:
    """What folding a batch did."""

    events: int = 0
    last_seq: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    poisoned: int = 0  # records a view could not fold (see `_continuum.fold_errors`)
    swapped: bool = False

    def merge(self, other: Applied) -> Applied:
        """Two lanes' results for the same records as one."""
        rows = {k: self.rows.get(k, 0) + other.rows.get(k, 0) for k in {*self.rows, *other.rows}}
        return Applied(
            max(self.events, other.events), max(self.last_seq, other.last_seq), rows,
            self.poisoned + other.poisoned, self.swapped or other.swapped,
        )

    def then(self, later: Applied) -> Applied:
        """This fold followed by `later`, of the records after it (pieces of one batch)."""
        rows = {k: self.rows.get(k, 0) + later.rows.get(k, 0) for k in {*self.rows, *later.rows}}
        return Applied(
            self.events + later.events, max(self.last_seq, later.last_seq), rows,
            self.poisoned + later.poisoned, self.swapped or later.swapped,
        )


class Lane:
    """Folds batches into generations on one connection. Used by one thread at a time."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        specs: Mapping[str, ViewSpec],
        *,
        guard: CrashGuard | None = None,
        slot: int = 0,
        name: str = "",
        folds_first: FoldsFirst | None = None,
    ) -> None:
        self.con = con
        # Folds in a row that failed for a write conflict (see `_fold`).
        self._conflicts = 0
        # Told when a fold runs out of DuckDB's memory, before its rollback (which needs memory
        # too), and when the lane folds again: the queries give way meanwhile.
        self._folds_first = folds_first
        self._specs = specs
        # Where this lane records the fold it is running (None: nowhere, no crash is recognised).
        self._guard = guard
        self._slot = slot
        self._name = (name or str(slot))[:64]  # (its slot in the crash record has room for 64)
        # Checkpoints of folds that wrote nothing, by generations ("view/generation": a rebuild's
        # generations change state when they are swapped in), not yet in the file.
        self._deferred: dict[tuple[str, ...], tuple[int, int]] = {}
        self._deferred_since: float | None = None
        self._deferred_events = 0

    def fold(self, gens: list[Generation], batch: Batch) -> Applied:
        """Fold `batch` (records above the gens' checkpoint) into `gens` and move their
        checkpoint to its last sequence, in one transaction; isolate records whose content a
        view cannot fold, and records known to crash the process. Raises FoldError (nothing of
        the failing part committed), StoreInvalidated (open the file again; HalfCommitted: the
        commit failed half-way, `gens` are not to be trusted), StoreUnusable."""
        guard = self._guard
        if guard is None:
            return self._fold_halving(gens, batch)
        target = BUILD if gens[0].state == "building" else LIVE
        with guard.alone(target):
            done: Applied | None = None
            for piece, level in guard.plan(batch, target, [g.view for g in gens]):
                fold = InFlight(lane=self._name, target=target, level=level,
                                first=piece.first_seq, last=piece.last_seq, count=piece.size)
                try:
                    with guard.in_flight(self._slot, fold, keep_on=StoreUnusable):
                        applied = (self._fold_halving(gens, piece) if level != CRASHER
                                   else self._fold_crasher(gens, piece, guard))
                except OSError as exc:  # writing the slot (disk full): retried like any I/O failure
                    raise FoldError(f"could not record the fold of seq {piece.first_seq}..{piece.last_seq}: {exc}") from exc
                done = applied if done is None else done.then(applied)
            guard.settle(target, self.con)
        assert done is not None
        return done

    def _fold_halving(self, gens: list[Generation], batch: Batch) -> Applied:
        """`fold` without the crash record: a part that fails for a reason its records cause is
        halved until the record is found, which then goes in as an error."""
        try:
            return self._fold(gens, batch)
        except _RecordError as failure:
            if batch.size == 1:
                return self._fold_failing(gens, batch, {failure.view: (MARKED, describe(failure.cause))})
        half = batch.seqs[batch.size // 2 - 1]
        first = self._fold_halving(gens, _window(batch, batch.after_seq, half))
        return first.then(self._fold_halving(gens, _window(batch, half, None)))

    def _fold_crasher(self, gens: list[Generation], batch: Batch, guard: CrashGuard) -> Applied:
        """A record known to crash the process: emptied (or left out) in the views it crashed."""
        crash = guard.crash(batch.first_seq)
        level, why = (EMPTIED, crash.error) if crash.strikes < 2 else (
            LEFT_OUT, f"{crash.error}; that crashed it too: left out")
        failing = {g.view: (level, why) for g in gens if g.view in crash.views}
        return self._fold_failing(gens, batch, failing) if failing else self._fold_halving(gens, batch)

    def _fold_failing(self, gens: list[Generation], batch: Batch, failing: dict[str, tuple[int, str]]) -> Applied:
        """Fold one record that the views in `failing` cannot fold as it is: each gets it as its
        level there says (MARKED, EMPTIED, LEFT_OUT), a level further whenever it fails again."""
        while True:
            log.warning("event %d cannot be folded (%s)", batch.first_seq, _reason(failing))
            try:
                done = self._fold(gens, batch, failing=failing)
            except _RecordError as again:
                level, why = failing.get(again.view, (0, ""))
                error = describe(again.cause)
                # (LEFT_OUT runs nothing of the view's, so it cannot fail again.)
                failing[again.view] = (
                    (MARKED, error) if level == 0
                    else (EMPTIED, f"{why}; with its error set: {error}") if level == MARKED
                    else (LEFT_OUT, f"{why}; without its content: {error}; left out")
                )
                continue
            return dataclasses.replace(done, poisoned=1)

    def _fold(
        self,
        gens: list[Generation],
        batch: Batch,
        *,
        failing: Mapping[str, tuple[int, str]] | None = None,
    ) -> Applied:
        con = self.con
        tx = Tx(con)
        applied_us = batch.last_time_ns // 1000
        key = tuple(f"{g.view}/{g.generation}" for g in gens)
        checkpoints = {**self._deferred, key: (batch.last_seq, applied_us)}
        stand_ins = _StandIns(batch, _reason(failing)) if failing else None
        refused = committing = False
        try:
            rows: dict[str, int] = {}
            try:
                for gen in gens:
                    level = failing[gen.view][0] if failing and gen.view in failing else 0
                    if level == LEFT_OUT:
                        rows[gen.view] = 0
                        continue
                    wanted = batch if stand_ins is None or level == 0 else stand_ins.at(level)
                    tx.use(wanted.fold_table())
                    try:
                        rows[gen.view] = self._specs[gen.view].fold(tx, gen.schema, wanted)
                    except Exception as exc:
                        if cause_of(exc) is Cause.RECORDS:
                            raise _RecordError(gen.view, exc) from exc
                        raise
                for view, (_, why) in (failing or {}).items():
                    gen = next(g for g in gens if g.view == view)
                    tx.run("INSERT INTO _continuum.fold_errors VALUES (?, ?, ?, ?)",
                           [gen.view, gen.generation, batch.first_seq, why])
                if tx.begun or self._checkpoints_due(batch.size):
                    tx.begin()
                    self._save(checkpoints)
                    committing = True
                    _run(con, "COMMIT")
                    self._deferred, self._deferred_since, self._deferred_events = {}, None, 0
                else:
                    # Nothing written: the checkpoint can wait for the next commit (refolding
                    # these records after a crash writes nothing either).
                    self._deferred = checkpoints
                    self._deferred_events += batch.size
                    if self._deferred_since is None:
                        self._deferred_since = time.monotonic()
            except BaseException as exc:
                if self._folds_first is not None and out_of_memory(exc):
                    self._folds_first.short(self._name)
                # Even when `tx.begun` is False: BEGIN may have run and its fetch failed.
                refused = not rollback(con)
                raise
        except _RecordError:
            raise
        except Exception as exc:
            where = f"seq {batch.first_seq}..{batch.last_seq}"
            broken = self._left_broken(exc, refused=refused, committing=committing)
            if broken == HALF_COMMITTED:
                raise HalfCommitted(
                    f"DuckDB {broken} while folding {where} into {', '.join(g.view for g in gens)} "
                    f"({first_line(exc)})", views=tuple(g.view for g in gens),
                    first_seq=batch.first_seq, last_seq=batch.last_seq, building=gens[0].state == "building",
                ) from exc
            if broken is not None:
                raise StoreInvalidated(f"DuckDB {broken} while folding {where} ({first_line(exc)})") from exc
            if cause_of(exc) is Cause.DATABASE:
                raise StoreUnusable(f"the database became unusable while folding {where}: {exc}") from exc
            raise FoldError(f"could not apply {where}: {describe(exc)}") from exc
        finally:
            tx.release()
        for gen in gens:
            gen.applied_seq = batch.last_seq
            gen.applied_us = applied_us
        if self._folds_first is not None:
            self._folds_first.folded(self._name)
        self._conflicts = 0
        return Applied(events=batch.size, last_seq=batch.last_seq, rows=rows)

    def _left_broken(self, exc: Exception, *, refused: bool, committing: bool) -> str | None:
        """What DuckDB left broken in memory when a fold failed with `exc`, so that only opening
        the file again mends it (see StoreInvalidated); None if nothing is."""
        if refused:
            # The transaction stays open and aborted, holding what it wrote: this connection
            # would fail every statement, and others would conflict with it.
            return "could not roll back the failed fold"
        if committing and out_of_memory(exc):
            # DuckDB's commit is not atomic when it runs out of memory: some of the transaction's
            # tables can reach the file and others not. Seen: the checkpoint without the views'
            # rows (folded again, the batch would be skipped); the rows without the checkpoint
            # (folded again, doubled) is as possible. Only a rebuild of these views is sure.
            return HALF_COMMITTED
        if cause_of(exc) is Cause.DATABASE and out_of_memory(exc):
            return "invalidated the database for want of memory"
        if lost_spill(exc):
            return "lost a block it had set aside"
        if isinstance(exc, duckdb.TransactionException) and "conflict" in str(exc).lower():
            # A lane is the one writer of its views and of its checkpoint rows: a conflict can
            # only be with a transaction DuckDB failed to end (out of memory, it can leave one,
            # or a half-registered `batch`, behind). Once may be chance; twice running, it will
            # not go away.
            self._conflicts += 1
            if self._conflicts >= 2:
                self._conflicts = 0
                return "keeps reporting a write conflict no other writer causes"
        return None

    def save_checkpoints(self) -> None:
        """Write the checkpoints of folds that wrote nothing and so deferred them (at close).
        Raises duckdb.Error."""
        if not self._deferred:
            return
        _run(self.con, "BEGIN TRANSACTION")
        try:
            self._save(self._deferred)
            _run(self.con, "COMMIT")
        except BaseException:
            rollback(self.con)
            raise
        self._deferred, self._deferred_since, self._deferred_events = {}, None, 0

    def _checkpoints_due(self, events: int) -> bool:
        """Deferred checkpoints are written at least every `SAVE_EVERY_S` seconds and every
        `SAVE_EVERY_EVENTS` records, bounding what a restart folds again."""
        if self._deferred_since is None:
            return False
        return (self._deferred_events + events >= SAVE_EVERY_EVENTS
                or time.monotonic() - self._deferred_since >= SAVE_EVERY_S)

    def _save(self, checkpoints: Mapping[tuple[str, ...], tuple[int, int]]) -> None:
        for gens, (seq, applied_us) in checkpoints.items():
            _run(self.con, "UPDATE _continuum.generations SET applied_seq = ?, applied_us = ? "
                           "WHERE list_contains(?, view || '/' || generation)", [seq, applied_us, list(gens)])


class _RecordError(Exception):
    """A view's fold failed for a reason that lies in the records (`Cause.RECORDS`)."""

    def __init__(self, view: str, cause: Exception) -> None:
        super().__init__(f"{view}: {cause}")
        self.view = view
        self.cause = cause


class _StandIns:
    """What a view that cannot fold a one-record batch gets instead of it, made when first asked."""

    def __init__(self, batch: Batch, reason: str) -> None:
        self._batch = batch
        self._reason = reason
        self._made: dict[int, Batch] = {}

    def at(self, level: int) -> Batch:
        if level not in self._made:
            self._made[level] = (_mark if level == MARKED else _empty)(self._batch, self._reason)
        return self._made[level]


def _reason(failing: Mapping[str, tuple[int, str]] | None) -> str:
    """What the stand-ins' `error` says: why each view failed (views failing alike, once)."""
    views_by_why: dict[str, list[str]] = {}
    for view, (_, why) in (failing or {}).items():
        views_by_why.setdefault(why, []).append(view)
    return "; ".join(
        f"fold of view{'s' if len(views) > 1 else ''} {', '.join(views)} failed: {why}" for why, views in views_by_why.items()
    )


def _window(batch: Batch, after_seq: int, upto: int | None) -> Batch:
    part = batch.window(after_seq, upto)
    assert part is not None
    return part


def _mark(batch: Batch, error: str) -> Batch:
    column = pa.array([error] * batch.size, pa.string())
    return dataclasses.replace(batch, table=batch.table.set_column(batch.table.schema.get_field_index("error"), "error", column))


_KEPT_WHEN_EMPTIED = frozenset({"seq", "stored_at", "subject"})


def _empty(batch: Batch, error: str) -> Batch:
    """`batch` with `error` set and every other field but seq, stored_at and subject NULL."""
    table = batch.table
    columns = [
        table.column(f.name) if f.name in _KEPT_WHEN_EMPTIED
        else pa.array([error] * batch.size, pa.string()) if f.name == "error"
        else pa.nulls(batch.size, f.type)
        for f in table.schema
    ]
    return dataclasses.replace(
        batch, table=pa.Table.from_arrays(columns, schema=table.schema), kinds=frozenset(), claims=False,
    )


def _run(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> None:
    (con.execute(sql, params) if params is not None else con.execute(sql)).fetchall()


def rollback(con: duckdb.DuckDBPyConnection) -> bool:
    """Roll back the open transaction, if there is one. Returns whether `con` is now outside
    any transaction: False when DuckDB refused the ROLLBACK itself (out of memory, say), and
    the caller must try again before its next statement. Raises duckdb.FatalException when the
    failed rollback invalidated the database."""
    try:
        _run(con, "ROLLBACK")
    except duckdb.FatalException:
        raise
    except duckdb.TransactionException as exc:
        # "cannot rollback - no transaction is active": it failed before BEGIN, or was already
        # rolled back.
        return "no transaction is active" in str(exc)
    except duckdb.Error:
        return False
    return True


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def describe(exc: BaseException) -> str:
    """One line saying what `exc` was (DuckDB's messages name their kind already)."""
    line = first_line(exc)
    return line if isinstance(exc, duckdb.Error) or line == type(exc).__name__ else f"{type(exc).__name__}: {line}"
