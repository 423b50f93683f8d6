"""The views file: one DuckDB database, its generations of view tables, and their checkpoints.

Layout of the file:

    _continuum.store        key/value: the stream the file folds (a guard against mixing logs)
    _continuum.generations  one row per (view, generation): version, state (active | building),
                            applied_seq (the checkpoint) and the stream time of that event
    _continuum.fold_errors  events a view could not fold (view, generation, seq, error)
    _continuum.untrusted_views
                            views a commit DuckDB failed half-way touched (projections.fold
                            HalfCommitted): rebuilt from sequence 1, the row deleted by the swap
                            (beside the file, `<file>.untrusted` notes them the moment it happens,
                            so that a crash before the file is open again loses nothing)
    _continuum.fold_crashes, _continuum.fold_suspects
                            records that crashed the process folding them, and records to fold
                            again with care after a crash (projections.crashes; beside the
                            file, `<file>.folding` says what each lane is folding right now and
                            `<file>.faults` what killed the last process: projections.inflight)
    v_<view>_<gen>.*        the tables of one generation of one view
    main.<relation>         what queries see: a SQL view over the active generation's tables

Exactly-once application: a batch's rows and the checkpoints of the generations it was applied
to are committed in one transaction per lane (see projections.fold); records at or below a
checkpoint are skipped. A rebuild fills `building` generations from sequence 1 while the active
ones keep serving, then swaps the public relations over in one transaction (`swap`).

The owner calls every method from one writer thread; the store runs the other lanes on its own
threads, each with its own connection. Query threads get connections from `cursor()`. The
database is opened with external access disabled and its configuration locked, so no
connection can read host files, load extensions or change settings. DuckDB still lets any
connection read this file, its WAL and its temp directory (its storage needs them allowed, and
`disabled_filesystems` would stop the storage too): the query service keeps queries off them
itself (projections.statement, projections.sandbox).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import duckdb

from projections.batch import Batch
from projections.compact import rewrite_views_file
from projections.crashes import LIVE, CrashGuard
from projections.errors import StoreLocked, StoreMismatch
from projections.fold import Applied, Generation, HalfCommitted, Lane, rollback
from projections.memory_share import FoldsFirst
from projections.unsynced import UnsyncedFile, current_boot_id, wal_of
from projections.writeback import DEFAULT_INTERVAL_S, WritebackPacer
from projections.views import VIEWS, ViewSpec

__all__ = ["Applied", "Generation", "Store", "content_hashes", "file_hashes", "generations_in", "open_read_only"]

log = logging.getLogger("continuum.projections.store")

# What holds the queries back while the store is opened again (see FoldsFirst).
REOPENING = "reopening"
# How long `Store.reopen` waits for the last query on an invalidated database to let go.
REOPEN_WAIT_S = 10.0

FORMAT = "1"
_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_META = [
    "CREATE SCHEMA IF NOT EXISTS _continuum",
    "CREATE TABLE IF NOT EXISTS _continuum.store (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
    """CREATE TABLE IF NOT EXISTS _continuum.generations (
        view           VARCHAR NOT NULL,
        generation     INTEGER NOT NULL,
        version        INTEGER NOT NULL,
        state          VARCHAR NOT NULL,   -- active | building | retired (replaced, to be dropped)
        applied_seq    BIGINT NOT NULL,    -- the checkpoint: last stream sequence applied
        applied_us     BIGINT,             -- stream time of that event, microseconds since the epoch
        relations      VARCHAR[] NOT NULL,
        PRIMARY KEY (view, generation))""",
    """CREATE TABLE IF NOT EXISTS _continuum.fold_errors (
        view       VARCHAR NOT NULL,
        generation INTEGER NOT NULL,
        seq        BIGINT NOT NULL,
        error      VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS _continuum.untrusted_views (
        view       VARCHAR PRIMARY KEY,
        reason     VARCHAR NOT NULL,
        noted_at   TIMESTAMPTZ NOT NULL)""",
]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _lanes_paused(method: Callable[Concatenate[Store, _P], _R]) -> Callable[Concatenate[Store, _P], _R]:
    """Run a Store method with every lane paused (see `Store._lanes_held`)."""

    @functools.wraps(method)
    def paused(self: Store, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lanes_held():
            return method(self, *args, **kwargs)

    return paused


class SwappedSince(Exception):
    """A live fold was asked for records read before a rebuild swapped new generations in, or
    before the file was opened again: the generations may be behind those records (read again
    from `applied_seq`)."""


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
        lanes: int = 2,
        fsync: bool = False,
        boot_id: str | None = None,
        archive_dir: str | Path | None = None,
        writeback_interval_s: float = DEFAULT_INTERVAL_S,
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
        # The one directory beyond its own files DuckDB may read (the archive's segments, behind
        # the `archive_events` view the service defines); queries cannot name it themselves.
        self.archive_dir = Path(archive_dir) if archive_dir is not None else None
        self._con: duckdb.DuckDBPyConnection | None = None
        # How the folds and the queries share DuckDB's memory (the queries register with it).
        self.folds_first = FoldsFirst()
        # Whether the last `reopen` asked to rewrite the file did (projections.compact).
        self.rewritten = False
        # How many times `reopen` opened the file again: cursors from before are closed.
        self.incarnation = 0
        # How many times `swap` made building generations active, or `reopen` read them from
        # the file again (see `fold_lane`).
        self.swaps = 0
        # An earlier ROLLBACK DuckDB refused (see fold.rollback): the next BEGIN rolls back first.
        self._unsettled = False
        # Unless asked to fsync every commit, write unsynced where a torn file can be told
        # (projections.unsynced); `boot_id` stands in for this boot's (tests).
        boot = boot_id or (None if fsync else current_boot_id())
        self._unsynced = None if fsync or boot is None else UnsyncedFile(self.path, boot)
        # What is written unsynced goes to disk a little at a time (projections.writeback).
        self._writeback_interval_s = writeback_interval_s
        self.writeback: WritebackPacer | None = None
        # One lane per lane name of the views (see projections.views.LANES), at most `lanes`:
        # with fewer, lane names share connections in turn.
        names = list(dict.fromkeys(spec.lane for spec in views))
        self._lane_count = max(1, min(lanes, len(names)))
        self._lane_of = {spec.name: names.index(spec.lane) % self._lane_count for spec in views}
        self._lane_names = names
        self._lanes: list[Lane] = []
        # Each lane's own thread: the live folds of its views, one batch at a time.
        self._lane_threads: list[ThreadPoolExecutor] = []
        # Held by a lane's live fold; the writer thread takes them all to change generations
        # (build, swap, drop) while no live fold runs.
        self._lane_locks: list[threading.Lock] = []
        # Threads for the writer's own folds of several lanes at once (all lanes held).
        self._lane_pool: ThreadPoolExecutor | None = None
        self.active: dict[str, Generation] = {}
        self.building: dict[str, Generation] = {}
        # Views whose active generation was made by an older VERSION: it keeps serving, frozen
        # at its checkpoint (the new fold may not fit its tables), until the rebuild swaps.
        self.frozen: set[str] = set()
        self._retired: list[Generation] = []
        # Records below this are not expected in the log (aged out): no stream_gap for them.
        self.log_floor = 0
        # What the lanes are folding, and the records known to crash a fold (set by `open`).
        self.crash_guard: CrashGuard | None = None
        # Views a half-way commit left untrusted, view -> why, as the file records them (set by
        # `open`, cleared by the swap of their rebuild); and those noted since, not yet in the
        # file (the database is invalid until `reopen`), also in `<file>.untrusted`.
        self.untrusted: dict[str, str] = {}
        self._noted: dict[str, str] = {}
        self._noted_lock = threading.Lock()
        self._noted_file = self.path.with_name(self.path.name + ".untrusted")
        self._fsync = fsync

    # -- opening and closing ---------------------------------------------------------------

    def open(self) -> list[str]:
        """Open (or create) the file, lock it down, and reconcile its generations with the
        views of this code. Returns the views that need a build from sequence 1 while the
        others keep serving (new views, views whose VERSION changed, and views a half-way commit
        left untrusted: `note_half_commit`).

        Raises StoreLocked if another process has the file open, StoreMismatch if it folds
        another stream.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Python replacement scans read a Python variable a query names: off, so that an unknown
        # plain name in a query is only ever an error (projections.statement relies on it).
        config: dict[str, Any] = {
            "autoinstall_known_extensions": False, "allow_community_extensions": False,
            "python_enable_replacements": False,
        }
        if self._unsynced is not None:
            self._unsynced.set_aside_if_torn()
            self._unsynced.mark()
            config["fsync_mode"] = "NONE"
        if self._memory_limit:
            config["memory_limit"] = self._memory_limit
        if self._threads:
            config["threads"] = self._threads
        try:
            con = duckdb.connect(str(self.path), config=config)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                # (The marker is the other process's now: same boot, same file.)
                raise StoreLocked(
                    f"{self.path} is open in another process ({_lock_holder(str(exc))}): is "
                    "`bus projections run` already running? Stop it, or pass another --db"
                ) from exc
            raise StoreMismatch(f"cannot open {self.path}: {exc}") from exc
        self._con = con
        try:
            if self._unsynced is not None:
                # (After the connect: DuckDB holds the file's lock by now; see projections.writeback.)
                self.writeback = WritebackPacer(
                    self.path, others=(wal_of(self.path),), interval_s=self._writeback_interval_s
                )
                self.writeback.start()
            if self.archive_dir is not None:
                # Before external access is disabled (DuckDB refuses to widen it after).
                self._run(f"SET allowed_directories = [{sql_text(str(self.archive_dir.resolve()) + '/')}]")
                self._run("SET parquet_metadata_cache = true")
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
            self.crash_guard = self._load_crash_guard()  # before unfinished builds are dropped
            stale = self._reconcile()
        except BaseException:
            self.close()
            raise
        self._lanes = [
            Lane(con.cursor(), self.specs, guard=self.crash_guard, slot=i, name=self._lane_name(i),
                 folds_first=self.folds_first)
            for i in range(self._lane_count)
        ]
        self._lane_locks = [threading.Lock() for _ in range(self._lane_count)]
        self._lane_threads = [
            ThreadPoolExecutor(1, thread_name_prefix=f"continuum-lane-{self._lane_names[i]}")
            for i in range(self._lane_count)
        ]
        if self._lane_count > 1:
            self._lane_pool = ThreadPoolExecutor(self._lane_count - 1, thread_name_prefix="continuum-duckdb-lane")
        return stale

    def reopen(self, incarnation: int, *, rewrite: bool = False) -> list[str] | None:
        """Close and open the file again, if it has not been since `incarnation`: after DuckDB
        invalidated the database (StoreInvalidated), what was committed is in the file and a new
        DuckDB instance goes on from it. Every cursor of the old one is closed with it. A rebuild
        in progress is dropped (its generations are `building`). Call it on the writer thread,
        while no new fold starts (one running is waited for). Returns None if it had been
        reopened already, else the views to build (as `open`: among them any a half-way commit
        left untrusted, `note_half_commit`). With `rewrite`, the closed file is first copied
        into a fresh one without its freed blocks (projections.compact: after a forget). Raises
        StoreLocked, StoreMismatch, duckdb.Error (as `open`)."""
        if incarnation != self.incarnation:
            return None
        # DuckDB hands out the old (invalidated) instance while a query on it still runs: stop
        # the queries, wait for the last to let go, and hold new ones back (until the caller
        # has new query cursors: `folds_first.folded(REOPENING)`).
        self.folds_first.short(REOPENING)
        self.close()
        # (Once no lane folds: closed.) What this process knew of the generations goes with the
        # old instance, the file says what holds: a rebuild's `building` ones are dropped by
        # `open` (Runner.rebuild sees the incarnation change and gives up).
        self.active, self.building, self.frozen, self._retired = {}, {}, set(), []
        self.rewritten = False
        if rewrite:
            try:
                rewrite_views_file(self.path, wait_s=REOPEN_WAIT_S)
                self.rewritten = True
            except StoreLocked as exc:
                log.error("the views file could not be rewritten (%s): it is opened as it is", exc)
        deadline = time.monotonic() + REOPEN_WAIT_S
        while True:
            try:
                stale = self.open()
                break
            except duckdb.FatalException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.incarnation += 1
        self.swaps += 1  # (lost deferred checkpoints, rebuilt or untrusted views: read again)
        return stale

    def close(self) -> None:
        """Close the file (checkpointing DuckDB's WAL). Safe to call twice, and after DuckDB
        invalidated the database."""
        pool, self._lane_pool = self._lane_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        threads, self._lane_threads = self._lane_threads, []
        for thread in threads:
            thread.shutdown(wait=True)
        for lane in self._lanes:
            try:
                lane.save_checkpoints()
            except duckdb.Error as exc:
                log.warning("could not write deferred checkpoints (they are folded again at the next start): %s", exc)
            with contextlib.suppress(duckdb.Error):
                lane.con.close()
        self._lanes = []
        guard, self.crash_guard = self.crash_guard, None
        if guard is not None:
            guard.close()
        con, self._con = self._con, None
        pacer, self.writeback = self.writeback, None
        if pacer is not None:
            pacer.stop()  # no sync while DuckDB closes the file
        if con is not None:
            with contextlib.suppress(duckdb.Error):  # (invalidated: there is nothing left to write)
                con.close()
        if pacer is not None:
            pacer.close()  # only now: closing its descriptor drops DuckDB's lock on the file
        if con is not None and self._unsynced is not None:
            self._unsynced.release()

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
        """The checkpoint of the active views: every event up to it is applied (frozen views
        are behind it until their rebuild swaps; when every view is frozen, theirs)."""
        gens = self._live() or list(self.active.values())
        return min((g.applied_seq for g in gens), default=0)

    @property
    def lane_count(self) -> int:
        return self._lane_count

    def lane_views(self, lane: int) -> list[str]:
        """The views lane `lane` folds."""
        return [name for name, index in self._lane_of.items() if index == lane]

    def lane_thread(self, lane: int) -> ThreadPoolExecutor:
        """The thread `fold_lane(lane, ...)` must run on."""
        return self._lane_threads[lane]

    @contextlib.contextmanager
    def _lanes_held(self) -> Iterator[None]:
        """Every lane paused: no live fold runs until the block ends (a fold in progress is
        waited for). Lanes are always taken in order, and a lane thread takes only its own."""
        with contextlib.ExitStack() as held:
            for lock in self._lane_locks:
                held.enter_context(lock)
            yield

    def settled_applied_seq(self) -> int:
        """`applied_seq`, once no live fold is in progress (a fold whose caller went away still
        finishes, and its commit counts)."""
        with self._lanes_held():
            return self.applied_seq

    def _live(self) -> list[Generation]:
        return [g for name, g in self.active.items() if name not in self.frozen]

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
        noted = self._noted_untrusted()
        self._begin()
        try:
            for gen in gens:
                if gen.state in ("building", "retired"):
                    log.info("dropping %s generation %d of %s", gen.state, gen.generation, gen.view)
                    self._drop(gen)
                elif gen.view not in self.specs:
                    log.warning("dropping view %s: no module defines it any more", gen.view)
                    self._drop(gen, public=True)
                else:
                    self.active[gen.view] = gen
            stale = [n for n, s in self.specs.items() if n not in self.active or self.active[n].version != s.version]
            untrusted = self._record_untrusted(noted)
            fresh = self.applied_seq == 0
            for name in stale if fresh else ():
                old = self.active.pop(name, None)
                if old is not None:
                    self._drop(old)
                self.active[name] = self._create(name, state="active", seq=0)
                untrusted.pop(name, None)  # (empty from sequence 1 on: nothing left to distrust)
            self._run("DELETE FROM _continuum.untrusted_views WHERE NOT list_contains(?, view)", [list(untrusted)])
            for gen in self.active.values():
                self._publish(gen)
            self._run("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._forget_noted(noted)
        self.untrusted = untrusted
        if untrusted:
            log.error("views %s are not trusted (%s): rebuilding them from seq 1 while they serve what they hold",
                      ", ".join(sorted(untrusted)), "; ".join(sorted(set(untrusted.values()))))
        # Untrusted views are rebuilt even when the others start from nothing (`fresh` can be
        # a lane whose checkpoints were all deferred, at a reopen: the others are not empty).
        stale = [] if fresh else stale
        stale += [name for name in untrusted if name not in stale]
        self.frozen = {name for name in stale if name in self.active}
        return stale

    # -- half-way commits -----------------------------------------------------------------

    def note_half_commit(self, views: Iterable[str], why: str) -> None:
        """Record that a commit touching `views` failed half-way (projections.fold
        HalfCommitted), so that the next `open` (or `reopen`) rebuilds them from sequence 1:
        in memory, and in `<file>.untrusted` at once (the database cannot be written before it
        is opened again). Safe from any lane's thread. Raises nothing: should the note not be
        written (disk full), this process still knows (logged)."""
        reasons = {view: why for view in views}
        with self._noted_lock:
            self._noted.update(reasons)
            try:
                with open(self._noted_file, "a", encoding="utf-8") as out:
                    for view, reason in reasons.items():
                        out.write(json.dumps({"view": view, "reason": reason}) + "\n")
                    out.flush()
                    if self._fsync:
                        os.fsync(out.fileno())
            except OSError as exc:
                log.error("could not write %s (%s): a restart before the views file is open again "
                          "would not rebuild %s", self._noted_file, exc, ", ".join(reasons))

    def _noted_untrusted(self) -> dict[str, str]:
        """Views noted untrusted and not yet in the file: `<file>.untrusted` (a process that
        ended before it opened the file again wrote it) and this process's own notes."""
        noted: dict[str, str] = {}
        with self._noted_lock:
            try:
                lines = self._noted_file.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                lines = []
            for line in lines:
                try:
                    entry = json.loads(line)
                    noted[str(entry["view"])] = str(entry["reason"])
                except (ValueError, KeyError, TypeError):
                    # A line torn by a crash while it was written: its view cannot be known, so
                    # every view is distrusted (a rebuild too many costs time, one too few
                    # leaves a view wrong).
                    noted.update((view, "a half-way commit (its note is torn)") for view in self.specs)
            noted.update(self._noted)
        return noted

    def _record_untrusted(self, noted: dict[str, str]) -> dict[str, str]:
        """Write `noted` into `_continuum.untrusted_views` (in the caller's transaction) and
        return every active view the table names, view -> why; forgets views no module defines."""
        for view, reason in noted.items():
            if view in self.specs:
                self._run("INSERT INTO _continuum.untrusted_views VALUES (?, ?, now()) ON CONFLICT DO NOTHING",
                          [view, reason])
        self._run("DELETE FROM _continuum.untrusted_views WHERE NOT list_contains(?, view)", [list(self.active)])
        return {str(view): str(reason) for view, reason in self._rows(
            "SELECT view, reason FROM _continuum.untrusted_views ORDER BY view")}

    def _forget_noted(self, noted: dict[str, str]) -> None:
        """`noted` is in the file now: drop the notes beside it (unless more came meanwhile)."""
        if not noted:
            return
        with self._noted_lock:
            for view in noted:
                if self._noted.get(view) == noted[view]:
                    del self._noted[view]
            if self._noted:
                return  # (noted again since: the next open records them)
            try:
                self._noted_file.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s (%s): its views are rebuilt once more at the next start",
                            self._noted_file, exc)

    @_lanes_paused
    def define_relation(self, name: str, select: str) -> None:
        """Make `main.<name>` the view `select` (trusted SQL of the service's own, e.g. the
        archive's segments), replacing any earlier definition. Raises ValueError for a name
        that is not a lower-case identifier or is a view's relation, duckdb.Error."""
        if not _IDENT.match(name) or any(name in spec.relations for spec in self.specs.values()):
            raise ValueError(f"{name!r} cannot be defined: not an identifier, or a view's own relation")
        self._run(f'CREATE OR REPLACE VIEW main."{name}" AS {select}')

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
        self._run("DELETE FROM _continuum.fold_errors WHERE view = ? AND generation = ?", [gen.view, gen.generation])

    def _publish(self, gen: Generation) -> None:
        for relation, select in self.specs[gen.view].public(gen.schema).items():
            self._run(f'CREATE OR REPLACE VIEW main."{relation}" AS {select}')

    @_lanes_paused
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

    @_lanes_paused
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
        """Make every `building` generation active, in one transaction; the ones they replace
        are retired (dropped by `drop_retired`, or at the next open). Queries already running
        keep their snapshot of the old tables."""
        retired: list[Generation] = []
        self._begin()
        try:
            for name, gen in self.building.items():
                old = self.active.get(name)
                if old is not None:
                    self._run(
                        "UPDATE _continuum.generations SET state = 'retired' WHERE view = ? AND generation = ?",
                        [old.view, old.generation],
                    )
                    retired.append(old)
                self._run(
                    "UPDATE _continuum.generations SET state = 'active' WHERE view = ? AND generation = ?",
                    [gen.view, gen.generation],
                )
                self._publish(gen)
            # The rebuilt generations replace what a half-way commit left (with the swap, so a
            # crash can never leave the views trusted before their rebuild is in).
            self._run("DELETE FROM _continuum.untrusted_views WHERE list_contains(?, view)", [list(self.building)])
            self._run("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self.swaps += 1
        for name, gen in self.building.items():
            self.untrusted.pop(name, None)
            gen.state = "active"
            self.active[name] = gen
            self.frozen.discard(name)
        self.building = {}
        self._retired.extend(retired)

    @_lanes_paused
    def drop_retired(self) -> None:
        """Drop the tables of generations replaced by a swap (cleanup, after the swap itself:
        dropping a million rows' tables takes a while and needs no hurry)."""
        retired, self._retired = self._retired, []
        if not retired:
            return
        self._begin()
        try:
            for gen in retired:
                self._drop(gen)
            self._run("COMMIT")
        except BaseException:
            self._rollback()
            self._retired = retired + self._retired
            raise

    # -- folding --------------------------------------------------------------------------

    @_lanes_paused
    def apply(self, batch: Batch) -> Applied:
        """Apply the records of `batch` above the active checkpoint to every active view (not
        frozen) and advance their checkpoints, exactly once: all lanes at once, from the
        calling thread. Raises FoldError."""
        live = self._live()
        if not live:
            return Applied(last_seq=self.applied_seq)
        applied = self._fold_lanes(live, batch, upto=None)
        return Applied(applied.events, self.applied_seq, applied.rows, applied.poisoned)

    @_lanes_paused
    def apply_build(self, batch: Batch) -> Applied:
        """Apply the records of `batch` between the building checkpoint and the active one to
        the building views; swap them in as soon as they reach the active checkpoint."""
        if not self.building:
            return Applied()
        applied = self._fold_lanes(list(self.building.values()), batch, upto=self.applied_seq)
        if self.build_seq >= self.applied_seq:
            self.swap()
            return Applied(applied.events, self.applied_seq, applied.rows, applied.poisoned, swapped=True)
        return Applied(applied.events, self.build_seq, applied.rows, applied.poisoned)

    @_lanes_paused
    def catch_up_build(self) -> bool:
        """Swap at once if the building views are already at the active checkpoint (e.g. an
        empty log). Returns True when it swapped."""
        if self.building and self.build_seq >= self.applied_seq:
            self.swap()
            return True
        return False

    def fold_lane(self, lane: int, batch: Batch, swaps: int | None = None) -> Applied:
        """Apply the records of `batch` above their checkpoint to the live views of one lane, on
        that lane's connection, exactly once; the other lanes go on meanwhile. Call it on
        `lane_thread(lane)`. `last_seq` is the lane's checkpoint after it (with no live view
        in the lane: `applied_seq`, the store's). `swaps`: `self.swaps` when the records' reader
        started. Raises FoldError, SwappedSince (a rebuild swapped in since: its generations can
        be behind the records, and would silently skip what lies between)."""
        with self._lane_locks[lane]:
            if swaps is not None and swaps != self.swaps:
                raise SwappedSince(f"a rebuild swapped in since seq {batch.first_seq} was read")
            gens = [g for g in self._live() if self._lane_of[g.view] == lane]
            if not gens:
                return Applied(last_seq=self.applied_seq)
            applied = self._fold_lanes(gens, batch, upto=None, inline=True)
            return dataclasses.replace(applied, last_seq=min(g.applied_seq for g in gens))

    def _load_crash_guard(self) -> CrashGuard:
        """The crash record of this file (projections.crashes), from what the last process left.
        Raises OSError, duckdb.Error."""
        return CrashGuard.load(
            self.con, self.path, views=list(self.specs), slots=self._lane_count,
            checkpoint=lambda target: self.applied_seq if target == LIVE else self.build_seq,
        )

    def _lane_name(self, lane: int) -> str:
        """The lane names (projections.views.LANES) lane `lane` folds, e.g. `runtime`."""
        return "+".join(name for i, name in enumerate(self._lane_names) if i % self._lane_count == lane)

    def live_views(self, lane: int) -> list[str]:
        """The views lane `lane` folds now (not frozen for a rebuild)."""
        return [name for name in self.lane_views(lane) if name in self.active and name not in self.frozen]

    def _fold_lanes(self, gens: list[Generation], batch: Batch, *, upto: int | None, inline: bool = False) -> Applied:
        """Fold each lane's share of `gens` on that lane's connection, the lanes at once (or,
        `inline`, one after another on this thread); within a lane, each group of views from its
        own checkpoint (after a crash, views can be a batch apart)."""
        work: dict[int, list[tuple[list[Generation], Batch]]] = {}
        shares: dict[tuple[int, int], list[Generation]] = {}
        batch.fold_table()  # (here, once, rather than by each lane at once)
        for gen in gens:
            shares.setdefault((self._lane_of[gen.view], gen.applied_seq), []).append(gen)
        for (lane, done), share in sorted(shares.items()):
            part = batch.window(done, upto)
            if part is not None:
                work.setdefault(lane, []).append((share, part.following(max(done, self.log_floor))))
        if not work:
            return Applied()
        jobs = [functools.partial(self._fold_shares, self._lanes[lane], shares_of) for lane, shares_of in work.items()]
        pool = None if inline else self._lane_pool
        futures: list[Future[Applied]] = [pool.submit(job) for job in jobs[1:]] if pool is not None else []
        results: list[Applied] = []
        failure: BaseException | None = None
        for job in jobs if pool is None else jobs[:1]:
            try:
                results.append(job())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other lanes
                failure = failure or exc
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failure = failure or exc
        if failure is not None:
            raise failure
        total = results[0]
        for result in results[1:]:
            total = total.merge(result)
        return total

    def _fold_shares(self, lane: Lane, shares: list[tuple[list[Generation], Batch]]) -> Applied:
        total = Applied()
        for share, part in shares:
            try:
                applied = lane.fold(share, part)
            except HalfCommitted as exc:
                # Noted at once, on the lane's thread: the runner opens the file again next, and
                # a crash meanwhile must not lose it. A rebuild's generations need no note: the
                # reopen drops them, and the rebuild is asked again.
                if not exc.building:
                    self.note_half_commit(exc.views, f"a commit of seq {exc.first_seq}..{exc.last_seq} failed half-way")
                raise
            total = total.merge(applied)
        return total

    # -- reading (status, hashes) ---------------------------------------------------------

    def generations(self) -> list[Generation]:
        """Every generation, active ones first."""
        return [*self.active.values(), *self.building.values()]

    @_lanes_paused
    def content_hashes(self) -> dict[str, str]:
        """A hash of every table of every active view (see `content_hashes`)."""
        return content_hashes(self.con, self.active.values())

    # -- helpers --------------------------------------------------------------------------

    def _run(self, sql: str, params: list[Any] | None = None) -> None:
        (self.con.execute(sql, params) if params is not None else self.con.execute(sql)).fetchall()

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        return (self.con.execute(sql, params) if params is not None else self.con.execute(sql)).fetchall()

    def _begin(self) -> None:
        if self._unsettled:  # an earlier ROLLBACK was refused: that transaction is still open
            self._rollback()
        self._run("BEGIN TRANSACTION")

    def _rollback(self) -> None:
        self._unsettled = not rollback(self.con)


def sql_text(value: str) -> str:
    """`value` as a SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


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
        return content_hashes(con, _active_in(con, path))
    finally:
        con.close()


def file_checkpoints(path: str | Path) -> dict[str, int]:
    """Each active view's checkpoint in a views file no process holds. Raises StoreLocked when
    a service holds it."""
    con = open_read_only(path)
    try:
        return {g.view: g.applied_seq for g in _active_in(con, path)}
    finally:
        con.close()


def _active_in(con: duckdb.DuckDBPyConnection, path: str | Path) -> list[Generation]:
    return [g for g in generations_in(con, path) if g.state == "active"]


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
