"""Scoped queries: with authorization on, an agent's queries are answered in its own scope (its
conversations, steps and model calls; the team's facts), whatever SQL it sends; the admin reads
everything. Real server, real credentials, a real projection service with its own credential."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bus import Bus
from bus.errors import PermissionDenied, QueryError
from bus.identity import Role
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas.payloads import Note
from schemas.payloads.memory import Citation, FactRecorded, TurnRecorded
from test_identity import Secured, _agent_bus, secured  # noqa: F401 - fixture

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
BOB_SECRET = "bob's private musing about the budget"


class Team:
    def __init__(self, admin: Bus, alice: Bus, last_seq: int) -> None:
        self.admin = admin
        self.alice = alice
        self.last_seq = last_seq

    async def alice_rows(self, sql: str) -> list[dict[str, Any]]:
        result = await self.alice.query(sql, min_seq=self.last_seq)
        return [dict(zip(result.columns, row)) for row in result.rows]


@pytest.fixture
async def team(secured: Secured, tmp_path: Path) -> AsyncIterator[Team]:
    service_credential = secured.registry.credential_path(Role.SERVICE, "projections")
    async with Bus(secured.admin()) as admin, Bus(secured.config("projections", service_credential)) as service_bus:
        settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
        async with ProjectionService(service_bus, settings):
            await admin.record("alice", TurnRecorded(agent="alice", turn=1, role="user", at=T0, text="alice's own question"))
            await admin.record("bob", TurnRecorded(agent="bob", turn=1, role="assistant", at=T0, text=BOB_SECRET))
            await admin.record("bob", FactRecorded(
                fact_id="f1", subject="sodium anodes", statement="cheaper than lithium", recorded_by="bob",
                source=Citation(ref="paper-1"), confidence=0.8,
            ))
            await admin.send("bob", Note(text=BOB_SECRET), sender="carol")
            last = await admin.send("alice", Note(text="hello alice"), sender="bob")
            alice = await _agent_bus(secured, "alice")
            try:
                yield Team(admin, alice, last.ack.seq)
            finally:
                await alice.__aexit__(None, None, None)


async def test_an_agent_reads_its_own_recall_and_the_teams_facts(team: Team) -> None:
    recall = await team.alice_rows("SELECT agent, text FROM recall ORDER BY seq")
    assert recall == [{"agent": "alice", "text": "alice's own question"}]
    facts = await team.alice_rows("SELECT subject, recorded_by FROM facts")
    assert facts == [{"subject": "sodium anodes", "recorded_by": "bob"}]
    messages = await team.alice_rows("SELECT sender, recipient FROM messages ORDER BY seq")
    assert messages == [{"sender": "bob", "recipient": "alice"}]
    everything = await team.admin.query("SELECT count(*) FROM recall", min_seq=team.last_seq)
    assert everything.rows == [[2]]
    as_alice = await team.admin.query("SELECT count(*) FROM recall", min_seq=team.last_seq, scope="alice")
    assert as_alice.rows == [[1]]


@pytest.mark.parametrize("sql", [
    "SELECT r.text FROM recall r JOIN recall r2 ON true",
    "SELECT text FROM (SELECT * FROM recall) WHERE agent = 'bob'",
    "WITH mine AS (SELECT * FROM recall) SELECT text FROM mine WHERE agent <> 'alice'",
    "SELECT text FROM recall UNION ALL SELECT text FROM recall",
    "SELECT text FROM recall WHERE agent = 'bob' OR true",
    "SELECT (SELECT string_agg(text, ',') FROM recall) AS text",
    "SELECT text FROM recall WHERE EXISTS (SELECT 1 FROM recall WHERE agent = 'bob')",
    "SELECT CAST(payload AS VARCHAR) AS text FROM events",
    "SELECT * FROM messages WHERE sender = 'carol'",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT text FROM recall, r",
    "FROM recall SELECT text",
    "SELECT text FROM RECALL",
    'SELECT text FROM "recall"',
])
async def test_sql_that_tries_to_reach_past_the_scope_sees_only_the_scope(team: Team, sql: str) -> None:
    rows = await team.alice_rows(sql)
    assert BOB_SECRET not in repr(rows)
    # The same SQL unscoped reaches further: the scope, not the SQL, kept it out.
    unscoped = await team.admin.query(sql, min_seq=team.last_seq)
    assert [dict(zip(unscoped.columns, row)) for row in unscoped.rows] != rows


@pytest.mark.parametrize("sql", [
    "SELECT * FROM main.recall",
    "SELECT * FROM v_recall_1.recall",
    "SELECT * FROM views.main.recall",
    "SELECT * FROM query_table('recall')",
    "SELECT * FROM query('SELECT * FROM recall')",
    "WITH recall AS (SELECT * FROM main.recall) SELECT * FROM recall",
    "WITH recall AS (SELECT 1 AS x) SELECT * FROM recall",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM _continuum.store",
    "SELECT * FROM fact_anomalies, chain_heads",
])
async def test_sql_that_names_relations_outside_the_scope_is_refused(team: Team, sql: str) -> None:
    with pytest.raises(QueryError) as refused:
        await team.alice.query(sql, min_seq=team.last_seq)
    assert refused.value.kind in ("not_allowed", "bad_sql")


async def test_an_agent_may_not_query_unscoped_or_as_another(team: Team) -> None:
    with pytest.raises(PermissionDenied):
        await team.alice.transport.request(team.alice.subjects.query, b'{"sql":"SELECT 1"}', timeout_s=5)
    with pytest.raises(PermissionDenied):
        await team.alice.query("SELECT text FROM recall", scope="bob")
