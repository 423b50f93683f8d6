"""Hostile and oversized input to the query service: no query reads a file, none grows the service
past its memory limit, oversized requests and results are refused with the limit named, raw bytes
from any client get an answer; and afterwards the service still answers and the views are the
same. A real nats-server, a real projection service and its real DuckDB file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest

from bus import Bus, QueryError
from projections import sandbox
from projections.config import ProjectionSettings, QuerySettings, format_bytes
from projections.protocol import ControlFailure, rebuild_subject
from projections.service import ProjectionService
from projections.statement import check
from projections.store import file_hashes
from projections.workload import append_batches, synthetic_log
from schemas.limits import MAX_DEPTH
from schemas.payloads import Note
from schemas.query import MAX_MESSAGE_CHARS, QueryFailure, QueryResult

MIB = 1024 * 1024
QUERY_MEMORY = 128 * MIB
_answer = msgspec.json.Decoder(QueryResult | QueryFailure)


@dataclass(frozen=True)
class Seeded:
    """A running service whose views folded a small log; `hashes` are their contents then."""

    service: ProjectionService
    path: Path
    last_seq: int
    hashes: dict[str, str]


@contextlib.asynccontextmanager
async def running(bus: Bus, tmp_path: Path, **overrides: Any) -> AsyncIterator[Seeded]:
    """A service on `tmp_path/views.duckdb` (query memory limit QUERY_MEMORY unless
    `query_memory` says otherwise; other ProjectionSettings from `overrides`) with 300 events
    folded."""
    path = tmp_path / "views.duckdb"
    query = QuerySettings(memory_limit_bytes=overrides.pop("query_memory", QUERY_MEMORY))
    settings = ProjectionSettings(db_path=str(path), query=query, **overrides)
    async with ProjectionService(bus, settings) as service:
        last = await append_batches(bus, list(synthetic_log(bus, 300, seed=11)))
        await bus.query("SELECT 1", min_seq=last)
        yield Seeded(service, path, last, await service.content_hashes())


@pytest.fixture
async def seeded(bus: Bus, tmp_path: Path) -> AsyncIterator[Seeded]:
    async with running(bus, tmp_path) as value:
        yield value


async def alive_and_unchanged(bus: Bus, seeded: Seeded) -> None:
    """The service answers a normal query, still folds, and the views are what they were."""
    assert (await bus.query("SELECT count(*) FROM events")).rows == [[seeded.last_seq]]
    assert await seeded.service.content_hashes() == seeded.hashes
    probe = await bus.send("alice", Note(text="still folding"))
    assert (await bus.query("SELECT count(*) FROM events", min_seq=probe.ack.seq)).rows == [[probe.ack.seq]]


async def refused(bus: Bus, sql: str, **kwargs: Any) -> QueryError:
    with pytest.raises(QueryError) as info:
        await bus.query(sql, **kwargs)
    return info.value


# -- no file is read --------------------------------------------------------------------------

READERS = [
    "SELECT * FROM read_blob('{path}')",
    "SELECT * FROM read_text('{path}')",
    "SELECT * FROM read_csv('{path}')",
    "SELECT * FROM read_csv('{path}', sep = ':', header = false)",
    "SELECT * FROM read_parquet('{path}')",
    "SELECT * FROM read_json('{path}')",
    "SELECT * FROM read_duckdb('{path}')",
    "SELECT * FROM glob('{path}')",
    "SELECT * FROM '{path}'",
    "DESCRIBE '{path}'",
    "SUMMARIZE '{path}'",
    "SELECT * FROM query_table('{path}')",
    "SELECT * FROM query('SELECT * FROM read_blob(''{path}'')')",
    "SELECT (SELECT content FROM read_blob('{path}')) AS c",
    "WITH x AS (SELECT 1) SELECT * FROM x, read_text('{path}')",
    "ATTACH '{path}' AS stolen (READ_ONLY)",
    "COPY (SELECT 1) TO '{path}.out'",
    "COPY events FROM '{path}'",
]
TARGETS: dict[str, Callable[[Path], str]] = {
    "views file": lambda views: str(views),
    "its WAL": lambda views: f"{views}.wal",
    "its temp directory": lambda views: f"{views}.tmp/*",
    "a ../ path to it": lambda views: f"{views.parent}/../{views.parent.name}/{views.name}",
    "a relative path": lambda views: views.name,
    "/etc/passwd": lambda views: "/etc/passwd",
}
_SECRETS = (b"DUCK", b"root:")  # the DuckDB file header; /etc/passwd's first line


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("sql", READERS)
async def test_no_query_reads_any_file(bus: Bus, seeded: Seeded, sql: str, target: str) -> None:
    """Every file reader DuckDB has, every path form (the views file, its WAL and temp directory,
    `../`, relative, a host file) and every statement that opens a file is refused, and no
    content of any file comes back."""
    assert Path(f"{seeded.path}.wal").exists()  # (the WAL holds the folds since the last checkpoint)

    error = await refused(bus, sql.format(path=TARGETS[target](seeded.path)))

    assert error.kind in ("not_allowed", "bad_sql"), error
    assert not any(secret.decode() in str(error) for secret in _SECRETS)
    assert not Path(f"{seeded.path}.out").exists()
    await alive_and_unchanged(bus, seeded)


# The content readers (glob lists names: a stat, which Landlock does not govern; the statement
# check refuses it), on the files DuckDB allows its own connections.
_ATTACKS = [sql.format(path=path) for sql in READERS[:9] if "glob" not in sql for path in ("{views}", "{views}.wal", "{views}.tmp/*")]


@pytest.mark.skipif(sandbox.unavailable() is not None, reason=f"no Landlock here: {sandbox.unavailable()}")
async def test_a_sandboxed_thread_opens_no_file_even_where_duckdb_would(seeded: Seeded) -> None:
    """The kernel wall alone (no statement check): on a thread that called `deny_files()`, the
    SQL that DuckDB itself allows (its own file, WAL and temp directory) fails to open them,
    while the store's own threads keep folding into the same file."""
    store = seeded.service.store
    assert store is not None
    cursor = await seeded.service._writer.call(store.cursor)
    outcomes: dict[str, str] = {}
    main_thread_reads = False

    def attack() -> None:
        sandbox.deny_files()
        for sql in _ATTACKS:
            try:
                rows = cursor.execute(sql.format(views=seeded.path)).fetchall()
                outcomes[sql] = f"READ {len(rows)} rows" if rows else "nothing"
            except duckdb.Error as exc:
                outcomes[sql] = type(exc).__name__
        cursor.execute("SELECT count(*) FROM events").fetchall()  # the views are still readable

    thread = threading.Thread(target=attack)
    thread.start()
    await asyncio.to_thread(thread.join)
    with open(seeded.path, "rb") as views:  # other threads keep their file access
        main_thread_reads = views.read(16)[8:12] == b"DUCK"
    cursor.close()

    assert not [sql for sql, outcome in outcomes.items() if outcome.startswith("READ")], outcomes
    assert outcomes[_ATTACKS[0]] == "IOException"  # the kernel's refusal, not DuckDB's
    assert main_thread_reads


async def test_after_the_attacks_the_views_file_closes_and_reopens_the_same(bus: Bus, tmp_path: Path) -> None:
    """The store's own use of its files (folding, the WAL, checkpointing at close, reopening)
    is untouched by what keeps queries off them: after every reader was tried on the views file
    and its WAL, the service stops cleanly and the file reopens with the same views."""
    async with running(bus, tmp_path) as seeded:
        for sql in READERS:
            for path in (seeded.path, f"{seeded.path}.wal"):
                await refused(bus, sql.format(path=path))
        hashes = await seeded.service.content_hashes()

    assert not Path(f"{seeded.path}.wal").exists()  # checkpointed at close
    assert await asyncio.to_thread(file_hashes, seeded.path) == hashes == seeded.hashes
    async with ProjectionService(bus, ProjectionSettings(db_path=str(seeded.path))) as reopened:
        assert await reopened.content_hashes() == hashes
        await alive_and_unchanged(bus, Seeded(reopened, seeded.path, seeded.last_seq, hashes))


async def test_with_duckdb_worker_threads_the_service_says_what_the_kernel_wall_misses(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DuckDB's own worker threads (threads > 1) run parts of a query unsandboxed: the service
    says so at start, and the statement check still refuses every file reader."""
    with caplog.at_level("WARNING", logger="continuum.projections.service"):
        async with running(bus, tmp_path, threads=2) as seeded:
            errors = [await refused(bus, sql.format(path=seeded.path)) for sql in READERS]

    assert all(error.kind in ("not_allowed", "bad_sql") for error in errors)
    assert any("not fully kept off the file system" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("sql", [s.format(path="/tmp/x") for s in READERS] + [
    "SELECT * FROM secret.csv",
    'SELECT * FROM "/etc/passwd"',
    "SHOW '/etc/passwd'",
    "SELECT * FROM (WITH \"x.csv\" AS (SELECT 1) SELECT 1), \"x.csv\"",
    "SELECT * FROM json_execute_serialized_sql('{}')",
    "SELECT * FROM system.main.read_blob('/tmp/x')",
    "SELECT * FROM enable_profiling()",
    "SELECT * FROM checkpoint()",
    "SELECT * FROM duckdb_settings()",
    "PIVOT events ON kind",
])
def test_the_statement_check_alone_refuses_every_way_to_a_file(sql: str) -> None:
    """The parse-tree wall alone (no sandbox, no DuckDB setting): table functions outside the
    allowlist, names that DuckDB would read as file paths, and non-SELECT statements are
    refused before anything is bound."""
    con = duckdb.connect(":memory:")
    try:
        verdict = check(con, sql)
    finally:
        con.close()

    assert isinstance(verdict, QueryFailure) and verdict.kind in ("not_allowed", "bad_sql"), verdict


@pytest.mark.parametrize("sql", [
    "SELECT * FROM events WHERE seq = ?",
    "SELECT e.kind, count(*) FROM main.events AS e GROUP BY ALL",
    "WITH recent AS (SELECT * FROM events ORDER BY seq DESC LIMIT 5) SELECT count(*) FROM recent",
    "SELECT * FROM range(3), generate_series(1, 2), unnest([1, 2])",
    "SELECT * FROM json_each('{\"a\": 1}')",
    "SELECT table_name FROM information_schema.tables",
    "SELECT * FROM duckdb_views() WHERE NOT internal",
    "SHOW TABLES",
    "DESCRIBE events",
    "SUMMARIZE SELECT seq FROM events",
    "FROM events SELECT seq LIMIT 1",
    "VALUES (1, 'a')",
])
async def test_the_statement_check_passes_queries_of_the_views(bus: Bus, seeded: Seeded, sql: str) -> None:
    """What reads only the views (CTEs, qualified names, catalog views, value generators,
    SHOW/DESCRIBE/SUMMARIZE) is answered."""
    params = [1] if "?" in sql else []

    result = await bus.query(sql, params)

    assert isinstance(result, QueryResult)


# -- memory ---------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _resident() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class PeakResident:
    """Samples this process's resident size every 5 ms in a thread while the block runs."""

    def __enter__(self) -> PeakResident:
        self.start = _resident()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _resident())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


MEMORY_HOGS = [
    "SELECT strlen(string_agg(repeat('x', 1000), '')) FROM range(3000000)",
    "SELECT len(list(repeat('x', 1000))) FROM range(3000000)",
    "SELECT count(*) FROM (SELECT a.range AS a, b.range AS b, repeat('x', 100) AS s FROM range(3000000) a, range(10) b ORDER BY s, a, b)",
    "SELECT count(*) FROM (SELECT range % 3000000 AS k, list(repeat('y', 100)) AS l FROM range(30000000) GROUP BY k)",
]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="the query memory limit is measured on Linux")
@pytest.mark.parametrize("sql", MEMORY_HOGS)
async def test_a_query_over_the_memory_limit_is_stopped_and_names_the_limit(bus: Bus, seeded: Seeded, sql: str) -> None:
    """string_agg, list aggregates, a cross join sorted, a grouped list: each would grow the
    service by gigabytes; each is stopped near the configured limit (128 MiB here) with a
    `too_large` error naming it, and the folds go on."""
    started = time.monotonic()
    with PeakResident() as memory:
        error = await refused(bus, sql, timeout_s=60)

    assert error.kind == "too_large" and format_bytes(QUERY_MEMORY) in str(error), error
    assert memory.growth < QUERY_MEMORY + 384 * MIB, f"grew {memory.growth / MIB:.0f} MiB"
    assert time.monotonic() - started < 30
    await alive_and_unchanged(bus, seeded)


async def test_a_query_that_hits_duckdbs_own_limit_leaves_the_folds_folding(bus: Bus, tmp_path: Path) -> None:
    """DuckDB's memory_limit is shared by the folds and the queries: a query that exhausts it
    gets `too_large`, while events appended meanwhile are still folded and visible."""
    async with running(bus, tmp_path, memory_limit="256MB", query_memory=200 * MIB) as seeded:
        items = list(synthetic_log(bus, 3000, seed=12, first_seq=seeded.last_seq + 1))
        appending = asyncio.create_task(append_batches(bus, items, batch=50))
        kinds: set[str] = set()
        while not appending.done():  # DuckDB's memory exhausted again and again while the folds run
            kinds.add((await refused(bus, "SELECT len(list(repeat('x', 1000))) FROM range(3000000)")).kind)
        last = await appending

        assert kinds == {"too_large"}
        assert (await bus.query("SELECT count(*) FROM events", min_seq=last, timeout_s=60)).rows == [[last]]


@pytest.mark.soak  # fails about 1 run in 4: see the last paragraph of its docstring
@pytest.mark.timeout(300)
async def test_the_service_opens_its_views_again_when_duckdb_gives_up_and_folds_everything_once(
    bus: Bus, tmp_path: Path,
) -> None:
    """With DuckDB's memory at 96 MB and a query taking all of it non-stop, DuckDB sooner or
    later fails a fold's rollback or commit (or invalidates the database): the service opens
    the views file again (`continuum_projection_reopens_total`), renews its query cursors, and
    goes on; every event is folded once and queries are answered after.

    Known to fail sometimes: DuckDB can lose a block it spilled to its temp directory (a query
    thread, kept off the disk, evicted it) that only a query reads afterwards. The folds, idle,
    never meet it, so nothing opens the file again, and the final query keeps failing."""
    async with running(bus, tmp_path, memory_limit="96MB", query_memory=90 * MIB) as seeded:
        registry = seeded.service.metrics.registry
        last, appended = seeded.last_seq, 0
        stop = asyncio.Event()

        async def hog() -> None:
            while not stop.is_set():
                await refused(bus, "SELECT len(list(repeat('x', 1000))) FROM range(3000000)", timeout_s=60)

        async with asyncio.TaskGroup() as tasks:
            hogging = [tasks.create_task(hog()) for _ in range(2)]
            while (registry.get_sample_value("continuum_projection_reopens_total") or 0) < 1:
                assert appended < 30_000, "DuckDB never gave up: nothing was tested"
                items = list(synthetic_log(bus, 500, seed=appended, first_seq=last + 1))
                last = await append_batches(bus, items, batch=50)
                appended += len(items)
                await caught_up(bus, last)
            stop.set()
            for task in hogging:
                await task

        result = await caught_up(bus, last, "SELECT count(*), count(DISTINCT seq), max(seq) FROM events")
        assert result.rows == [[last, last, last]]
        await alive_and_unchanged_but_for_appends(bus, last)


async def caught_up(bus: Bus, seq: int, sql: str = "SELECT 1", within_s: float = 120.0) -> QueryResult:
    """`sql`'s answer once the views have applied `seq` (a fold retried with backoff, or the
    views file opened again, can take longer than one query's wait for it; a query that finds
    the file being opened again is to be sent again)."""
    async with asyncio.timeout(within_s):
        while True:
            try:
                return await bus.query(sql, min_seq=seq)
            except QueryError as exc:
                reopening = exc.kind == "internal" and "opened again" in str(exc)
                if exc.kind not in ("lag", "timeout", "too_large") and not reopening:
                    raise


async def alive_and_unchanged_but_for_appends(bus: Bus, last: int) -> None:
    probe = await bus.send("alice", Note(text="still folding"))
    assert probe.ack.seq > last
    assert (await bus.query("SELECT count(*) FROM events", min_seq=probe.ack.seq)).rows == [[probe.ack.seq]]


# -- oversized requests and results -------------------------------------------------------


async def test_sql_over_the_servers_message_limit_is_refused_before_sending(bus: Bus, seeded: Seeded) -> None:
    """A 9 MB SQL string is a QueryError naming the server's limit (not nats-py's
    MaxPayloadError), and the service never sees it."""
    limit = bus.max_payload

    error = await refused(bus, "SELECT '" + "x" * (9 * 1024 * 1024) + "'")

    assert error.kind == "too_large" and str(limit) in str(error)
    await alive_and_unchanged(bus, seeded)


async def test_sql_over_the_services_request_limit_is_refused_with_the_limit(bus: Bus, seeded: Seeded) -> None:
    """A 2 MB request fits in a message but not under the service's request limit (1 MiB by
    default): `too_large`, naming it."""
    error = await refused(bus, "SELECT '" + "x" * (2 * 1024 * 1024) + "'")

    assert error.kind == "too_large" and str(QuerySettings().max_request_bytes) in str(error)
    await alive_and_unchanged(bus, seeded)


@pytest.mark.parametrize("sql", [
    "SELECT repeat('x', 100000) AS blob FROM range(100)",  # 10 MB of Arrow data: stopped while reading
    "SELECT repeat(chr(1), 2000000) AS blob",  # 2 MB of data, 12 MB of JSON (\\u0001 each)
])
async def test_a_result_over_the_servers_message_limit_is_refused_with_the_limit(bus: Bus, seeded: Seeded, sql: str) -> None:
    """A result larger than the server carries is `too_large` naming the limit, answered at
    once (not a lost reply and a client timeout)."""
    started = time.monotonic()

    error = await refused(bus, sql, timeout_s=30)

    assert error.kind == "too_large" and str(bus.max_payload) in str(error)
    assert time.monotonic() - started < 10
    await alive_and_unchanged(bus, seeded)


async def test_an_error_quoting_a_huge_query_is_cut_to_fit(bus: Bus, seeded: Seeded) -> None:
    """DuckDB's error messages can quote the SQL whole; the answer's message is cut to
    MAX_MESSAGE_CHARS, so it always fits in a reply."""
    error = await refused(bus, "SELECT * FROM " + "y" * 900_000)

    assert error.kind == "bad_sql" and len(str(error)) <= MAX_MESSAGE_CHARS
    await alive_and_unchanged(bus, seeded)


@pytest.mark.parametrize("read_your_writes", [False, True])
async def test_sql_nested_past_what_the_check_decodes_is_refused(bus: Bus, seeded: Seeded, read_your_writes: bool) -> None:
    """SELECT nested 500 subqueries deep parses (DuckDB allows 1000), but its parse tree is
    deeper than the decoder recurses: `bad_sql`, answered, also when `min_seq` has the service
    look for the views it reads first."""
    sql = "SELECT 1 FROM " + "(SELECT 1 FROM " * 500 + "events" + ") t" * 500
    min_seq = (await bus.send("alice", Note(text="just sent"))).ack.seq if read_your_writes else None

    error = await refused(bus, sql, min_seq=min_seq)

    assert error.kind == "bad_sql" and "nested" in str(error)
    if min_seq is None:
        await alive_and_unchanged(bus, seeded)
    else:
        assert (await bus.query("SELECT max(seq) FROM events", min_seq=min_seq)).rows == [[min_seq]]


async def test_a_result_nested_deeper_than_the_encoder_goes_is_a_failure(bus: Bus, seeded: Seeded) -> None:
    """A value nested 900 lists deep converts to Python but cannot be encoded: `internal`,
    answered, and the service keeps serving."""
    error = await refused(bus, "SELECT " + "[" * 900 + "1" + "]" * 900 + " AS deep")

    assert error.kind in ("internal", "bad_sql")
    await alive_and_unchanged(bus, seeded)


# -- raw bytes from any client ----------------------------------------------------------------

HOSTILE_REQUESTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "not JSON": (lambda: b"{not json", "bad_sql"),
    "invalid UTF-8": (lambda: b'{"sql": "\xff\xfe"}', "bad_sql"),
    "empty": (lambda: b"", "bad_sql"),
    "random bytes": (lambda: os.urandom(4096), "bad_sql"),
    "a JSON array": (lambda: b"[1, 2, 3]", "bad_sql"),
    "sql not a string": (lambda: b'{"sql": 5}', "bad_sql"),
    "no sql": (lambda: b'{"params": []}', "bad_sql"),
    "params nested 100,000 deep": (lambda: b'{"sql": "SELECT ?", "params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "bad_sql"),
    "params nested 100,000 deep, unclosed": (lambda: b'{"sql": "SELECT ?", "params": ' + b"[" * 100_000, "bad_sql"),
    "objects nested past the limit": (lambda: b'{"sql": "SELECT ?", "params": [' + b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH + b"]}", "bad_sql"),
    "over the request limit": (lambda: b'{"sql": "SELECT 1 -- ' + b"x" * (2 * 1024 * 1024) + b'"}', "too_large"),
    "max_rows past any integer": (lambda: b'{"sql": "SELECT 1", "max_rows": 100000000000000000000000000}', "ok"),  # capped
    "timeout_s infinite": (lambda: b'{"sql": "SELECT 1", "timeout_s": 1e999}', "bad_sql"),
    "a parameter past 64 bits": (lambda: b'{"sql": "SELECT ?", "params": [100000000000000000000000000000000000000000]}', "bad_sql"),
    "a NUL in the SQL": (lambda: b'{"sql": "SELECT 1\\u0000; DROP VIEW events"}', "not_allowed"),
    "two statements": (lambda: b'{"sql": "SELECT 1; SELECT 2"}', "not_allowed"),
}


@pytest.mark.parametrize("case", list(HOSTILE_REQUESTS))
async def test_hostile_request_bytes_get_a_failure_answer(bus: Bus, seeded: Seeded, case: str) -> None:
    """Bytes published straight at the query subject, bypassing `Bus.query`, get an answer: a
    QueryFailure of the expected kind (size checked first, nesting before the recursive decoder,
    anything the decoder raises answered), or a capped result; the serve loop lives on."""
    build, kind = HOSTILE_REQUESTS[case]

    reply = await bus.transport.request(bus.subjects.query, build(), timeout_s=10)

    answer = _answer.decode(reply.data)
    assert (answer.kind if isinstance(answer, QueryFailure) else "ok") == kind, answer
    await alive_and_unchanged(bus, seeded)


async def test_requests_with_no_reply_subject_and_a_burst_of_garbage_leave_it_serving(bus: Bus, seeded: Seeded) -> None:
    """Garbage published with no reply subject (nothing to answer) and a burst of 200 hostile
    requests at once: every request that asked gets an answer, and the service keeps serving."""
    for build, _ in HOSTILE_REQUESTS.values():
        await bus.transport.publish(bus.subjects.query, build())
    builders = [build for build, _ in HOSTILE_REQUESTS.values()] * 13

    replies = await asyncio.gather(*(bus.transport.request(bus.subjects.query, build(), timeout_s=30) for build in builders[:200]))

    assert len(replies) == 200 and all(isinstance(_answer.decode(r.data), QueryResult | QueryFailure) for r in replies)
    await alive_and_unchanged(bus, seeded)


@pytest.mark.parametrize("case", ["not JSON", "random bytes", "params nested 100,000 deep, unclosed", "over the request limit"])
async def test_hostile_rebuild_requests_are_refused_and_change_nothing(bus: Bus, seeded: Seeded, case: str) -> None:
    """Bytes published at the rebuild subject get a failure answer (checked before the decoder
    recurses); nothing is rebuilt and the service keeps serving."""
    build, _ = HOSTILE_REQUESTS[case]
    reply = await bus.transport.request(rebuild_subject(bus.subjects), build(), timeout_s=10)
    answer = msgspec.json.decode(reply.data, type=ControlFailure)
    assert answer.message and len(answer.message) <= 2000
    await alive_and_unchanged(bus, seeded)
