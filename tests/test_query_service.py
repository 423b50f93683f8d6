"""The query service: typed answers over the bus, read-your-writes, and a read-only sandbox that
neither host files nor the views can be reached through."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from bus import Bus, QueryError
from projections.config import ProjectionSettings, QuerySettings
from projections.service import ProjectionService
from projections.workload import append_batches, synthetic_log
from schemas.payloads import Note
from schemas.query import QueryFailure, QueryRequest, QueryResult

SECRET = "s3cr3t-marker-7d1f"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def service(bus: Bus, tmp_path: Path, registry: CollectorRegistry) -> AsyncIterator[ProjectionService]:
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), query=QuerySettings(max_rows=500))
    async with ProjectionService(bus, settings, registry=registry) as svc:
        yield svc


async def fail(bus: Bus, sql: str, **kwargs: object) -> QueryError:
    with pytest.raises(QueryError) as info:
        await bus.query(sql, **kwargs)  # type: ignore[arg-type]
    return info.value


async def test_a_query_returns_columns_types_and_rows(bus: Bus, service: ProjectionService) -> None:
    """`bus.query` returns a QueryResult: column names, DuckDB types, rows, and the sequence the
    views had applied; `records()` gives typed dicts."""
    sent = await bus.send("alice", Note(text="hello", data={"n": 1}))

    result = await bus.query(
        "SELECT seq, kind, stored_at, payload FROM events WHERE recipient = ?", ["alice"], min_seq=sent.ack.seq
    )

    assert result.columns == ["seq", "kind", "stored_at", "payload"]
    assert result.types == ["BIGINT", "VARCHAR", "TIMESTAMP WITH TIME ZONE", "JSON"]
    assert result.rows[0][:2] == [sent.ack.seq, "note"] and result.applied_seq >= sent.ack.seq
    [record] = result.records()
    assert record["payload"]["data"] == {"n": 1} and record["stored_at"].tzinfo is not None
    assert not result.truncated


async def test_min_seq_waits_until_the_write_is_applied(bus: Bus, service: ProjectionService) -> None:
    """Read-your-writes: right after 3,000 events are stored, a query with min_seq = the last ack
    sees all of them, although the projection was still folding when it was asked."""
    last = await append_batches(bus, list(synthetic_log(bus, 3000, seed=5)))
    lagging = service.applied_seq < last

    result = await bus.query("SELECT count(*), max(seq) FROM events", min_seq=last)

    assert result.rows == [[3000, last]] and result.applied_seq >= last
    assert lagging or service.applied_seq == last  # (when it was already there, nothing was proven)


async def test_min_seq_past_the_end_of_the_log_is_a_lag_error_after_the_bound(bus: Bus, tmp_path: Path) -> None:
    """A min_seq that is not applied within the service's bound (0.5 s here) gets a clear `lag`
    error, after the bound and not much later."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), query=QuerySettings(max_lag_wait_s=0.5))
    async with ProjectionService(bus, settings):
        sent = await bus.send("alice", Note(text="x"))
        await bus.query("SELECT 1", min_seq=sent.ack.seq)
        started = time.monotonic()

        error = await fail(bus, "SELECT 1", min_seq=sent.ack.seq + 1000)

        waited = time.monotonic() - started
    assert error.kind == "lag" and f"seq {sent.ack.seq + 1000}" in str(error)
    assert 0.45 <= waited < 3.0


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('{path}')",
    "SELECT * FROM read_text('{path}')",
    "SELECT * FROM read_blob('{path}')",
    "SELECT * FROM read_json('{path}')",
    "SELECT * FROM read_parquet('{path}')",
    "SELECT * FROM glob('{dir}/*')",
    "SELECT * FROM '{path}'",
    "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
])
async def test_a_query_cannot_read_host_files(bus: Bus, service: ProjectionService, tmp_path: Path, sql: str) -> None:
    """File and network readers are disabled: the query fails and the file's content never
    appears in the answer."""
    secret = tmp_path / "secret.csv"
    secret.write_text(f"key\n{SECRET}\n")

    error = await fail(bus, sql.format(path=secret, dir=tmp_path))

    assert error.kind in ("not_allowed", "bad_sql") and SECRET not in str(error)


@pytest.mark.parametrize("sql", [
    "COPY events TO '{dir}/out.csv'",
    "COPY (SELECT 1) TO '{dir}/out.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{dir}/dump'",
    "ATTACH '{dir}/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET lock_configuration",
    "PRAGMA threads=1",
    "DELETE FROM events",
    "UPDATE messages SET status = 'handled'",
    "INSERT INTO events (seq, subject) VALUES (-1, 'x')",
    "DROP VIEW events",
    "DROP TABLE _continuum.generations",
    "CREATE TABLE evil AS SELECT 1",
    "CREATE TEMP TABLE evil AS SELECT * FROM events",
    "CREATE OR REPLACE VIEW main.events AS SELECT 1 AS seq",
    "ALTER TABLE _continuum.generations ADD COLUMN x INT",
    "CHECKPOINT",
    "VACUUM",
    "DETACH DATABASE memory",
    "CALL pragma_version()",
    "SELECT 1; DELETE FROM events",
    "BEGIN TRANSACTION",
    "SELECT * FROM query('DELETE FROM events')",
])
async def test_a_query_cannot_write_reconfigure_or_escape(bus: Bus, service: ProjectionService, tmp_path: Path, sql: str) -> None:
    """Writes, DDL, COPY/EXPORT/ATTACH, extensions, settings and multi-statements are refused
    (and nothing they name appears on disk); the views are unchanged afterwards."""
    last = await append_batches(bus, list(synthetic_log(bus, 200, seed=9)))
    await bus.query("SELECT 1", min_seq=last)
    before = await service.content_hashes()

    error = await fail(bus, sql.format(dir=tmp_path))

    assert error.kind in ("not_allowed", "bad_sql")
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "dump").exists() and not (tmp_path / "other.duckdb").exists()
    assert await service.content_hashes() == before
    assert (await bus.query("SELECT count(*) FROM events")).rows == [[200]]


async def test_writes_fail_even_when_disguised_as_a_select(service: ProjectionService) -> None:
    """The read-only transaction is a second wall: a SELECT that writes (nextval advances a
    sequence) is refused by DuckDB itself."""
    store = service.store
    assert store is not None
    await service._writer.call(lambda: store.con.execute("CREATE SEQUENCE _continuum.probe").fetchall())

    answer = await service.query(QueryRequest(sql="SELECT nextval('_continuum.probe')"))

    assert isinstance(answer, QueryFailure) and answer.kind == "not_allowed" and "read-only" in answer.message


async def test_rows_past_the_limit_are_not_returned(bus: Bus, service: ProjectionService) -> None:
    """A result is cut at the request's max_rows (and never past the service's cap, 500 here)."""
    small = await bus.query("SELECT range AS n FROM range(1000)", max_rows=10)
    capped = await bus.query("SELECT range AS n FROM range(100000)", max_rows=100_000)

    assert small.truncated and [r[0] for r in small.rows] == list(range(10))
    assert capped.truncated and len(capped.rows) == 500


async def test_a_query_past_its_time_limit_is_interrupted(bus: Bus, service: ProjectionService) -> None:
    """A runaway query is interrupted at its time limit with a `timeout` error, and the
    connection is usable for the next query."""
    started = time.monotonic()

    error = await fail(bus, "SELECT count(*) FROM range(100000000000) t(x) WHERE x % 7 = 3", timeout_s=0.5)

    assert error.kind == "timeout" and time.monotonic() - started < 3.0
    for _ in range(3):  # every worker connection still answers
        assert (await bus.query("SELECT 42")).rows == [[42]]


@pytest.mark.parametrize(("sql", "params", "says"), [
    ("SELEC 1", [], "syntax error"),
    ("SELECT * FROM no_such_view", [], "no_such_view"),
    ("SELECT nope FROM events", [], "nope"),
    ("SELECT ?", [], "parameter"),
    ("SELECT CAST('x' AS INTEGER)", [], "Could not convert"),
])
async def test_bad_sql_gets_a_clear_error(bus: Bus, service: ProjectionService, sql: str, params: list[object], says: str) -> None:
    """Bad SQL is answered with kind `bad_sql` and DuckDB's explanation."""
    error = await fail(bus, sql, params=params)

    assert error.kind == "bad_sql" and says.lower() in str(error).lower()


async def test_a_malformed_request_is_answered_and_changes_nothing(bus: Bus, service: ProjectionService) -> None:
    """Bytes that are not a QueryRequest get a failure answer; the service keeps answering."""
    reply = await bus.transport.request(bus.subjects.query, b"{not json", timeout_s=5)
    answer = msgspec.json.decode(reply.data, type=QueryResult | QueryFailure)

    assert isinstance(answer, QueryFailure) and answer.kind == "bad_sql" and "malformed" in answer.message
    assert (await bus.query("SELECT 1")).rows == [[1]]


async def test_a_result_too_large_for_one_message_is_refused(bus: Bus, service: ProjectionService) -> None:
    """A result bigger than the server's message limit is a `too_large` error, not a lost reply."""
    error = await fail(bus, "SELECT repeat('x', 1000000) AS blob FROM range(400)")

    assert error.kind == "too_large" and "bytes" in str(error)


async def test_query_metrics_and_lag_are_exported(bus: Bus, service: ProjectionService, registry: CollectorRegistry) -> None:
    """Query latency by outcome, applied events, checkpoint and lag are in the injected registry."""
    sent = await bus.send("alice", Note(text="x"))
    await bus.query("SELECT 1", min_seq=sent.ack.seq)
    await fail(bus, "DELETE FROM events")

    value = registry.get_sample_value
    assert value("continuum_query_seconds_count", {"outcome": "ok"}) == 1
    assert value("continuum_query_seconds_count", {"outcome": "not_allowed"}) == 1
    assert value("continuum_projection_events_applied_total", {"target": "live"}) >= 1
    assert value("continuum_projection_checkpoint", {"view": "events"}) == sent.ack.seq
    assert value("continuum_projection_lag_events") == 0
    assert value("continuum_projection_lag_seconds") is not None


async def _cli(bus: Bus, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `bus query ...` in a subprocess (off the event loop: the service answers on it)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bus.cli.main", "query", "--url", bus.config.url, "--creds", str(bus.config.credentials), *args],
        capture_output=True, text=True, timeout=60,
    )


async def test_bus_query_prints_table_json_and_csv(bus: Bus, service: ProjectionService) -> None:
    """`bus query` prints an aligned table, a JSON array of row objects (JSON columns as JSON),
    or CSV with a header; a refused query exits non-zero with the reason."""
    sent = await bus.send("alice", Note(text="hi, there"))
    sql = "SELECT seq, kind, payload FROM events WHERE seq = ?"
    common = ["--min-seq", str(sent.ack.seq), "--param", str(sent.ack.seq)]

    as_json = await _cli(bus, sql, "--format", "json", *common)
    as_csv = await _cli(bus, sql, "--format", "csv", *common)
    as_table = await _cli(bus, sql, *common)
    refused = await _cli(bus, "DROP VIEW events")

    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [{"seq": sent.ack.seq, "kind": "note", "payload": {"kind": "note", "text": "hi, there", "data": {}}}]
    assert as_csv.stdout.splitlines()[0] == "seq,kind,payload"
    assert as_csv.stdout.splitlines()[1].startswith(f'{sent.ack.seq},note,"{{')
    assert as_table.stdout.splitlines()[0].split() == ["seq", "kind", "payload"] and "(1 row;" in as_table.stdout
    assert refused.returncode != 0 and "only SELECT" in refused.stderr
