"""How a delivery ends: a pure decision, its wire form, and the batcher that records outcomes
before it sends them.

`decide(error, attempt=, policy=)` is the whole retry policy, a pure function (tested as a table):

    handler returned                          -> Ack
    PermanentError, ConfigurationError        -> Term("permanent")   dead-lettered at once
                                                 (a message no redelivery can make sendable)
    any error on the last attempt             -> Term("exhausted")   dead-lettered with the error
    RetryableError(delay_s=d)                 -> Nak(d)
    any other exception (RetryableError too)  -> Nak(policy backoff for this attempt)

`SettlementBatcher` keeps settlements until a flush (every `interval_s` or `max_items`), records
them as one `DeliveryReport` event per consumer, and only then sends the acks/naks/terms. So the
log never shows fewer outcomes than the broker settled. A crash between the report and the acks
causes a redelivery whose report repeats; duplicates are harmless because a settlement is
identified by (consumer, stream_seq, attempt) and the redelivery carries a higher attempt. A
report that is retried after an ambiguous publish keeps its id, so the log stores it once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec

from bus.config import RetryPolicy
from bus.errors import BusError, ConfigurationError, PermanentError, RetryableError
from schemas.ids import new_id
from schemas.payloads.delivery import Outcome, Settlement

log = logging.getLogger("continuum.settle")

# Dead-letter and termination reasons: a closed set, used as a metric label.
DeadReason = Literal[
    "permanent",       # the handler raised PermanentError
    "exhausted",       # the last allowed attempt failed
    "undecodable",     # the bytes are not an envelope
    "unknown_kind",    # an envelope whose payload kind this process does not know
    "invalid",         # a known kind whose fields do not validate
    "max_deliveries",  # the server gave up: no process settled it in max_deliver attempts
    "hop_limit",       # more handled messages led to it than the consumer's max_hops
    "forged_sender",   # its `sender` differs from the sender token of the subject it was published on
]
# An expired envelope is terminated too, but recorded as expired rather than dead-lettered.
EXPIRED = "expired"
# The dead-letter reason of a message past its consumer's max_hops.
HOP_LIMIT: DeadReason = "hop_limit"
# The dead-letter reason of an envelope claiming a sender its subject (which the server's
# permissions tie to the publisher's credential) does not carry.
FORGED_SENDER: DeadReason = "forged_sender"

IN_PROGRESS = b"+WPI"
# Error text kept in a record; what a hostile input makes a decoder say may be its whole value.
ERROR_CHARS = 2000
# A failed attempt's traceback kept in its settlement and dead letter: the frames nearest the
# failure (the end) when it is longer. Bounded so a dead letter still carries its original.
TRACEBACK_CHARS = 4000


class Ack(msgspec.Struct, frozen=True):
    """Done: remove the message from the consumer."""


class Nak(msgspec.Struct, frozen=True):
    """Redeliver after `delay_s` seconds."""

    delay_s: float


class Term(msgspec.Struct, frozen=True):
    """Never redeliver. `reason` is short and from a closed set; `error` says what happened."""

    reason: str
    error: str | None = None


Decision = Ack | Nak | Term


def describe(error: BaseException) -> str:
    """`Type: message` of an exception, truncated to a size fit for an event."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text[:ERROR_CHARS]


def describe_traceback(error: BaseException) -> str:
    """The traceback of `error` as Python prints it, cut to its last TRACEBACK_CHARS characters
    (the frames where it was raised) with a first line saying how much was cut."""
    text = "".join(traceback.format_exception(error))
    if len(text) <= TRACEBACK_CHARS:
        return text
    kept = text[-(TRACEBACK_CHARS - 64):]
    return f"(traceback cut: its first {len(text) - len(kept)} characters)\n" + kept


def backoff_s(attempt: int, policy: RetryPolicy) -> float:
    """The policy's delay after failed attempt `attempt` (1-based); the last value repeats."""
    delays = policy.backoff_s
    return delays[min(max(attempt, 1), len(delays)) - 1]


def decide(error: BaseException | None, *, attempt: int, policy: RetryPolicy) -> Decision:
    """Settle one delivery attempt: `error` is what the handler raised (None: it returned)."""
    if error is None:
        return Ack()
    if isinstance(error, (PermanentError, ConfigurationError)):
        return Term("permanent", describe(error))
    if attempt >= policy.max_deliver:
        return Term("exhausted", describe(error))
    if isinstance(error, RetryableError) and error.delay_s is not None:
        return Nak(max(0.0, error.delay_s))
    return Nak(backoff_s(attempt, policy))


def wire(decision: Decision) -> bytes:
    """The payload sent to the delivery's reply subject for `decision`."""
    if isinstance(decision, Ack):
        return b"+ACK"
    if isinstance(decision, Nak):
        if decision.delay_s <= 0:
            return b"-NAK"
        return b'-NAK {"delay":%d}' % int(decision.delay_s * 1_000_000_000)
    return b"+TERM " + decision.reason.encode()


def outcome(decision: Decision) -> Outcome:
    """How a decision appears in a `DeliveryReport`."""
    if isinstance(decision, Ack):
        return "handled"
    if isinstance(decision, Nak):
        return "retried"
    return "expired" if decision.reason == EXPIRED else "dead_lettered"


class Outgoing(msgspec.Struct, gc=False):
    """One settlement waiting for its report: where to send what, and what to record. (The
    engine's held deliveries are Outgoing themselves: one object per message.) `ack_subject`
    is the delivery's reply subject, as the bytes read off the wire.

    Untracked by the garbage collector: thousands are alive at once under load, and tracking
    them cost ~1 us per message in collections. An Outgoing must therefore never be part of a
    reference cycle that only the collector could break; its owner drops it explicitly once it
    is sent.
    """

    consumer: str
    ack_subject: bytes
    payload: bytes
    settlement: Settlement | None


RecordReport = Callable[[str, list[Settlement], str], Awaitable[None]]
SendAll = Callable[[list[Outgoing]], Awaitable[None]]


class SettlementBatcher:
    """Records settlements as reports, then sends them. `run()` is the periodic flushing task.

    `record(consumer, settlements, report_id)` must store the report durably (raising
    BusUnavailable when it cannot); `send(items)` then sends each item's payload to its ack
    subject, and `sent(items)` is told that they went out.
    """

    def __init__(
        self,
        *,
        record: RecordReport,
        send: SendAll,
        sent: Callable[[list[Outgoing]], None],
        interval_s: float,
        max_items: int,
    ) -> None:
        self._record = record
        self._send = send
        self._sent = sent
        self._interval_s = interval_s
        self._max_items = max(1, max_items)
        self._pending: list[Outgoing] = []
        self._first_at = 0.0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()
        # A batch whose report is being (re)tried keeps its report ids across attempts.
        self._batch: list[Outgoing] = []
        self._batch_ids: dict[str, str] = {}
        self._recorded: set[str] = set()

    @property
    def backlog(self) -> int:
        """Settlements decided but not yet sent."""
        return len(self._pending) + len(self._batch)

    def add(self, item: Outgoing) -> None:
        """Queue one settlement; a flush follows within `interval_s` (sooner when full)."""
        if not self._pending:
            self._first_at = time.monotonic()
            self._wake.set()
        self._pending.append(item)
        if len(self._pending) >= self._max_items:
            self._full.set()

    async def run(self) -> None:
        """Flush periodically until cancelled; a failing report is retried with backoff."""
        retry_s = 0.05
        while True:
            if not self._batch:
                await self._wake.wait()
            if self._pending and not self._batch:
                remaining = self._first_at + self._interval_s - time.monotonic()
                if remaining > 0 and len(self._pending) < self._max_items:
                    try:
                        await asyncio.wait_for(self._full.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
            try:
                await self.flush()
                retry_s = 0.05
            except BusError as exc:
                # Unavailable, or refused: either way the batch is kept and retried, never dropped.
                log.warning("cannot record a delivery report (%s); retrying in %.2fs", exc, retry_s)
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, 2.0)

    async def flush(self) -> None:
        """Record and send one batch (up to `max_items`). Raises BusUnavailable if the report
        cannot be stored; the batch is then kept and retried with the same report ids."""
        async with self._lock:
            if not self._batch:
                self._batch = self._pending[: self._max_items]
                del self._pending[: self._max_items]
                self._batch_ids = {}
                self._recorded = set()
                if len(self._pending) < self._max_items:
                    self._full.clear()
                if self._pending:
                    self._first_at = time.monotonic()
                else:
                    self._wake.clear()
            if not self._batch:
                return
            by_consumer: dict[str, list[Settlement]] = {}
            for item in self._batch:
                assert item.settlement is not None
                by_consumer.setdefault(item.consumer, []).append(item.settlement)
            for consumer, settlements in by_consumer.items():
                if consumer in self._recorded:
                    continue
                report_id = self._batch_ids.setdefault(consumer, new_id())
                await self._record(consumer, settlements, report_id)
                self._recorded.add(consumer)
            batch, self._batch = self._batch, []
            await self._send(batch)
            self._sent(batch)

    async def drain(self, timeout_s: float) -> bool:
        """Flush everything queued, retrying failed reports until `timeout_s`. Returns False
        when something could not be recorded in time (it is then left for redelivery)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        retry_s = 0.05
        while self._pending or self._batch:
            try:
                await self.flush()
            except BusError as exc:
                if loop.time() + retry_s > deadline:
                    log.warning("gave up recording %d settlements at shutdown (%s); they will be "
                                "redelivered", self.backlog, exc)
                    return False
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, 1.0)
        return True
