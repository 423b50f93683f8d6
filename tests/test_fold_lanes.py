"""Fold lanes: each lane of views commits on its own, and a read-your-writes query waits only for
the lanes of the views it reads (a query whose views are unknown waits for every lane)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bus import Bus, QueryError
from projections.config import ProjectionSettings, QuerySettings
from projections.progress import Watermark
from projections.relations import RelationReader
from projections.service import ProjectionService
from projections.views import VIEWS, Tx, ViewSpec
from schemas.payloads import Note

if TYPE_CHECKING:
    from projections.batch import Batch


class StallingView:
    """A view in the `runtime` lane whose fold blocks, on its lane's thread, on a batch holding
    a note that says "hold", until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()

    def fold(self, tx: Tx, s: str, batch: Batch) -> int:
        held = tx.rows("SELECT count(*) FROM batch WHERE payload->>'text' = 'hold'")[0][0]
        if held:
            self.holding.set()
            if not self.release.wait(30):
                raise RuntimeError("the test never released the stalled fold")
        return tx.run(f"INSERT INTO {s}.stall SELECT seq FROM batch")

    def spec(self) -> ViewSpec:
        return ViewSpec(
            name="stall", version=1, tables="CREATE TABLE {s}.stall (seq BIGINT)",
            relations={"stall": "SELECT * FROM {s}.stall"}, fold=self.fold, lane="runtime",
        )


@pytest.fixture
async def stalling(bus: Bus, tmp_path: Path) -> AsyncIterator[StallingView]:
    view = StallingView()
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), query=QuerySettings(max_lag_wait_s=20))
    try:
        async with ProjectionService(bus, settings, views=(*VIEWS, view.spec())):
            yield view
    finally:
        view.release.set()


async def test_a_query_on_a_committed_lane_is_answered_while_another_lane_folds(
    bus: Bus, stalling: StallingView
) -> None:
    """While the `runtime` lane is stuck folding a batch, a min_seq query that reads only `log`
    lane views (also through a CTE and a join) sees the write; queries that read the stuck
    view, or no view at all (so: every view), get a `lag` error; once the lane commits, they
    are answered too."""
    sent = await bus.send("alice", Note(text="hold"))
    assert await asyncio.to_thread(stalling.holding.wait, 10)

    events = await bus.query("SELECT kind FROM events WHERE seq = ?", [sent.ack.seq], min_seq=sent.ack.seq)
    joined = await bus.query(
        "WITH e AS (SELECT seq FROM events) SELECT m.status FROM e JOIN messages AS m USING (seq) WHERE seq = ?",
        [sent.ack.seq], min_seq=sent.ack.seq,
    )
    assert events.rows == [["note"]] and joined.rows == [["sent"]]
    assert events.applied_seq >= sent.ack.seq

    for sql in ("SELECT count(*) FROM stall", "SELECT 1", "SELECT count(*) FROM events, stall"):
        with pytest.raises(QueryError) as lagging:
            await bus.query(sql, min_seq=sent.ack.seq, timeout_s=0.5)
        assert lagging.value.kind == "lag", sql

    stalling.release.set()
    result = await bus.query("SELECT count(*) FROM stall WHERE seq = ?", [sent.ack.seq], min_seq=sent.ack.seq)
    assert result.rows == [[1]]
    assert (await bus.query("SELECT 1", min_seq=sent.ack.seq)).rows == [[1]]


async def test_a_lane_mark_releases_only_waiters_on_its_views() -> None:
    """`advance(seq, views)` releases waiters that read only those views; a waiter on every
    view (or on another view too) is released by the whole-batch `advance(seq)`."""
    mark = Watermark(10)
    on_events = asyncio.create_task(mark.wait_for(12, 5, ["events"]))
    on_both = asyncio.create_task(mark.wait_for(12, 5, ["events", "facts"]))
    on_all = asyncio.create_task(mark.wait_for(12, 5))
    await asyncio.sleep(0)

    mark.advance(12, ["events", "messages"])
    assert await asyncio.wait_for(on_events, 1) is True
    await asyncio.sleep(0)
    assert not on_both.done() and not on_all.done()
    assert mark.seq == 10 and mark.seq_of(["events"]) == 12 and mark.seq_of(["events", "facts"]) == 10

    mark.advance(12)
    assert await asyncio.wait_for(on_both, 1) is True and await asyncio.wait_for(on_all, 1) is True
    assert await mark.wait_for(13, 0.05, ["facts"]) is False


def test_relation_names_are_remembered_for_recent_queries() -> None:
    """A query parsed once is answered from memory the next time (no parse on the event loop's
    path), unparseable SQL is remembered as unknown, and only the most recent queries are kept."""
    reader = RelationReader(remember=2)
    try:
        assert reader.known("SELECT * FROM facts") == (False, None)
        assert reader.names("SELECT * FROM facts") == frozenset({"facts"})
        assert reader.known("SELECT * FROM facts") == (True, frozenset({"facts"}))
        assert reader.names("SELEC nonsense") is None
        assert reader.known("SELEC nonsense") == (True, None)
        reader.names("WITH e AS (SELECT 1) SELECT * FROM e, messages")
        assert reader.known("SELECT * FROM facts") == (False, None)  # the oldest, forgotten
        assert reader.known("WITH e AS (SELECT 1) SELECT * FROM e, messages") == (True, frozenset({"messages"}))
    finally:
        reader.close()
