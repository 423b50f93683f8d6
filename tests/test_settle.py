"""Settlement: the pure retry decision as a table, its wire form, and the report-before-ack batcher."""

from __future__ import annotations

import asyncio

import pytest

from bus import BusUnavailable, PermanentError, RetryableError, RetryPolicy
from bus.settle import (
    Ack,
    Nak,
    Outgoing,
    SettlementBatcher,
    Term,
    backoff_s,
    decide,
    outcome,
    wire,
)
from schemas.payloads import Settlement

POLICY = RetryPolicy(backoff_s=(0.5, 2.0, 10.0), max_deliver=5)


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "attempt", "expected"),
    [
        (None, 1, Ack()),
        (None, 5, Ack()),  # success on the last attempt is still a success
        (Boom("x"), 1, Nak(0.5)),  # any exception is retryable, with the policy's backoff
        (Boom("x"), 2, Nak(2.0)),
        (Boom("x"), 3, Nak(10.0)),
        (Boom("x"), 4, Nak(10.0)),  # the last backoff value repeats
        (RetryableError("busy"), 1, Nak(0.5)),
        (RetryableError("busy", delay_s=7.0), 1, Nak(7.0)),  # the error's delay overrides
        (RetryableError("busy", delay_s=-1.0), 2, Nak(0.0)),  # never a negative delay
        (PermanentError("bad input"), 1, Term("permanent", "PermanentError: bad input")),
        (PermanentError("bad input"), 5, Term("permanent", "PermanentError: bad input")),
        (Boom("still"), 5, Term("exhausted", "Boom: still")),  # last attempt failing: dead letter
        (RetryableError("busy", delay_s=1.0), 5, Term("exhausted", "RetryableError: busy")),
        (Boom("late"), 9, Term("exhausted", "Boom: late")),  # beyond max_deliver too
        (Boom(), 5, Term("exhausted", "Boom")),  # an empty message names the type alone
    ],
)
def test_decide_table(error: BaseException | None, attempt: int, expected: object) -> None:
    """decide() maps (error, attempt, policy) to ack / nak(delay) / term(reason, error)."""
    assert decide(error, attempt=attempt, policy=POLICY) == expected


def test_decide_with_single_delivery_terminates_on_first_failure() -> None:
    """With max_deliver=1 there is no retry: the first failure is the last attempt."""
    policy = RetryPolicy(backoff_s=(1.0,), max_deliver=1)
    assert decide(Boom("x"), attempt=1, policy=policy) == Term("exhausted", "Boom: x")


def test_long_error_text_is_truncated() -> None:
    """An error message is cut to a size fit for an event."""
    decision = decide(PermanentError("x" * 10_000), attempt=1, policy=POLICY)
    assert isinstance(decision, Term) and decision.error is not None
    assert len(decision.error) == 2000


@pytest.mark.parametrize(
    ("attempt", "delay"), [(0, 0.5), (1, 0.5), (2, 2.0), (3, 10.0), (50, 10.0)]
)
def test_backoff_per_attempt(attempt: int, delay: float) -> None:
    """Backoff after attempt n is backoff_s[n-1], the last value repeating."""
    assert backoff_s(attempt, POLICY) == delay


@pytest.mark.parametrize(
    ("decision", "payload", "result"),
    [
        (Ack(), b"+ACK", "handled"),
        (Nak(0.0), b"-NAK", "retried"),
        (Nak(1.5), b'-NAK {"delay":1500000000}', "retried"),
        (Term("permanent", "E: x"), b"+TERM permanent", "dead_lettered"),
        (Term("expired"), b"+TERM expired", "expired"),
    ],
)
def test_wire_and_outcome(decision: object, payload: bytes, result: str) -> None:
    """Each decision has one JetStream ack payload and one report outcome."""
    assert wire(decision) == payload  # type: ignore[arg-type]
    assert outcome(decision) == result  # type: ignore[arg-type]


def _item(seq: int, consumer: str = "a__inbox") -> Outgoing:
    return Outgoing(
        consumer, f"$JS.ACK.S.{consumer}.1.{seq}.{seq}.0.0", b"+ACK",
        Settlement(stream_seq=seq, attempt=1, outcome="handled"),
    )


class _Log:
    """Records, in order, what a batcher recorded and sent; can be told to fail recording."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.failures = 0

    async def record(self, consumer: str, settlements: list[Settlement], report_id: str) -> None:
        if self.failures:
            self.failures -= 1
            self.events.append(("failed", report_id))
            raise BusUnavailable("log unavailable")
        self.events.append(("report", (consumer, [s.stream_seq for s in settlements], report_id)))

    async def send(self, items: list[Outgoing]) -> None:
        self.events.extend(("send", item.settlement.stream_seq) for item in items if item.settlement)

    def sent(self, items: list[Outgoing]) -> None:
        self.events.append(("sent", len(items)))


async def test_batcher_records_each_consumer_before_sending() -> None:
    """A flush records one report per consumer, and only then sends the settlements."""
    log = _Log()
    batcher = SettlementBatcher(record=log.record, send=log.send, sent=log.sent, interval_s=60, max_items=10)
    for seq in (1, 2):
        batcher.add(_item(seq))
    batcher.add(_item(3, "a__groups"))
    await batcher.flush()
    kinds = [kind for kind, _ in log.events]
    assert kinds == ["report", "report", "send", "send", "send", "sent"]
    assert log.events[0][1][:2] == ("a__inbox", [1, 2])  # type: ignore[index]
    assert log.events[1][1][:2] == ("a__groups", [3])  # type: ignore[index]
    assert batcher.backlog == 0


async def test_batcher_sends_nothing_until_the_report_is_stored() -> None:
    """If the report cannot be stored, nothing is sent; the retry keeps the report id."""
    log = _Log()
    log.failures = 2
    batcher = SettlementBatcher(record=log.record, send=log.send, sent=log.sent, interval_s=60, max_items=10)
    batcher.add(_item(1))
    for _ in range(2):
        with pytest.raises(BusUnavailable):
            await batcher.flush()
    assert [kind for kind, _ in log.events] == ["failed", "failed"]
    assert batcher.backlog == 1
    await batcher.flush()
    assert [kind for kind, _ in log.events] == ["failed", "failed", "report", "send", "sent"]
    ids = {log.events[0][1], log.events[1][1], log.events[2][1][2]}  # type: ignore[index]
    assert len(ids) == 1, "a retried report keeps its id, so the log stores it once"


async def test_batcher_flushes_by_size_and_by_time() -> None:
    """run() flushes when max_items are queued, and otherwise within interval_s."""
    log = _Log()
    batcher = SettlementBatcher(record=log.record, send=log.send, sent=log.sent, interval_s=0.05, max_items=3)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(batcher.run())
        for seq in (1, 2, 3):
            batcher.add(_item(seq))
        await asyncio.wait_for(_until(lambda: ("sent", 3) in log.events), 2)
        batcher.add(_item(4))
        await asyncio.wait_for(_until(lambda: ("sent", 1) in log.events), 2)
        runner.cancel()
    reports = [payload[1] for kind, payload in log.events if kind == "report"]  # type: ignore[index]
    assert reports == [[1, 2, 3], [4]]


async def test_drain_gives_up_after_its_deadline() -> None:
    """drain() retries a failing report until its deadline, then reports False, sending nothing."""
    log = _Log()
    log.failures = 1_000
    batcher = SettlementBatcher(record=log.record, send=log.send, sent=log.sent, interval_s=60, max_items=10)
    batcher.add(_item(1))
    assert await batcher.drain(timeout_s=0.2) is False
    assert all(kind == "failed" for kind, _ in log.events)


async def _until(condition) -> None:  # type: ignore[no-untyped-def]
    while not condition():
        await asyncio.sleep(0.005)
