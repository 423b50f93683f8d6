"""The views file: one DuckDB database, its generations of view tables, and their checkpoints.

Layout of the file:

    _continuum.store        key/value: the stream the file folds (a guard against mixing logs)
    _continuum.generations  one row per (view, generation): version, state (active | building),
                            applied_seq (the checkpoint) and the stream time of that event
    v_<view>_<gen>.*        the tables of one generation of one view
    main.<relation>         what queries see: a SQL view over the active generation's tables

Exactly-once application: a batch's rows and the checkpoints of the generations it was applied
to are committed in one transaction; records at or below a checkpoint are skipped. A rebuild
fills a `building` generation from sequence 1 while the active one keeps serving, then swaps
the public relations over in one transaction (`swap`).

Not thread-safe: the owner calls every method from one writer thread. Query threads get their
own connections from `cursor()`; the database is opened with external access disabled and its
configuration locked, so no connection can read host files, load extensions or change settings.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from projections.batch import Batch
from projections.errors import FoldError, StoreLocked, StoreMismatch
from projections.views import VIEWS, Tx, ViewSpec

log = logging.getLogger("continuum.projections.store")

FORMAT = "1"
_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Errors a batch's own content can cause; anything else (disk, memory) is not the data's fault.
_DATA_ERRORS: tuple[type[duckdb.Error], ...] = (
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
    duckdb.ConstraintException,
)
_META = [
    "CREATE SCHEMA IF NOT EXISTS _continuum",
    "CREATE TABLE IF NOT EXISTS _continuum.store (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
    """CREATE TABLE IF NOT EXISTS _continuum.generations (
        view           VARCHAR NOT NULL,
        generation     INTEGER NOT NULL,
        version        INTEGER NOT NULL,
        state          VARCHAR NOT NULL,   -- active | building
        applied_seq    BIGINT NOT NULL,    -- the checkpoint: last stream sequence applied
        applied_us     BIGINT,             -- stream time of that event, microseconds since the epoch
        relations      VARCHAR[] NOT NULL,
        PRIMARY KEY (view, generation))""",
]


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
    """What one call to `apply`/`apply_build` did."""

    events: int = 0
    last_seq: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    poisoned: int = 0  # records whose fold failed on their content (marked in `events.error`)
    swapped: bool = False


class Store:
    """Owns the DuckDB views file. See the module docstring for its layout and guarantees."""

    def __init__(
        self,
        path: str | Path,
        *,
        stream: str,
        views: Sequence[ViewSpec] = VIEWS,
        memory_limit: str | None = None,
        threads: int | None = None,
        checkpoint_threshold: str = "256MB",
    ) -> None:
        for spec in views:
            if not _IDENT.match(spec.name) or any(not _IDENT.match(r) for r in spec.relations):
                raise ValueError(f"view {spec.name!r}: names must be lower-case identifiers")
        self.path = Path(path)
        self.stream = stream
        self.specs = {spec.name: spec for spec in views}
        self._memory_limit = memory_limit
        self._threads = threads
        self._checkpoint_threshold = checkpoint_threshold
        self._con: duckdb.DuckDBPyConnection | None = None
        self.active: dict[str, Generation] = {}
        self.building: dict[str, Generation] = {}
        # Records below this are not expected in the log (aged out): no stream_gap for them.
        self.log_floor = 0

    # -- opening and closing ---------------------------------------------------------------

    def open(self) -> list[str]:
        """Open (or create) the file, lock it down, and reconcile its generations with the
        views of this code. Returns the views that need a build from sequence 1 while the
        others keep serving (new views, or views whose VERSION changed).

        Raises StoreLocked if another process has the file open, StoreMismatch if it folds
        another stream.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"autoinstall_known_extensions": False, "allow_community_extensions": False}
        if self._memory_limit:
            config["memory_limit"] = self._memory_limit
        if self._threads:
            config["threads"] = self._threads
        try:
            con = duckdb.connect(str(self.path), config=config)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise StoreLocked(
                    f"{self.path} is open in another process ({_lock_holder(str(exc))}): is "
                    "`bus projections run` already running? Stop it, or pass another --db"
                ) from exc
            raise StoreMismatch(f"cannot open {self.path}: {exc}") from exc
        self._con = con
        try:
            for statement in (
                # Checkpoint the WAL into the file less often than DuckDB's 16MB default: batches
                # of 10k events write several MB each, and a checkpoint per batch halves the fold rate.
                f"SET checkpoint_threshold = '{self._checkpoint_threshold}'",
                "SET GLOBAL TimeZone = 'UTC'",
                "SET enable_external_access = false",
                "SET autoload_known_extensions = false",
                "SET lock_configuration = true",
            ):
                self._run(statement)
            for statement in _META:
                self._run(statement)
            self._check_stream()
            return self._reconcile()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (checkpointing DuckDB's WAL). Safe to call twice."""
        con, self._con = self._con, None
        if con is not None:
            con.close()

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise RuntimeError("the store is not open")
        return self._con

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database, for a query thread."""
        return self.con.cursor()

    @property
    def applied_seq(self) -> int:
        """The checkpoint of the active views: every event up to it is applied."""
        return min((g.applied_seq for g in self.active.values()), default=0)

    @property
    def build_seq(self) -> int:
        return min((g.applied_seq for g in self.building.values()), default=0)

    @property
    def applied_us(self) -> int | None:
        return max((g.applied_us or 0 for g in self.active.values()), default=0) or None

    def _check_stream(self) -> None:
        rows = self._rows("SELECT value FROM _continuum.store WHERE key = 'stream'")
        if not rows:
            self._run("INSERT INTO _continuum.store VALUES ('stream', ?), ('format', ?)", [self.stream, FORMAT])
        elif rows[0][0] != self.stream:
            raise StoreMismatch(
                f"{self.path} holds views of stream {rows[0][0]}, not {self.stream}: pass the "
                "matching --namespace, or another --db for this one"
            )

    def _reconcile(self) -> list[str]:
        gens = [Generation(*row[:6], relations=list(row[6])) for row in self._rows(
            "SELECT view, generation, version, state, applied_seq, applied_us, relations "
            "FROM _continuum.generations ORDER BY view, generation"
        )]
        self._begin()
        try:
            for gen in gens:
                if gen.state == "building":
                    log.info("dropping unfinished rebuild of %s (generation %d)", gen.view, gen.generation)
                    self._drop(gen)
                elif gen.view not in self.specs:
                    log.warning("dropping view %s: no module defines it any more", gen.view)
                    self._drop(gen, public=True)
                else:
                    self.active[gen.view] = gen
            stale = [n for n, s in self.specs.items() if n not in self.active or self.active[n].version != s.version]
            fresh = self.applied_seq == 0
            for name in stale if fresh else ():
                old = self.active.pop(name, None)
                if old is not None:
                    self._drop(old)
                self.active[name] = self._create(name, state="active", seq=0)
            for gen in self.active.values():
                self._publish(gen)
            self._run("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return [] if fresh else stale

    # -- generations ----------------------------------------------------------------------

    def _create(self, name: str, *, state: str, seq: int) -> Generation:
        spec = self.specs[name]
        number = 1 + max((r[0] for r in self._rows(
            "SELECT coalesce(max(generation), 0) FROM _continuum.generations WHERE view = ?", [name]
        )), default=0)
        gen = Generation(name, number, spec.version, state, seq, None, sorted(spec.relations))
        self._run(f"CREATE SCHEMA {gen.schema}")
        for statement in spec.ddl(gen.schema):
            self._run(statement)
        self._run(
            "INSERT INTO _continuum.generations VALUES (?, ?, ?, ?, ?, NULL, ?)",
            [gen.view, gen.generation, gen.version, gen.state, gen.applied_seq, gen.relations],
        )
        return gen

    def _drop(self, gen: Generation, *, public: bool = False) -> None:
        if public:
            for relation in gen.relations:
                self._run(f'DROP VIEW IF EXISTS main."{relation}"')
        self._run(f"DROP SCHEMA IF EXISTS {gen.schema} CASCADE")
        self._run("DELETE FROM _continuum.generations WHERE view = ? AND generation = ?", [gen.view, gen.generation])

    def _publish(self, gen: Generation) -> None:
        for relation, select in self.specs[gen.view].public(gen.schema).items():
            self._run(f'CREATE OR REPLACE VIEW main."{relation}" AS {select}')

    def start_build(self, names: Iterable[str]) -> list[str]:
        """Create empty `building` generations of `names` (all views when empty), to be filled
        by `apply_build` from sequence 1. Raises ValueError for an unknown view name."""
        names = sorted(set(names) or self.specs)
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            raise ValueError(f"unknown view(s) {', '.join(unknown)}; known: {', '.join(sorted(self.specs))}")
        if self.building:
            raise RuntimeError("a build is already in progress")
        self._begin()
        try:
            for name in names:
                self.building[name] = self._create(name, state="building", seq=0)
            self._run("COMMIT")
        except BaseException:
            self._rollback()
            self.building.clear()
            raise
        return names

    def abandon_build(self) -> None:
        """Drop the `building` generations (the active ones are untouched)."""
        if not self.building:
            return
        self._begin()
        try:
            for gen in self.building.values():
                self._drop(gen)
            self._run("COMMIT")
        except BaseException:
            self._rollback()
            raise
        finally:
            self.building.clear()

    def swap(self) -> None:
        """Make every `building` generation active, in one transaction, and drop the ones they
        replace. Queries already running keep their snapshot of the old tables."""
        self._begin()
        try:
            for name, gen in self.building.items():
                old = self.active.get(name)
                if old is not None:
                    self._drop(old)
                self._run(
                    "UPDATE _continuum.generations SET state = 'active' WHERE view = ? AND generation = ?",
                    [gen.view, gen.generation],
                )
                self._publish(gen)
            self._run("COMMIT")
        except BaseException:
            self._rollback()
            raise
        for name, gen in self.building.items():
            gen.state = "active"
            self.active[name] = gen
        self.building = {}

    # -- folding --------------------------------------------------------------------------

    def apply(self, batch: Batch) -> Applied:
        """Apply the records of `batch` above the active checkpoint to every active view, and
        advance the checkpoint, in one transaction. Raises FoldError (nothing committed)."""
        seq = self.applied_seq
        part = batch.window(seq)
        if part is None:
            return Applied(last_seq=seq)
        return self._fold_robust(list(self.active.values()), _after(part, max(seq, self.log_floor)))

    def apply_build(self, batch: Batch) -> Applied:
        """Apply the records of `batch` between the building checkpoint and the active one to
        the building views; swap them in as soon as they reach the active checkpoint."""
        if not self.building:
            return Applied()
        done = self.build_seq
        part = batch.window(done, self.applied_seq)
        applied = Applied(last_seq=done)
        if part is not None:
            applied = self._fold_robust(list(self.building.values()), _after(part, max(done, self.log_floor)))
        if self.build_seq >= self.applied_seq:
            self.swap()
            return Applied(applied.events, applied.last_seq, applied.rows, applied.poisoned, swapped=True)
        return applied

    def catch_up_build(self) -> bool:
        """Swap at once if the building views are already at the active checkpoint (e.g. an
        empty log). Returns True when it swapped."""
        if self.building and self.build_seq >= self.applied_seq:
            self.swap()
            return True
        return False

    def _fold_robust(self, gens: list[Generation], batch: Batch) -> Applied:
        """Fold `batch`; when it fails on its content, find the culprit by halving. The culprit
        is folded into the views that can take it; the ones that cannot (and `events`, which
        keeps the reason in its `error` column) see it with `error` set, which folds skip. One
        bad event never stops the views, deterministically: it fails the same way in a rebuild."""
        try:
            return self._fold(gens, batch)
        except _DataError as failure:
            if batch.size == 1:
                return self._fold_poisoned(gens, batch, failure)
        half = batch.size // 2
        first = self._fold_robust(gens, _window(batch, batch.after_seq, batch.seqs[half - 1]))
        second = self._fold_robust(gens, _window(batch, batch.seqs[half - 1], None))
        rows = {k: first.rows.get(k, 0) + second.rows.get(k, 0) for k in {*first.rows, *second.rows}}
        return Applied(first.events + second.events, second.last_seq, rows, first.poisoned + second.poisoned)

    def _fold_poisoned(self, gens: list[Generation], batch: Batch, failure: "_DataError") -> Applied:
        failing: dict[str, str] = {}
        while True:
            failing[failure.view] = _first_line(failure.cause)
            reason = "; ".join(f"fold of view {view} failed: {why}" for view, why in failing.items())
            log.warning("event %d cannot be folded (%s)", batch.first_seq, reason)
            try:
                done = self._fold(gens, batch, marked=_mark(batch, reason), marked_for={*failing, "events"})
            except _DataError as again:
                if again.view in failing:
                    raise FoldError(
                        f"view {again.view} cannot fold seq {batch.first_seq} even with its error set: {again.cause}"
                    ) from again.cause
                failure = again
                continue
            return Applied(done.events, done.last_seq, done.rows, 1)

    def _fold(
        self, gens: list[Generation], batch: Batch, *, marked: Batch | None = None, marked_for: set[str] = frozenset()
    ) -> Applied:
        con = self.con
        tx = Tx(con)
        registered: Batch | None = None
        try:
            self._begin()
            rows: dict[str, int] = {}
            try:
                for gen in gens:
                    wanted = marked if marked is not None and gen.view in marked_for else batch
                    if wanted is not registered:
                        con.register("batch", wanted.table)
                        registered = wanted
                    try:
                        rows[gen.view] = self.specs[gen.view].fold(tx, gen.schema, wanted)
                    except _DATA_ERRORS as exc:
                        raise _DataError(gen.view, exc) from exc
                applied_us = batch.last_time_ns // 1000
                self._run(
                    "UPDATE _continuum.generations SET applied_seq = ?, applied_us = ? WHERE state = ?",
                    [batch.last_seq, applied_us, gens[0].state],
                )
                self._run("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except _DataError:
            raise
        except duckdb.Error as exc:
            raise FoldError(f"could not apply seq {batch.first_seq}..{batch.last_seq}: {exc}") from exc
        finally:
            if registered is not None:
                con.unregister("batch")
        for gen in gens:
            gen.applied_seq = batch.last_seq
            gen.applied_us = applied_us
        return Applied(events=batch.size, last_seq=batch.last_seq, rows=rows)

    # -- reading (status, hashes) ---------------------------------------------------------

    def generations(self) -> list[Generation]:
        """Every generation, active ones first."""
        return [*self.active.values(), *self.building.values()]

    def content_hashes(self) -> dict[str, str]:
        """A hash of every table of every active view (see `content_hashes`)."""
        return content_hashes(self.con, self.active.values())

    # -- helpers --------------------------------------------------------------------------

    def _run(self, sql: str, params: list[Any] | None = None) -> None:
        (self.con.execute(sql, params) if params is not None else self.con.execute(sql)).fetchall()

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        return (self.con.execute(sql, params) if params is not None else self.con.execute(sql)).fetchall()

    def _begin(self) -> None:
        self._run("BEGIN TRANSACTION")

    def _rollback(self) -> None:
        try:
            self._run("ROLLBACK")
        except duckdb.Error:
            pass  # no transaction open (it failed before BEGIN, or was already rolled back)


class _DataError(Exception):
    def __init__(self, view: str, cause: duckdb.Error) -> None:
        super().__init__(f"{view}: {cause}")
        self.view = view
        self.cause = cause


def _after(batch: Batch, after_seq: int) -> Batch:
    if batch.after_seq == after_seq:
        return batch
    return dataclasses.replace(batch, after_seq=after_seq)


def _window(batch: Batch, after: int, upto: int | None) -> Batch:
    part = batch.window(after, upto)
    assert part is not None
    return part


def _mark(batch: Batch, error: str) -> Batch:
    table = batch.table.set_column(
        batch.table.schema.get_field_index("error"), "error", pa.array([error] * batch.size, pa.string())
    )
    return dataclasses.replace(batch, table=table)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _lock_holder(message: str) -> str:
    match = re.search(r"PID (\d+)", message)
    return f"pid {match.group(1)}" if match else "another process"


def content_hashes(con: duckdb.DuckDBPyConnection, gens: Iterable[Generation]) -> dict[str, str]:
    """`"<view>.<table>" -> "<rows>:<md5>"` for every table of `gens`: the md5 over the sorted
    md5s of its rows rendered as text, so equal contents give equal hashes whatever the row
    order. The stored tables are hashed, not the public relations, which may depend on the clock.
    Used to check that rebuilt views equal incrementally built ones."""
    out: dict[str, str] = {}
    for gen in gens:
        tables = con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? ORDER BY table_name", [gen.schema]
        ).fetchall()
        for (table,) in tables:
            rows, digest = con.execute(
                "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') "
                f'FROM (SELECT md5(CAST(t AS VARCHAR)) AS h FROM {gen.schema}."{table}" AS t)'
            ).fetchall()[0]
            out[f"{gen.view}.{table}"] = f"{rows}:{digest}"
    return out


def file_hashes(path: str | Path) -> dict[str, str]:
    """`content_hashes` of the active views in a views file no process holds (opened read-only).
    Raises StoreLocked when a service holds it."""
    con = open_read_only(path)
    try:
        con.execute("SET TimeZone = 'UTC'").fetchall()
        gens = [g for g in generations_in(con, path) if g.state == "active"]
        return content_hashes(con, gens)
    finally:
        con.close()


def open_read_only(path: str | Path) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise StoreLocked(f"{path} is open in another process ({_lock_holder(str(exc))})") from exc
        raise StoreMismatch(f"cannot open {path}: {exc}") from exc


def generations_in(con: duckdb.DuckDBPyConnection, path: str | Path) -> list[Generation]:
    try:
        rows = con.execute(
            "SELECT view, generation, version, state, applied_seq, applied_us, relations "
            "FROM _continuum.generations ORDER BY state, view, generation"
        ).fetchall()
    except duckdb.CatalogException as exc:
        raise StoreMismatch(f"{path} is not a views file") from exc
    return [Generation(*row[:6], relations=list(row[6])) for row in rows]
