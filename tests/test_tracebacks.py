"""A failed attempt's traceback is recorded with its settlement and its dead letter, in the log,
and shown by the `messages` and `dead_letters` views. Real nats-server, real projection service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bus import Bus
from bus.settle import TRACEBACK_CHARS, describe_traceback
from conftest import wait_for
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas import Delivery, Envelope
from schemas.payloads import Note
from test_deadletter import dead_letters, fast, has_dead_letters


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


def _parse_ledger(text: str) -> int:
    return int(text.split(":")[1])  # ValueError on a line without a number


async def test_a_failing_handlers_traceback_reaches_the_log_and_the_views(bus: Bus, service: ProjectionService) -> None:
    """The handler fails deep in a helper on every attempt: each settlement, the dead letter, and
    the `messages` and `dead_letters` rows carry the traceback with the helper's frame and line."""

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        _parse_ledger(envelope.payload.text)

    sent = await bus.send("clerk", Note(text="no number here"))
    async with bus.consumer("clerk", handle, settings=fast()):
        await wait_for(has_dead_letters(bus, "clerk", 1), what="a dead letter")
    [letter] = await dead_letters(bus, "clerk")
    trace = letter.payload.traceback
    assert trace.startswith("Traceback (most recent call last):")
    assert "in _parse_ledger" in trace and "return int(text.split" in trace
    assert trace.rstrip().endswith("IndexError: list index out of range")

    messages = await bus.query("SELECT status, last_error, last_traceback FROM messages WHERE id = ?", [sent.envelope.id])
    [row] = messages.records()
    assert row["status"] == "dead_lettered" and row["last_error"] == "IndexError: list index out of range"
    assert "in _parse_ledger" in row["last_traceback"]
    dead = await bus.query("SELECT reason, traceback FROM dead_letters WHERE original_id = ?", [sent.envelope.id])
    assert [(r["reason"], "in _parse_ledger" in r["traceback"]) for r in dead.records()] == [("exhausted", True)]
    reports = await bus.query(
        "SELECT count(*) AS n FROM events WHERE kind = 'delivery.report' AND payload LIKE '%in _parse_ledger%'"
    )
    assert reports.records()[0]["n"] >= 1  # the settlements of the retried attempts carry it too


def test_a_long_traceback_keeps_its_last_frames() -> None:
    """A traceback over the bound keeps the frames nearest the failure and says how much it cut."""

    def fail(level: int) -> None:
        try:
            if level == 0:
                raise ValueError("the root cause")
            fail(level - 1)
        except ValueError as exc:
            # Each level adds a chained section (Python folds plain recursion, not chains).
            raise ValueError(f"level {level} failed") from exc

    with pytest.raises(ValueError) as caught:
        fail(60)
    text = describe_traceback(caught.value)
    assert len(text) <= TRACEBACK_CHARS
    assert text.startswith("(traceback cut: its first ") and text.rstrip().endswith("ValueError: level 60 failed")
