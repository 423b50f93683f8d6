"""The projection service: the one process that owns the views file. It keeps the views current
and answers, over the bus, read-only SQL queries, status and rebuild requests.

    async with ProjectionService(bus, settings) as service:
        ...  # until the block exits; a failure of the fold cancels the block and is raised

Queries arrive by core NATS request/reply on `bus.subjects.query` in a queue group (several
services with their own files share the load), run on a small pool of threads with their own
DuckDB connections, and never touch the writer thread. A query with `min_seq` first waits
(bounded) for the watermark to pass that sequence.

Shutdown is ordered and bounded: stop taking requests, interrupt running queries, cancel the
fold (the batch being committed finishes), close the DuckDB file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import duckdb
import msgspec
from prometheus_client import CollectorRegistry

from bus.errors import BusError
from bus.transport import Inbound
from projections import sandbox
from projections.archive.reader import ArchiveView
from projections.archive.view import NAME as ARCHIVE_VIEW
from projections.config import ProjectionSettings
from projections.errors import ArchiveError, RebuildError, StoreMismatch
from projections.fold import retry_delay
from projections.metrics import ProjectionMetrics
from projections.progress import Watermark
from projections.protocol import (
    ControlFailure,
    RebuildOk,
    RebuildReport,
    RebuildRequest,
    StatusOk,
    StatusReport,
    ServiceHello,
    rebuild_subject,
    roll_call_subject,
    status_subject,
)
from projections.query import QueryExecutor, warm_up
from projections.relations import RelationReader
from projections.runner import Runner, Writer
from projections.status import build_report, collect
from projections.store import Store
from projections.views import VIEWS, ViewSpec
from schemas.limits import refusal
from schemas.query import QueryFailure, QueryRequest, QueryResult, failure

if TYPE_CHECKING:
    from bus import Bus

log = logging.getLogger("continuum.projections.service")

_request_decoder = msgspec.json.Decoder(QueryRequest)
_rebuild_decoder = msgspec.json.Decoder(RebuildRequest)


def _to_json(value: Any) -> Any:
    """Values DuckDB may return that JSON has no type for (intervals, big decimals...): as text."""
    return str(value)


_encoder = msgspec.json.Encoder(enc_hook=_to_json, decimal_format="number")


class ProjectionService:
    """Folds the log into the views file and answers queries about it. An async context manager."""

    def __init__(
        self,
        bus: Bus,
        settings: ProjectionSettings,
        *,
        registry: CollectorRegistry | None = None,
        views: tuple[ViewSpec, ...] = VIEWS,
    ) -> None:
        self._bus = bus
        self._settings = settings
        self.metrics = ProjectionMetrics(registry or CollectorRegistry())
        self._views = views
        self._view_of_relation = {relation: spec.name for spec in views for relation in spec.relations}
        self._relations: RelationReader | None = None
        self.watermark = Watermark()
        self._stack = contextlib.AsyncExitStack()
        self._executors: list[QueryExecutor] = []
        self._idle: asyncio.Queue[QueryExecutor] = asyncio.Queue()
        self._slots = asyncio.Semaphore(settings.query.max_concurrent)
        self._subscriptions: list[Any] = []
        self._tasks: asyncio.TaskGroup | None = None
        self._background: list[asyncio.Task[Any]] = []
        self.runner: Runner | None = None
        self.store: Store | None = None
        self._writer: Writer | None = None
        self.archive_view: ArchiveView | None = None

    @property
    def applied_seq(self) -> int:
        return self.watermark.seq

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> ProjectionService:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    async def _start(self) -> None:
        bus, settings = self._bus, self._settings
        store = Store(
            settings.db_path, stream=bus.subjects.stream, views=self._views,
            memory_limit=settings.memory_limit, threads=settings.threads, lanes=settings.lanes, fsync=settings.fsync,
            archive_dir=settings.archive_dir,
        )
        writer = Writer(store)
        self._writer = writer
        self._stack.callback(writer.close)
        stale = await writer.call(store.open)
        self._stack.push_async_callback(writer.call, store.close)
        self.store = store
        missed = await self._check_log(writer)
        self.watermark.advance(store.applied_seq)

        if settings.archive_dir is not None:
            await self._open_archive(writer, Path(settings.archive_dir))
        self._executors = await writer.call(self._new_executors, store)
        for executor in self._executors:
            self._idle.put_nowait(executor)
        self._relations = RelationReader()
        self._stack.callback(self._relations.close)
        pool = await self._query_threads()
        self._query_pool = pool
        self._stack.callback(self._close_queries, pool)

        runner = Runner(bus, writer, settings, self.metrics, self.watermark, on_reopened=self._renew_queries,
                        before_rewrite=self._retire_queries)
        self.runner = runner
        self._stack.callback(runner.close)
        self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.push_async_callback(self._stop)
        self._background.append(self._tasks.create_task(runner.run_live(), name="projections-live"))
        self._background.append(self._tasks.create_task(runner.keep_erasing(), name="projections-erase"))
        if stale:
            log.info("views %s are new or changed: building them from seq 1", ", ".join(stale))
            self._background.append(self._tasks.create_task(self._build_stale(stale), name="projections-build"))
        if missed is not None:
            # The live fold takes them from the archive before it reads the log (or says the
            # views lack them): Runner.run_live.
            log.info("records seq %d..%d left the log (trimmed or aged out) before these views applied them",
                     missed[0] + 1, missed[1])

        group = settings.query.queue_group
        transport = bus.transport
        name = settings.service
        # Queries last: a client that got an answer finds status, rebuild and the roll call
        # served too (each subscription is confirmed by a round trip before the next).
        self._subscriptions = [
            await transport.subscribe(status_subject(bus.subjects), self._on_status, queue=group),
            await transport.subscribe(rebuild_subject(bus.subjects), self._on_rebuild, queue=group),
            # This service alone, by name (several may fold the same log, each into its own file).
            await transport.subscribe(status_subject(bus.subjects, name), self._on_status),
            await transport.subscribe(rebuild_subject(bus.subjects, name), self._on_rebuild),
            await transport.subscribe(roll_call_subject(bus.subjects), self._on_roll_call),
            # `<query>.<agent>`: the server lets only that agent's credential (and the admin) send
            # here, so the last token says whose scope the query runs in.
            await transport.subscribe(f"{bus.subjects.query}.*", self._on_query, queue=group, max_pending=100_000),
            await transport.subscribe(bus.subjects.query, self._on_query, queue=group, max_pending=100_000),
        ]
        await transport.flush()
        log.info("projections: %s folded into %s from seq %d; answering queries on %s",
                 bus.subjects.stream, settings.db_path, self.watermark.seq + 1, bus.subjects.query)

    def _new_executors(self, store: Store) -> list[QueryExecutor]:
        """One executor per query worker, each with a cursor for its queries and one to measure
        DuckDB's cache (on the writer thread: DuckDB calls, and its watchdog thread is started
        from an unsandboxed thread)."""
        settings = self._settings
        return [
            QueryExecutor(
                store.cursor(), store.cursor(), memory_limit_bytes=settings.query_memory_limit(),
                max_result_bytes=self._bus.max_payload, folds_first=store.folds_first,
                incarnation=store.incarnation,
            )
            for _ in range(settings.query.workers)
        ]

    async def _query_threads(self) -> ThreadPoolExecutor:
        """The threads queries run on, each kept off the file system by the kernel where it can
        be (projections.sandbox); says at start what is not covered."""
        settings = self._settings
        gap = sandbox.uncovered(settings.threads)
        if gap is not None:
            log.warning("query threads are not fully kept off the file system (%s): the statement check "
                        "alone keeps queries to the views", gap)
        if not self._executors[0].measures_memory:
            log.warning("the query memory limit is not enforced here (no /proc/self/statm): only DuckDB's "
                        "memory_limit bounds a query")
        if sandbox.unavailable() is not None:
            return ThreadPoolExecutor(max_workers=settings.query.workers, thread_name_prefix="continuum-query")
        # What the conversions import lazily is imported now: a sandboxed thread opens no file.
        await asyncio.to_thread(warm_up)
        readable = [settings.archive_dir] if settings.archive_dir is not None else []
        return ThreadPoolExecutor(
            max_workers=settings.query.workers, thread_name_prefix="continuum-query", initializer=_enter_sandbox,
            initargs=(readable,),
        )

    async def _open_archive(self, writer: Writer, directory: Path) -> None:
        """Define `archive_events` over the archive's segments (the directory is made if missing:
        the query threads' sandbox lets them read beneath it). Raises ArchiveError, duckdb.Error."""
        store = writer.store
        try:
            await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"cannot create the archive directory {directory}: {exc}") from exc

        async def define(name: str, select: str) -> None:
            await writer.call(store.define_relation, name, select)

        self.archive_view = ArchiveView(directory, self._bus.subjects.stream, define)
        await self.archive_view.refresh()

    async def _refresh_archive_view(self) -> None:
        """Bring `archive_events` in step with the segment files (a query naming it sees every
        segment sealed before it was asked). A failure is logged: the view as it was answers."""
        assert self.archive_view is not None
        try:
            await self.archive_view.refresh()
        except (ArchiveError, duckdb.Error, OSError) as exc:
            log.warning("archive_events not refreshed: %s", exc)

    async def _check_log(self, writer: Writer) -> tuple[int, int] | None:
        """Check the views file fits the log. Returns (the views' seq, the last seq the log no
        longer holds) when records after the views' seq left the log before they were folded
        (a trim or max age while the service was not running), else None. Raises StoreMismatch."""
        store = writer.store
        try:
            first, last = await self._bus.log_bounds()
        except BusError as exc:
            log.warning("cannot read the log's bounds (%s); folding without them", exc)
            return None
        if store.applied_seq > last:
            raise StoreMismatch(
                f"{store.path} is at seq {store.applied_seq} but the log {store.stream} ends at {last}: "
                "the stream was recreated. Move the file away (the views are rebuilt from the log) "
                "or point --db elsewhere"
            )
        store.log_floor = max(0, first - 1) if last else 0
        if store.applied_seq and last and first - 1 > store.applied_seq:
            return store.applied_seq, first - 1
        return None

    async def _stop(self) -> None:
        for subscription in self._subscriptions:
            await subscription.close()
        self._subscriptions = []
        for executor in self._executors:
            executor.interrupt()
        for task in self._background:
            task.cancel()

    async def _renew_queries(self, stale: list[str]) -> None:
        """The store was opened again (projections.runner.Runner.reopen), closing the query
        executors' cursors: new executors take over, the old ones close once their query ends;
        views found stale are built again (a rebuild in progress was dropped)."""
        assert self._writer is not None and self.store is not None
        old, self._executors = self._executors, await self._writer.call(self._new_executors, self.store)
        for executor in old:
            executor.retired = True
        while not self._idle.empty():
            await self._writer.call(self._idle.get_nowait().close)
        for executor in self._executors:
            self._idle.put_nowait(executor)
        if stale and self._tasks is not None:
            self._background.append(self._tasks.create_task(self._build_stale(stale), name="projections-build"))

    async def _retire_queries(self) -> None:
        """Before the file is rewritten (a forget): retire every query executor and wait until
        each has closed its cursors (idle ones now, a running query interrupted and answered
        again on the new file): DuckDB hands out a database still held by a connection instead
        of opening the file anew. Queries that come meanwhile wait for the new executors."""
        loop = asyncio.get_running_loop()
        old = list(self._executors)
        for executor in old:
            executor.retired = True
        while not self._idle.empty():
            await loop.run_in_executor(None, self._idle.get_nowait().close)
        for executor in old:
            if not executor.closed:
                executor.interrupt()
        deadline = loop.time() + self._settings.query.max_timeout_s
        while not all(executor.closed for executor in old) and loop.time() < deadline:
            await asyncio.sleep(0.01)  # a running query closes its executor as it ends (_run_query)

    def _close_queries(self, pool: ThreadPoolExecutor) -> None:
        pool.shutdown(wait=True)
        for executor in self._executors:
            executor.close()

    async def _build_stale(self, views: list[str]) -> None:
        """Build `views` from seq 1 (new, changed, or untrusted after a half-way commit). Views
        still untrusted when it fails are tried again with backoff, as a fold is (their content
        may be wrong: giving up is not an option); unless the store was opened again meanwhile,
        which starts a build of its own."""
        assert self.store is not None
        attempt = 0
        while True:
            incarnation = self.store.incarnation
            try:
                # After a reopen, the rebuild it dropped may still be giving up: wait for it, or
                # these views would not be built at all.
                await self.rebuild(views, wait=True)
                return
            except Exception as exc:  # noqa: BLE001 - keep serving the views we have
                untrusted = [view for view in views if view in self.store.untrusted]
                if not untrusted or self.store.incarnation != incarnation:
                    log.error("could not build %s: %s (they are served by their previous version, if any)",
                              ", ".join(views), exc)
                    return
                attempt += 1
                delay = retry_delay(attempt)
                log.error("could not rebuild %s, not trusted since a half-way commit: %s; trying again in %.1fs",
                          ", ".join(untrusted), exc, delay)
            views = untrusted
            await asyncio.sleep(delay)

    # -- operations -----------------------------------------------------------------------

    async def rebuild(self, views: list[str] | tuple[str, ...] = (), *, wait: bool = False) -> RebuildReport:
        """Rebuild `views` (all when empty) from sequence 1 and swap them in; see Runner.rebuild."""
        assert self.runner is not None
        return await self.runner.rebuild(views, wait=wait)

    async def status(self) -> StatusReport:
        """The views' checkpoints and lag against the log's end, and integrity problems."""
        assert self.store is not None and self.runner is not None
        gens, integrity, fold_errors, untrusted = await self._writer.call(collect, self.store)
        try:
            last: int | None = await self._bus.last_seq()
        except BusError:
            last = None
        return build_report(
            source="service", db_path=self._settings.db_path, stream=self._bus.subjects.stream, gens=gens,
            integrity=integrity, log_last_seq=last, lag_seconds=self.runner.lag_seconds,
            rebuilding=list(self.runner.rebuilding), pid=os.getpid(), fold_errors=fold_errors,
            retrying=self.runner.retrying, service=self._settings.service, untrusted=untrusted,
        )

    async def content_hashes(self) -> dict[str, str]:
        """A hash of every active view's tables (see store.content_hashes)."""
        assert self._writer is not None and self.store is not None
        return await self._writer.call(self.store.content_hashes)

    async def query(self, request: QueryRequest, scope: str | None = None) -> QueryResult | QueryFailure:
        """Answer one query (what a request on the query subject gets); in agent `scope`'s rows
        only when given (projections.scopes)."""
        limits = self._settings.query
        timeout_s = min(max(request.timeout_s, 0.001), limits.max_timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        views: frozenset[str] = frozenset()
        if request.min_seq is not None and request.min_seq > self.watermark.seq:
            views = await self._views_read_by(request.sql)
        if request.min_seq is not None and request.min_seq > self.watermark.seq_of(views):
            wait_s = min(limits.max_lag_wait_s, timeout_s)
            if not await self.watermark.wait_for(request.min_seq, wait_s, views):
                return QueryFailure(
                    kind="lag",
                    message=f"the views have applied up to seq {self.watermark.seq_of(views)}; seq {request.min_seq} "
                            f"was not applied within {wait_s:g}s (the projection is behind, or that "
                            "sequence is past the end of the log)",
                )
        if self.archive_view is not None and ARCHIVE_VIEW in request.sql.lower():
            await self._refresh_archive_view()
        while True:
            answer, retired = await self._run_query(request, scope, views, deadline, timeout_s)
            # A query the store's reopen overtook (a forget's rewrite of the file, say) ran on
            # nothing: it is sent again on the new file's cursors while time is left.
            if not retired or isinstance(answer, QueryResult) or loop.time() >= deadline:
                return answer

    async def _run_query(
        self, request: QueryRequest, scope: str | None, views: frozenset[str], deadline: float, timeout_s: float
    ) -> tuple[QueryResult | QueryFailure, bool]:
        """One attempt at a query on an idle executor: (the answer, whether that executor was
        retired by a reopen meanwhile)."""
        loop = asyncio.get_running_loop()
        limits = self._settings.query
        try:
            async with asyncio.timeout(max(0.001, deadline - loop.time())):
                executor = await self._idle.get()
        except TimeoutError:
            return failure("timeout", f"no query slot became free within {timeout_s:g}s"), False
        try:
            answer = await loop.run_in_executor(
                self._query_pool,
                lambda: executor.run(
                    request.sql, request.params,
                    max_rows=max(1, min(request.max_rows, limits.max_rows)),
                    timeout_s=max(0.001, deadline - loop.time()),
                    applied_seq=self.watermark.seq_of(views),
                    scope=scope,
                ),
            )
            return answer, executor.retired
        finally:
            if executor.invalidated and not executor.retired and self.runner is not None and self._tasks is not None:
                # (The folds may be idle: a query that finds the database invalidated opens it again
                # too. StoreUnusable from it ends the service, as from a fold.)
                self._tasks.create_task(self.runner.reopen(executor.incarnation), name="projections-reopen")
            if executor.retired:
                await loop.run_in_executor(None, executor.close)
            else:
                self._idle.put_nowait(executor)

    async def _views_read_by(self, sql: str) -> frozenset[str]:
        """The views `sql` reads, from its relation names (parsed on a query thread); empty,
        meaning every view, when that is unknown: SQL that does not parse, no relation, or a
        relation that is not a view's, or SQL nested past what the parse tree's decoder takes."""
        assert self._relations is not None
        hit, names = self._relations.known(sql)
        if not hit:
            try:
                names = await asyncio.get_running_loop().run_in_executor(self._query_pool, self._relations.names, sql)
            except (RecursionError, msgspec.DecodeError):
                names = None  # (the statement check answers such SQL itself)
        views = {self._view_of_relation.get(name) for name in names or ()}
        return frozenset() if not views or None in views else frozenset(v for v in views if v is not None)

    # -- request handlers (subscription callbacks: they only hand work to the task group) ---

    async def _on_query(self, msg: Inbound) -> None:
        await self._slots.acquire()
        assert self._tasks is not None
        try:
            self._tasks.create_task(self._answer_query(msg))
        except RuntimeError:  # the task group is shutting down
            self._slots.release()

    async def _answer_query(self, msg: Inbound) -> None:
        started = time.perf_counter()
        try:
            try:
                response = await self._response_to(msg.data, self._scope_of(msg.subject))
            finally:
                self._slots.release()
            response, data = self._encoded(response)
            outcome = "ok" if isinstance(response, QueryResult) else response.kind
            self.metrics.query_seconds.labels(outcome).observe(time.perf_counter() - started)
            await self._respond(msg, data)
        except Exception:  # noqa: BLE001 - one request must never end the serve loop (the task group)
            log.exception("could not answer a query request")

    def _scope_of(self, subject: str) -> str | None:
        """The agent whose scope a query on `subject` runs in; None on the unscoped subject."""
        query = self._bus.subjects.query
        return None if subject == query else subject[len(query) + 1:]

    async def _response_to(self, data: bytes, scope: str | None = None) -> QueryResult | QueryFailure:
        """The answer to request bytes from any client: size first, then nesting (before the
        recursive decoder runs), then the decoder, whatever it raises."""
        limit = self._settings.query.max_request_bytes
        if len(data) > limit:
            return failure(
                "too_large", f"the query request is {len(data)} bytes, over the service's limit of {limit} bytes"
            )
        why = refusal(data, max_bytes=limit)
        if why is not None:
            return failure("bad_sql", f"malformed query request: {why}")
        try:
            request = _request_decoder.decode(data)
        except Exception as exc:  # noqa: BLE001 - any decoder error on hostile bytes is the client's
            return failure("bad_sql", f"malformed query request: {exc}")
        try:
            return await self.query(request, scope)
        except Exception as exc:
            log.exception("query failed unexpectedly")
            return failure("internal", f"{type(exc).__name__}: {exc}")

    def _encoded(self, response: QueryResult | QueryFailure) -> tuple[QueryResult | QueryFailure, bytes]:
        """`response` as JSON, or the failure sent instead: one that has no JSON form (nested past
        what the encoder recurses into), or is larger than the server carries."""
        try:
            data = _encoder.encode(response)
        except Exception as exc:  # noqa: BLE001 - the values came from arbitrary SQL
            response = failure("internal", f"the result cannot be encoded: {type(exc).__name__}: {exc}")
            data = _encoder.encode(response)
        limit = self._bus.max_payload
        if len(data) > limit:
            response = failure(
                "too_large",
                f"the result is {len(data)} bytes, over the server's message limit of {limit} bytes: "
                "select fewer rows or columns",
            )
            data = _encoder.encode(response)
        return response, data

    async def _on_roll_call(self, msg: Inbound) -> None:
        hello = ServiceHello(
            service=self._settings.service, db_path=self._settings.db_path, applied_seq=self.watermark.seq,
            pid=os.getpid(), host=socket.gethostname(),
        )
        await self._respond(msg, _encoder.encode(hello))

    async def _on_status(self, msg: Inbound) -> None:
        assert self._tasks is not None
        with contextlib.suppress(RuntimeError):
            self._tasks.create_task(self._answer_status(msg))

    async def _answer_status(self, msg: Inbound) -> None:
        try:
            data = _encoder.encode(StatusOk(report=await self.status()))
        except Exception as exc:
            log.exception("status request failed")
            data = _encoder.encode(ControlFailure(message=f"{type(exc).__name__}: {exc}"))
        await self._respond(msg, data)

    async def _on_rebuild(self, msg: Inbound) -> None:
        assert self._tasks is not None
        with contextlib.suppress(RuntimeError):
            self._tasks.create_task(self._answer_rebuild(msg))

    async def _answer_rebuild(self, msg: Inbound) -> None:
        try:
            # Any client may send anything here: checked before the (recursive) decoder runs.
            why = refusal(msg.data, max_bytes=self._settings.query.max_request_bytes)
            if why is not None:
                raise RebuildError(f"malformed rebuild request: {why}")
            request = _rebuild_decoder.decode(msg.data) if msg.data else RebuildRequest()
            data = _encoder.encode(RebuildOk(report=await self.rebuild(request.views)))
        except (msgspec.DecodeError, RebuildError) as exc:
            data = _encoder.encode(ControlFailure(message=str(exc)[:2000]))
        except Exception as exc:
            log.exception("rebuild failed")
            data = _encoder.encode(ControlFailure(message=f"rebuild failed: {type(exc).__name__}: {exc}"))
        await self._respond(msg, data)

    async def _respond(self, msg: Inbound, data: bytes) -> None:
        """Answer `msg` (if it asked for an answer); a lost connection is logged, not raised."""
        await self._bus.transport.respond(msg, data)


def _enter_sandbox(readable: list[str]) -> None:
    """Query pool initializer: keep the thread off the file system (projections.sandbox) but for
    reading the archive's segments beneath `readable`. Should the kernel refuse, the pool breaks
    and queries fail (fail closed) instead of running with file access."""
    try:
        sandbox.deny_files(readable)
    except OSError:
        log.exception("could not sandbox a query thread: queries are refused")
        raise
