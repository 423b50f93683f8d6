"""The consumer engine: pull an agent's messages, hand them to its handler by priority, settle.

    async with bus.consumer("planner", handle, tags=["team"]):
        ...  # consuming while inside the block

Enter ensures the durable consumers, then returns once the first pull requests reached the
server (readiness handshake):
    <agent>__inbox   deliver-all over `<ns>.inbox.<agent>.*`: a late joiner gets its backlog
    <agent>__groups  deliver-new over its tags' group subjects: broadcasts from the moment the
                     group consumer was first created on (older ones stay in the log and views)
Replicas of one agent name share both consumers (they split the work); different names each
get every broadcast.

Deliveries arrive, and their acks/naks/terms/+WPI leave, on a raw NATS connection of the
engine's own (bus.wire: frames parsed in bulk straight off the socket, no per-message `Msg`,
header parsing or task wake-up; writes coalesced per loop turn). That halved the engine's CPU
per delivered-and-acked message (~28 -> ~14 us here). The `Bus`'s nats-py connection keeps the
control plane: consumer creation, reports, dead letters, replies. The engine's connection
reconnects by itself; after a reconnect the pulls re-request their credit.

Inside, deliveries wait in a local priority window (bus.window) ordered by (priority desc,
stream seq) and `concurrency` workers take the highest first. Requested plus held messages
never exceed `concurrency + prefetch` (split between the two consumers when there are tags).
Each delivery ends in exactly one way:
    bytes that are not an envelope of a known kind -> dead letter with the original bytes, +TERM
    a broadcast this agent sent itself (an echo)   -> +ACK without running the handler
    an envelope past its expires_at                -> DeliveryExpired recorded, +TERM
    otherwise the handler runs, and `settle.decide` picks +ACK, -NAK with backoff, or +TERM
    with a dead letter (a dead request is answered with RequestFailed first)
While a message is held here (queued, running, or waiting for its report) it gets +WPI every
ack_wait/3, so a long handler keeps its message. (Queued ones too: that keeps a slow agent from
running a message twice, but a replica cannot take what another holds, so agents with slow
handlers should keep `prefetch` small.) Settlements are recorded as DeliveryReport
events before they are sent (see bus.settle).

Exit is ordered and bounded: stop pulling (and remove interest, so nothing handed back comes
back here) -> hand back (-NAK) what no handler started -> let
running handlers finish (up to drain_timeout_s, then cancel them and hand their messages back)
-> record and send pending settlements -> flush (the server has read every settlement) and
close the engine's connection -> stop the background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors

from bus.config import ConsumerSettings
from bus.deadletter import DeadLetterWatcher, answer_failed, loose_envelope, write_dead_letter
from bus.errors import BusError, BusUnavailable, ConfigurationError
from bus.meters import ConsumerMeters
from bus.pull import Delivered, PullSettings, RawPull, ack_facts
from bus.settle import (
    ERROR_CHARS,
    EXPIRED,
    FORGED_SENDER,
    HOP_LIMIT,
    IN_PROGRESS,
    Ack,
    Decision,
    Nak,
    Outgoing,
    SettlementBatcher,
    Term,
    backoff_s,
    decide,
    describe,
    describe_traceback,
    outcome,
    wire,
)
from bus.topology import agent_consumer_configs, ensure_consumer
from bus.wire import WireConnection, pub_frame
from bus.window import Held, PriorityWindow
from schemas import DecodeError, Delivery, Envelope, derived_id, stable_id
from schemas.envelope import PRIORITY_MAX
from schemas.payloads import DeliveryExpired, DeliveryReport, Settlement
from schemas.registry import kind_of_raw

if TYPE_CHECKING:
    from bus.client import Bus

log = logging.getLogger("continuum.consumer")

Handler = Callable[[Envelope[Any], Delivery], Awaitable[None]]

_NAK = b"-NAK"
_ACK = wire(Ack())
# Deliveries that need no handler (dead letters) go first: they are cheap and free the window.
_RANK_PROBLEM = -(PRIORITY_MAX + 1)


class ConsumerEngine:
    """Runs `handler` for every envelope sent to `agent` or broadcast to its `tags`.

    An async context manager; see the module docstring. Entering raises BusUnavailable when the
    consumers cannot be created. Leaving re-raises what the block raised; a crash of the engine
    itself cancels the block and surfaces as an ExceptionGroup.
    """

    def __init__(
        self,
        bus: "Bus",
        *,
        agent: str,
        tags: Sequence[str] = (),
        handler: Handler,
        settings: ConsumerSettings,
        pull_settings: PullSettings | None = None,
    ) -> None:
        self.agent = agent
        self.tags = tuple(tags)
        self.settings = settings
        self._bus = bus
        self._handler = handler
        self._pull_settings = pull_settings
        self._codec = bus.codec
        self._window = PriorityWindow()
        self._held: dict[int, Held] = {}
        self._next_key = 0
        self._pulls: list[RawPull] = []
        self._meters: dict[str, ConsumerMeters] = {}
        self._conn: WireConnection | None = None
        self._kinds: dict[type, str] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._background: list[asyncio.Task[None]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._closing = False
        self._batcher = SettlementBatcher(
            record=self._record_report,
            send=self._send,
            sent=self._on_sent,
            interval_s=settings.report_interval_s,
            max_items=settings.report_max,
        )
        window = settings.concurrency + settings.prefetch
        self._max_backlog = 2 * max(settings.report_max, window)
        self._watcher = DeadLetterWatcher(bus, agent=agent, settings=pull_settings)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "ConsumerEngine":
        if self._pulls:
            raise RuntimeError("a ConsumerEngine runs once; make a new one with bus.consumer()")
        bus = self._bus
        stream = bus.subjects.stream
        configs = agent_consumer_configs(bus.subjects, self.agent, self.tags, self.settings)
        window = self.settings.concurrency + self.settings.prefetch
        windows = [window] if len(configs) == 1 else [max(1, (window + 1) // 2), max(1, window // 2)]
        async def prepare() -> None:
            for config in configs:
                await ensure_consumer(bus.js, stream, config)

        try:
            # A credential that may not read or shape these consumers is refused at once.
            await bus.transport.guarded("$JS.API.CONSUMER.", prepare())
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise BusUnavailable(f"cannot create the consumers of agent {self.agent!r}: {exc}") from exc
        # Deliveries and their settlements travel on a connection of the engine's own.
        self._conn = conn = self._connection()
        await conn.connect()
        try:
            await self._watcher.start(conn)
        except BaseException as exc:
            await self._watcher.close()
            await conn.close()
            if isinstance(exc, (nats.errors.Error, asyncio.TimeoutError)):
                raise BusUnavailable(f"cannot watch the dead letters of agent {self.agent!r}: {exc}") from exc
            raise
        for config, share in zip(configs, windows):
            name = config.durable_name or ""
            self._meters[name] = ConsumerMeters(bus.metrics, name)

            async def recover(config: Any = config) -> None:
                await ensure_consumer(bus.js, stream, config)

            self._pulls.append(RawPull(
                conn, stream=stream, consumer=name, window=share, on_message=self._on_message,
                settings=self._pull_settings, may_pull=self._may_pull, recover=recover,
            ))
        self._tg = tg = asyncio.TaskGroup()
        await tg.__aenter__()
        try:
            self._workers = [tg.create_task(self._work()) for _ in range(self.settings.concurrency)]
            self._background = [
                tg.create_task(conn.run()),
                tg.create_task(self._batcher.run()),
                tg.create_task(self._keep_alive()),
                tg.create_task(self._watcher.run()),
                *(tg.create_task(pull.run()) for pull in self._pulls),
            ]
            for pull in self._pulls:
                await pull.start()
            await conn.flush()  # readiness: the first pull requests reached the server
        except BaseException as exc:
            self._closing = True
            await self._close_pulls()
            self._cancel(self._workers + self._background)
            await self._exit_group(type(exc), exc, exc.__traceback__)
            if isinstance(exc, (nats.errors.Error, asyncio.TimeoutError)):
                raise BusUnavailable(f"cannot start pulling for agent {self.agent!r}: {exc}") from exc
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._tg is None:
            return False
        try:
            await self._shutdown()
        except BaseException as err:
            # Interrupted (cancelled) while shutting down: stop everything and unwind.
            self._cancel(self._workers + self._background)
            await self._exit_group(type(err), err, err.__traceback__)
            raise
        self._cancel(self._background)
        return await self._exit_group(exc_type, exc, tb)

    async def _exit_group(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        tg, self._tg = self._tg, None
        # Held deliveries are untracked by the garbage collector and refer back to this engine
        # (through their pull): drop them here, on every way out, or the engine would leak.
        self._held.clear()
        self._window.close()
        if tg is None:
            return False
        # A CancelledError goes to the group, which tells its own cancellation of this task (a
        # child crashed) from an outside one. Any other error of the block propagates as it is
        # rather than wrapped in an ExceptionGroup; every child is stopped by now.
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            return bool(await tg.__aexit__(exc_type, exc, tb))
        await tg.__aexit__(None, None, None)
        return False

    async def _shutdown(self) -> None:
        self._closing = True
        # Remove interest first: a message handed back while a pull request of ours is still
        # waiting at the server would be delivered straight back here (up to max_deliver).
        for pull in self._pulls:
            pull.stop()
        for pull in self._pulls:
            await pull.close()
        # Nobody started these: hand them back now, so a replica (or the next start) gets them
        # without waiting for ack_wait.
        for held in self._window.close():
            await self._hand_back(held)
        running = [t for t in self._workers if not t.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=self.settings.drain_timeout_s)
            if late:
                log.warning("%s: %d handlers still running after %.1fs; cancelling them (their "
                            "messages will be redelivered)", self.agent, len(late),
                            self.settings.drain_timeout_s)
                self._cancel(late)
                # A handler that suppresses its cancellation would hold this up; that is its bug.
                await asyncio.wait(late)
        await self._batcher.drain(timeout_s=max(1.0, self.settings.drain_timeout_s))
        # Whatever is still held was cancelled mid-handler or its report could not be recorded.
        for held in list(self._held.values()):
            await self._hand_back(held)
        await self._close_pulls()
        for meters in self._meters.values():
            meters.push()

    def _connection(self) -> WireConnection:
        return self._bus.transport.wire(self.agent)

    async def _close_pulls(self) -> None:
        for pull in self._pulls:
            await pull.close()
        await self._watcher.close()
        conn = self._conn
        if conn is not None and not conn.is_closed:
            if conn.is_connected:
                try:
                    # Settlements written last must reach the server before the engine is done.
                    await conn.flush()
                except BusError as exc:
                    log.debug("%s: last settlements not confirmed: %s", self.agent, exc)
            await conn.close()

    @staticmethod
    def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
        for task in tasks:
            task.cancel()

    async def _hand_back(self, held: Held) -> None:
        self._held.pop(held.key, None)
        held.pull.release()
        self._settle_now(held.ack_subject, _NAK)

    def _settle_now(self, ack_subject: bytes, payload: bytes) -> None:
        assert self._conn is not None
        try:
            self._conn.write(pub_frame(ack_subject, payload))
        except BusError as exc:
            log.debug("cannot send %r to %r: %s", payload, ack_subject, exc)

    # -- intake ------------------------------------------------------------------------------

    def _may_pull(self) -> bool:
        return not self._closing and self._batcher.backlog < self._max_backlog

    def _on_message(self, pull: RawPull, msg: Delivered) -> None:
        reply = msg.raw_reply
        meta = ack_facts(reply)
        if meta is None:
            log.warning("%s: a delivery without a JetStream reply subject (%r) cannot be settled",
                        pull.consumer, reply)
            pull.release()
            return
        stream, consumer, attempt, stream_seq, consumer_seq, timestamp_ns, pending = meta
        meters = self._meters[pull.consumer]
        meters.delivered += 1
        if attempt > 1:
            meters.redelivered += 1
        delivery = Delivery(
            stream=stream,
            consumer=consumer,
            # Any client may choose the last token of an inbox subject; bytes stay readable.
            subject=msg.raw_subject.decode(errors="replace"),
            stream_seq=stream_seq,
            consumer_seq=consumer_seq,
            attempt=attempt,
            pending=pending,
            published_at=datetime.fromtimestamp(timestamp_ns / 1e9, timezone.utc),
        )
        data = msg.data
        envelope: Envelope[Any] | None
        try:
            envelope = self._codec.decode(data)
            problem = None
            rank = -envelope.priority
            # The subject's last token is the sender the server's permissions vouched for
            # (`<ns>.inbox.<to>.<from>`, `<ns>.group.<tag>.<from>`); the envelope must agree.
            claimed = delivery.subject.rpartition(".")[2]
            if envelope.sender != claimed:
                problem = (FORGED_SENDER, f"the envelope says it is from {envelope.sender!r} but was published "
                           f"as {claimed!r} (subject {delivery.subject})"[:ERROR_CHARS])
                rank = _RANK_PROBLEM
        except DecodeError as exc:
            envelope, problem = self._diagnose(data, exc)
            rank = _RANK_PROBLEM
        except Exception as exc:  # noqa: BLE001 - an upcaster failing on odd input is the input's fault
            envelope, problem = loose_envelope(data), ("invalid", describe(exc))
            rank = _RANK_PROBLEM
        key = self._next_key
        self._next_key = key + 1
        held = Held(meters.consumer, reply, b"", None, key, pull, meters, data, delivery, envelope, problem,
                    time.monotonic())
        self._held[key] = held
        self._window.push(rank, stream_seq, held)

    def _diagnose(self, data: bytes, exc: DecodeError) -> tuple[Envelope[Any] | None, tuple[str, str]]:
        loose = loose_envelope(data)
        if loose is None:
            return None, (exc.problem, str(exc)[:ERROR_CHARS])
        kind = kind_of_raw(loose.payload)
        if kind is None or self._codec.registry.type_for(kind) is None:
            return loose, ("unknown_kind", f"payload kind {kind!r} is not registered in this process")
        return loose, ("invalid", str(exc)[:ERROR_CHARS])

    # -- workers ---------------------------------------------------------------------------

    async def _work(self) -> None:
        agent = self.agent
        max_hops = self.settings.max_hops
        take_nowait = self._window.take_nowait
        while True:
            # Take without awaiting while the window has work: a coroutine per take is measurable.
            held = take_nowait()
            if held is None:
                held = await self._window.take()
                if held is None:
                    return
            envelope = held.envelope
            if (
                held.problem is None
                and envelope is not None
                and envelope.expires_at is None
                and (envelope.tag is None or envelope.sender != agent)
                and envelope.hops <= max_hops
            ):
                await self._handle(held, envelope)
            else:
                await self._special(held)
            pull = held.pull
            if pull.release():
                await pull.pull()

    # -- one delivery --------------------------------------------------------------------------

    async def _handle(self, held: Held, envelope: Envelope[Any]) -> None:
        """Run the handler and queue the settlement `decide` picks."""
        meters = held.meters
        error: BaseException | None = None
        meters.running += 1
        # What the handler queries then reflects at least the message it is handling.
        self._bus.saw(held.delivery.stream_seq)
        started = time.perf_counter()
        try:
            await self._handler(envelope, held.delivery)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this worker is being cancelled: the message is handed back
            # The handler let a CancelledError of its own escape; that is a handler failure.
            error = exc
        except Exception as exc:  # noqa: BLE001 - any handler failure is settled, never lost
            error = exc
        finally:
            elapsed = time.perf_counter() - started
            meters.running -= 1
            meters.durations.append(elapsed)
        delivery = held.delivery
        if error is None:
            payload_type = type(envelope.payload)
            kind = self._kinds.get(payload_type) or self._kinds.setdefault(payload_type, envelope.kind)
            held.payload = _ACK
            held.settlement = Settlement(
                stream_seq=delivery.stream_seq, attempt=delivery.attempt, outcome="handled",
                envelope_id=envelope.id, kind=kind, handler_ms=round(elapsed * 1000.0, 3),
            )
            self._batcher.add(held)
            return
        decision = decide(error, attempt=delivery.attempt, policy=self.settings.retry)
        trace = describe_traceback(error)
        # In the process's log too (a replica's log file: `bus agent logs`), traceback included.
        log.warning(
            "%s: %s at seq %d failed on attempt %d (%s): %s\n%s", delivery.consumer, envelope.kind,
            delivery.stream_seq, delivery.attempt, type(decision).__name__.lower(), describe(error), trace.rstrip(),
        )
        settlement = self._settlement(
            held, outcome(decision), handler_ms=round(elapsed * 1000.0, 3), error=describe(error), traceback=trace,
        )
        if isinstance(decision, Term):
            try:
                await self._dead_letter(held, decision.reason, decision.error, traceback=trace)
            except BusError as exc:
                decision, settlement = self._later(held, exc)
            else:
                meters.dead(decision.reason)
        held.payload = wire(decision)
        held.settlement = settlement
        self._batcher.add(held)

    async def _special(self, held: Held) -> None:
        """Deliveries that may not reach the handler: undecodable, echoes, expired envelopes."""
        envelope = held.envelope
        meters = held.meters
        decision: Decision
        try:
            if held.problem is not None:
                reason, error = held.problem
                await self._dead_letter(held, reason, error)
                meters.dead(reason)
                decision, settlement = Term(reason, error), self._settlement(held, "dead_lettered", error=error)
            elif envelope is None:  # pragma: no cover - a decoded envelope or a problem, always
                raise AssertionError("a delivery without envelope or problem")
            elif envelope.tag is not None and envelope.sender == self.agent:
                decision, settlement = Ack(), self._settlement(held, "skipped")
            elif envelope.hops > self.settings.max_hops:
                error = (
                    f"{envelope.hops} handled messages led to this one, over max_hops "
                    f"{self.settings.max_hops}: agents answering each other without end? (conversation "
                    f"{envelope.correlation_id})"
                )
                await self._dead_letter(held, HOP_LIMIT, error)
                meters.dead(HOP_LIMIT)
                decision, settlement = Term(HOP_LIMIT, error), self._settlement(held, "dead_lettered", error=error)
            elif envelope.is_expired():
                await self._expire(held, envelope)
                meters.expired()
                decision, settlement = Term(EXPIRED), self._settlement(held, "expired")
            else:
                await self._handle(held, envelope)
                return
        except BusError as exc:
            decision, settlement = self._later(held, exc)
        held.payload = wire(decision)
        held.settlement = settlement
        self._batcher.add(held)

    def _later(self, held: Held, exc: BusError) -> tuple[Decision, Settlement]:
        """A dead letter, expiry record or failure reply could not be stored: redeliver later.
        (On the last attempt the server gives up instead, and the dead-letter watcher writes
        the dead letter from its MAX_DELIVERIES advisory.) Never more than that: one message
        that cannot be recorded must not stop the engine."""
        delivery = held.delivery
        log.warning("%s seq %d: %s; redelivering later", delivery.consumer, delivery.stream_seq, exc)
        self._bus.metrics.dead_letter_failures.labels(delivery.consumer).inc()
        return (
            Nak(backoff_s(delivery.attempt, self.settings.retry)),
            self._settlement(held, "retried", error=describe(exc)),
        )

    @staticmethod
    def _settlement(
        held: Held, result: Any, *, handler_ms: float = 0.0, error: str | None = None, traceback: str | None = None,
    ) -> Settlement:
        envelope = held.envelope
        kind: str | None = None
        if envelope is not None:
            # A loose envelope (the payload did not decode) carries its payload raw.
            kind = kind_of_raw(envelope.payload) if isinstance(envelope.payload, msgspec.Raw) else envelope.kind
        return Settlement(
            stream_seq=held.delivery.stream_seq,
            attempt=held.delivery.attempt,
            outcome=result,
            envelope_id=None if envelope is None else envelope.id,
            kind=kind,
            handler_ms=handler_ms,
            error=error,
            traceback=traceback,
        )

    async def _dead_letter(self, held: Held, reason: str, error: str | None, *, traceback: str | None = None) -> None:
        delivery = held.delivery
        await write_dead_letter(
            self._bus,
            agent=self.agent,
            consumer=delivery.consumer,
            stream=delivery.stream,
            stream_seq=delivery.stream_seq,
            subject=delivery.subject,
            original=held.data,
            reason=reason,
            deliveries=delivery.attempt,
            error=error,
            envelope=held.envelope,
            traceback=traceback,
        )

    async def _expire(self, held: Held, envelope: Envelope[Any]) -> None:
        assert envelope.expires_at is not None
        await answer_failed(
            self._bus, envelope, reason=f"expired at {envelope.expires_at.isoformat()} before it was handled",
            error_type=EXPIRED, sender=self.agent,
        )
        delivery = held.delivery
        await self._bus.record(
            self.agent,
            DeliveryExpired(
                agent=self.agent,
                original_id=envelope.id,
                original_kind=envelope.kind,
                original_seq=delivery.stream_seq,
                expired_at=envelope.expires_at,
            ),
            # Stored once however often the expired message is delivered.
            id=stable_id(delivery.stream, delivery.stream_seq, "expired"),
            correlation_id=envelope.correlation_id,
            causation_id=envelope.id,
        )

    # -- settlement ------------------------------------------------------------------------------

    async def _record_report(self, consumer: str, settlements: list[Settlement], report_id: str) -> None:
        try:
            await self._bus.record(
                self.agent,
                DeliveryReport(agent=self.agent, consumer=consumer, settlements=settlements),
                id=report_id,
            )
        except ConfigurationError:
            # Over the server's max_payload (a server configured smaller than nats.conf: 1,000
            # settlements with long errors reach ~2 MB): recorded in halves, each under an id
            # derived from the report's, so a retried report is still stored once.
            if len(settlements) < 2:
                raise
            half = len(settlements) // 2
            await self._record_report(consumer, settlements[:half], derived_id(report_id, "first half"))
            await self._record_report(consumer, settlements[half:], derived_id(report_id, "second half"))

    async def _send(self, items: list[Outgoing]) -> None:
        assert self._conn is not None
        # One buffer, one write: the frames leave in one send at the end of this loop turn.
        frames = b"".join([b"PUB %b %d\r\n%b\r\n" % (item.ack_subject, len(item.payload), item.payload)
                           for item in items])
        try:
            self._conn.write(frames)
        except BusError as exc:
            # Closed, or disconnected too long: the server redelivers, and the report repeats
            # (harmless; see bus.settle).
            log.warning("cannot send %d settlements: %s", len(items), exc)

    def _on_sent(self, items: list[Outgoing]) -> None:
        held_by_key = self._held
        for held in items:  # the engine only ever adds Held items
            held_by_key.pop(held.key, None)  # type: ignore[attr-defined]
            result = held.settlement.outcome  # type: ignore[union-attr]
            if result == "handled" or result == "skipped":
                held.meters.acked += 1  # type: ignore[attr-defined]
            elif result == "retried":
                held.meters.nacked += 1  # type: ignore[attr-defined]
        for meters in self._meters.values():
            meters.push()
        # The settlement backlog shrank: pulling may be allowed again (else it would wait for
        # the next handler to finish, or the watchdog's tick).
        for pull in self._pulls:
            pull.request()

    async def _keep_alive(self) -> None:
        """+WPI every ack_wait/3 for every held message, so none is redelivered while held."""
        every = self.settings.ack_wait_s / 3.0
        while True:
            # The tick also keeps the in-flight gauge fresh while nothing gets settled.
            await asyncio.sleep(min(every / 2.0, 0.5))
            for meters in self._meters.values():
                meters.push()
            now = time.monotonic()
            for held in [h for h in self._held.values() if now - h.touched >= every]:
                held.touched = now
                self._settle_now(held.ack_subject, IN_PROGRESS)
