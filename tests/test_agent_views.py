"""The `steps` view and the liveness columns of the `agents` view, folded from the events a real
supervised agent records (steps, start, heartbeats, crash, restart, stop)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from projections.batch import build_batch
from projections.store import Store
from projections.views import VIEWS

from agents.supervisor import SupervisorSettings
from bus import Bus, BusConfig
from bus.log_reader import LogReader, LogRecord
from schemas.payloads import Note, Ping
from conftest import wait_for
from test_supervisor import QUICK, agent_spec, supervised

VIEWS_UNDER_TEST = [v for v in VIEWS if v.name in ("agents", "steps")]


async def read_all(bus: Bus, *, after: int = 0) -> list[LogRecord]:
    last = await bus.last_seq()
    records: list[LogRecord] = []
    if last <= after:
        return records
    async with LogReader(bus, start_seq=after + 1) as reader:
        while not records or records[-1].seq < last:
            records += await reader.read(10_000)
    # Opened as the projection service opens private records before its folds (projections.opening).
    return [record._replace(data=await bus.unsealed(record.data)) for record in records]


def fold(path: Path, bus: Bus, records: list[LogRecord], *, batch_size: int) -> Store:
    store = Store(path, stream=bus.subjects.stream, views=VIEWS_UNDER_TEST)
    store.open()
    after = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        store.apply(build_batch(chunk, after_seq=after))
        after = chunk[-1].seq
    return store


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    return store.cursor().execute(sql).fetchall()


async def test_steps_and_liveness_are_views(bus_config: BusConfig, bus: Bus, tmp_path: Path) -> None:
    """Each recorded step is a row of `steps`; `agent_replicas` and `agents` show the state, pid,
    restarts and crashes of each replica, and `alive` while heartbeats are fresh; folding the
    same log in one batch or one event at a time gives the same tables."""
    spec = agent_spec(bus_config, "basic:Echo", "echo", heartbeat_s=0.2)
    async with supervised(bus, spec, SupervisorSettings(restart=QUICK)) as sup:
        first = (await sup.wait_ready(20)).replicas[0].pid
        ping = await bus.request("echo", Ping(text="one"), timeout_s=10)
        note = await bus.send("echo", Note(text="fwd", data={"to": "sink"}))
        await wait_for(lambda: sup.status().replicas[0].handled >= 2, what="both handled")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        status = await sup.wait_until(lambda s: s.replicas[0].restarts == 1 and s.replicas[0].state == "running", 20)
        second = status.replicas[0].pid
        await wait_for(lambda: sup.status().replicas[0].last_heartbeat > status.replicas[0].ready_at,
                       what="a heartbeat of the replacement")

        records = await read_all(bus)
        live = fold(tmp_path / "live.duckdb", bus, records, batch_size=10_000)
        folded = records[-1].seq
        looks: list[tuple[list[Any], list[Any]]] = []

        async def fresh_look() -> bool:
            # `alive` compares the last heartbeat folded with the time of the query (a window of
            # three 0.2 s intervals): fold what is new, then ask at once. On a loaded host a look
            # can come too late for the window; the next one folds newer heartbeats.
            nonlocal folded
            new = await read_all(bus, after=folded)
            if new:
                live.apply(build_batch(new, after_seq=folded))
                folded = new[-1].seq
            looks.append((
                rows(live, "SELECT replica, pid, state, alive, restarts, crashes FROM agent_replicas "
                           "WHERE name = 'echo'"),
                rows(live, "SELECT state, replicas, replicas_alive, restarts, crashes FROM agents "
                           "WHERE name = 'echo'"),
            ))
            return any(replica[3] for replica in looks[-1][0])

        await wait_for(fresh_look, interval_s=0.05, what="a fold of the fresh log showing the replacement alive")
        replicas, agents = looks[-1]
        assert replicas == [(0, second, "running", True, 1, 1)]
        assert agents == [("running", 1, 1, 1, 1)]
        live.close()

    records = await read_all(bus)
    whole = fold(tmp_path / "whole.duckdb", bus, records, batch_size=10_000)
    # By name, not by sequence: the two messages' steps ran at once (the note was sent as soon as
    # the reply came, while the request's step was still being recorded), and nothing orders one
    # message's step records against another's. Traced: the reply's record stored 0.7 ms before
    # the note's, or after it when the handling shifted by a millisecond.
    steps = rows(whole, "SELECT agent, inbound_id, step_index, name, attempt, result->>'id' FROM steps ORDER BY name")
    assert [s[:5] for s in steps] == [
        ("echo", ping.causation_id, 0, "reply", 1),
        ("echo", note.envelope.id, 0, "send:sink", 1),
    ]
    assert steps[0][5] == ping.id
    assert rows(whole, "SELECT pid, state, alive, restarts, crashes FROM agent_replicas") == [
        (second, "stopped", False, 1, 1)
    ]
    assert rows(whole, "SELECT state, replicas_alive, lifecycle FROM agents WHERE name = 'echo'") == [
        ("stopped", 0, "agent.stopped")
    ]
    one_by_one = fold(tmp_path / "incremental.duckdb", bus, records, batch_size=1)
    for table in ("steps", "agent_replicas", "agents"):
        exclude = "EXCLUDE (alive)" if table == "agent_replicas" else ""
        # As text: timestamps compare exactly without a timezone library.
        query = f"SELECT COLUMNS(*)::VARCHAR FROM (SELECT * {exclude} FROM {table}) ORDER BY ALL"
        assert rows(whole, query) == rows(one_by_one, query), table
    whole.close()
    one_by_one.close()
