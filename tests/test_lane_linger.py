"""Lingering lanes: while no query waits for a lane's views, its live batches gather (up to
`linger_s`), so the lanes a writer waits for get the cores; a `min_seq` query for its views ends
the wait at once, and so does a backlog."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import wait_for

from bus import Bus
from projections.config import ProjectionSettings, QuerySettings
from projections.progress import Watermark
from projections.service import ProjectionService
from projections.workload import append_batches, synthetic_log
from schemas.payloads.memory import Citation, FactRecorded

# Far longer than any wait below: a lane that is not woken stays behind for the whole test.
LONG_LINGER_S = 60.0


@pytest.fixture
async def lingering(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    settings = ProjectionSettings(
        db_path=str(tmp_path / "views.duckdb"), linger_s=LONG_LINGER_S, batch_max=64, read_ahead=128,
        query=QuerySettings(max_lag_wait_s=20),
    )
    async with ProjectionService(bus, settings) as service:
        yield service


def fact(n: int) -> FactRecorded:
    return FactRecorded(fact_id=f"linger-{n}", subject="lane:linger", statement=f"fact {n}",
                        source=Citation(ref="test"), confidence=0.5, recorded_by="tester")


async def test_a_watermark_wakes_the_lanes_whose_views_a_new_waiter_reads() -> None:
    """`demand` wakes a lane when a waiter names one of its views, or names none (all views);
    `awaited` says whether a pending waiter reads the lane's views."""
    mark = Watermark(5)
    memory, log = asyncio.Event(), asyncio.Event()
    with mark.demand(["facts", "blocks"], memory.set), mark.demand(["events"], log.set):
        facts_waiter = asyncio.create_task(mark.wait_for(9, 10, ["facts"]))
        await asyncio.sleep(0)  # let it register (a scheduling step, not a wait on time)
        assert memory.is_set() and not log.is_set()
        assert mark.awaited(["facts", "blocks"]) and not mark.awaited(["events"])
        everything = asyncio.create_task(mark.wait_for(9, 10))
        await asyncio.sleep(0)
        assert log.is_set() and mark.awaited(["events"])
        mark.advance(9)
        assert await facts_waiter and await everything
        assert not mark.awaited(["facts"]) and not mark.awaited(["events"])
    assert mark._demand == []  # the lanes' registrations end with their blocks


async def test_a_lane_no_query_waits_for_lingers_until_one_does(bus: Bus, lingering: ProjectionService) -> None:
    """A fact write becomes visible to a `min_seq` query on `facts` at once, while the `events`
    lane, which no one waits for, still holds it back; a `min_seq` query on `events` then ends
    that lane's wait long before its linger would."""
    sent = await bus.record("tester", fact(1))

    found = await bus.query("SELECT fact_id FROM facts WHERE fact_id = ?", ["linger-1"], min_seq=sent.ack.seq,
                            timeout_s=20)

    assert found.rows == [["linger-1"]]
    assert lingering.watermark.seq_of(["events"]) < sent.ack.seq  # lingering: no one asked
    events = await bus.query("SELECT count(*) FROM events WHERE seq = ?", [sent.ack.seq], min_seq=sent.ack.seq,
                             timeout_s=20)
    assert events.rows == [[1]]


async def test_a_backlog_ends_the_linger(bus: Bus, lingering: ProjectionService) -> None:
    """With half a batch waiting (32 records here), a lane folds without lingering: 600 records
    appended with no query waiting are all folded but for a remainder smaller than that."""
    last = await append_batches(bus, list(synthetic_log(bus, 600, seed=3)))

    for view in ("events", "agents", "facts"):  # one view of each lane
        await wait_for(lambda view=view: lingering.watermark.seq_of([view]) > last - 32, timeout_s=20,
                       what=f"the {view} lane to fold all but a remainder")
