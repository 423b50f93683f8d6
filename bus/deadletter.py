"""Dead letters: the record of a message that will not be handled, with its exact bytes and why.

Two writers, one record. The consumer engine writes a dead letter itself when it terminates a
message (permanent error, last attempt failed, undecodable bytes, unknown kind). When the process
died on every attempt, nobody decided anything: the server then emits a MAX_DELIVERIES advisory,
which the advisory stream keeps. The `DeadLetterWatcher` inside every engine reads its agent's
advisories, fetches the original by stream sequence (direct get) and writes the dead letter.

Both writers use the id `stable_id(stream, seq, "dead")`, so within the log's duplicate window
the dead letter is stored once whoever writes it (and however often); readers key on that id,
so a duplicate written after the window is harmless.

A dead request is first answered with `RequestFailed`, so its requester gets RemoteError at once
instead of waiting for its timeout.

A dead letter always fits in one message. The original travels base64-encoded (4/3 of its size),
so an original over `MAX_CARRIED_BYTES`, or over what the server's `max_payload` leaves room
for, is referred to by stream sequence, size and SHA-256 instead (it stays in the log).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import nats.errors

from bus.cancellation import cancellation_kept
from bus.errors import BusError, ConfigurationError
from bus.pull import Delivered, PullSettings, RawPull
from bus.settle import ERROR_CHARS, TRACEBACK_CHARS
from bus.topology import dead_letter_consumer_config, ensure_advisory_stream, ensure_consumer
from bus.wire import WireConnection
from schemas import DecodeError, Envelope, decode_loose, stable_id
from schemas.ids import is_id
from schemas.payloads import DeadLettered, RequestFailed
from schemas.limits import refusal
from schemas.registry import kind_of_raw

if TYPE_CHECKING:
    from bus.client import Bus

log = logging.getLogger("continuum.deadletter")

_RETRY_NS = 1_000_000_000

# Originals up to this size travel inside their dead letter; larger ones are referred to.
MAX_CARRIED_BYTES = 1024 * 1024
# Room in a dead letter for everything but the original: error text, subject, ids, JSON.
_LETTER_OVERHEAD_BYTES = 64 * 1024


def carried_limit(max_payload: int) -> int:
    """The largest original a dead letter carries on a server with this `max_payload`."""
    return max(0, min(MAX_CARRIED_BYTES, (max_payload - _LETTER_OVERHEAD_BYTES) * 3 // 4))


def dead_letter_id(stream: str, stream_seq: int) -> str:
    """The one id of the dead letter of the message at `stream_seq`, whoever writes it."""
    return stable_id(stream, stream_seq, "dead")


async def write_dead_letter(
    bus: "Bus",
    *,
    agent: str,
    consumer: str,
    stream: str,
    stream_seq: int,
    subject: str,
    original: bytes,
    reason: str,
    deliveries: int,
    error: str | None,
    envelope: Envelope[Any] | None,
    traceback: str | None = None,
) -> None:
    """Answer a dead request with RequestFailed, then store the dead letter on
    `<ns>.dead.<agent>`. `envelope` is the original, decoded as far as it could be (None when
    the bytes are not an envelope). An original too large to carry is referred to (see the
    module docstring). Raises BusUnavailable when either cannot be stored, and BusError when
    the server refuses them."""
    if error is not None:
        error = error[:ERROR_CHARS]
    if envelope is not None:
        await answer_failed(bus, envelope, reason=error or reason, error_type=reason, sender=agent)
    kind: str | None = None
    if envelope is not None:
        kind = envelope.kind if not isinstance(envelope.payload, msgspec.Raw) else kind_of_raw(envelope.payload)
        kind = None if kind is None else kind[:ERROR_CHARS]
    size = len(original)
    carried = original if size <= carried_limit(bus.max_payload) else b""
    letter = bus.envelope(
        DeadLettered(
            reason=reason,
            agent=agent,
            consumer=consumer,
            original_subject=subject[:ERROR_CHARS],
            original_seq=stream_seq,
            original=carried,
            deliveries=deliveries,
            original_id=None if envelope is None else envelope.id,
            original_kind=kind,
            error=error,
            original_size=size,
            original_sha256=hashlib.sha256(original).hexdigest(),
            traceback=None if traceback is None else traceback[-TRACEBACK_CHARS:],
        ),
        sender=agent,
        id=dead_letter_id(stream, stream_seq),
        # An original dead for its ids (`invalid`) names them in `original_id` and the error;
        # the letter itself keeps to the protocol.
        correlation_id=None if envelope is None or not is_id(envelope.correlation_id or "") else envelope.correlation_id,
        causation_id=None if envelope is None or not is_id(envelope.id) else envelope.id,
    )
    await bus.publish(letter, bus.subjects.dead(agent))


async def answer_failed(
    bus: "Bus", request: Envelope[Any], *, reason: str, error_type: str, sender: str
) -> None:
    """Reply `RequestFailed` to `request` if it is a request (has `reply_to`); else do nothing.
    A request that cannot be answered (a `reply_to` that is not a valid name, ids that are not
    UUIDs) is only logged. Raises BusUnavailable when the reply cannot be stored."""
    if request.reply_to is None:
        return
    try:
        await bus.reply(request, RequestFailed(reason=reason, error_type=error_type), sender=sender)
    except ConfigurationError as exc:
        log.warning("cannot answer request %s: %s", request.id, exc)


def loose_envelope(data: bytes) -> Envelope[Any] | None:
    """The envelope fields of `data` with the payload left raw, or None if it is not one."""
    try:
        return decode_loose(data)
    except DecodeError:
        return None


class _MaxDeliveries(msgspec.Struct):
    """`io.nats.jetstream.advisory.v1.max_deliver`, the fields used here."""

    stream: str
    consumer: str
    stream_seq: Annotated[int, msgspec.Meta(ge=1)]
    deliveries: int = 0


_advisory = msgspec.json.Decoder(_MaxDeliveries)


class DeadLetterWatcher:
    """Writes the dead letters of messages the server gave up on (MAX_DELIVERIES advisories)
    for one agent's consumers. `start()` ensures its durable consumer on the advisory stream and
    starts pulling; `run()` is its task body (until cancelled); `close()` stops pulling."""

    def __init__(self, bus: "Bus", *, agent: str, settings: PullSettings | None = None) -> None:
        self._bus = bus
        self._agent = agent
        self._config = dead_letter_consumer_config(bus.subjects, agent)
        self._watched = frozenset((bus.subjects.inbox_consumer(agent), bus.subjects.group_consumer(agent)))
        self._settings = settings
        self._queue: deque[Delivered] = deque()
        self._ready = asyncio.Event()
        self._pull: RawPull | None = None
        self._conn: WireConnection | None = None

    async def start(self, conn: WireConnection) -> None:
        """Ensure the watcher's consumer and issue the first pull, on `conn` (the consumer
        engine's connection, which it shares). Raises nats errors."""
        await self._ensure()
        self._conn = conn
        self._pull = RawPull(
            conn,
            stream=self._bus.subjects.advisory_stream,
            consumer=self._config.durable_name,
            window=8,
            on_message=self._enqueue,
            settings=self._settings,
            recover=self._ensure,
        )
        await self._pull.start()

    async def _ensure(self) -> None:
        """The advisory stream (replicated and placed like the live log) and this watcher's
        consumer on it. Raises BusUnavailable, ConfigurationError."""
        bus = self._bus
        await ensure_advisory_stream(bus.js, bus.subjects, await bus.js.stream_info(bus.subjects.stream))
        await ensure_consumer(bus.js, bus.subjects.advisory_stream, self._config)

    def _enqueue(self, pull: RawPull, msg: Delivered) -> None:
        self._queue.append(msg)
        self._ready.set()

    async def run(self) -> None:
        """Handle advisories one at a time until cancelled."""
        if self._pull is None:
            raise RuntimeError("DeadLetterWatcher.run() before start()")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pull.run())
            while True:
                await self._ready.wait()
                while self._queue:
                    msg = self._queue.popleft()
                    try:
                        await self._handle(msg)
                    finally:
                        if self._pull.release():
                            await self._pull.pull()
                self._ready.clear()

    async def close(self) -> None:
        """Stop pulling and unsubscribe."""
        if self._pull is not None:
            self._pull.stop()
            await self._pull.close()

    async def _handle(self, msg: Delivered) -> None:
        conn = self._conn
        assert conn is not None
        advisory, why = self._read(msg.data)
        if advisory is None:
            # Anyone may publish on an advisory subject: what is not a server's advisory about
            # this agent's consumers is dropped, never followed into the log.
            log.warning("ignoring an unreadable max-deliveries advisory: %s", why)
            conn.publish(msg.raw_reply, b"+TERM unreadable")
            return
        try:
            await self._dead_letter(advisory)
        except (BusError, nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("cannot write the dead letter of %s seq %d yet (%s); retrying",
                        advisory.consumer, advisory.stream_seq, exc)
            conn.publish(msg.raw_reply, b'-NAK {"delay":%d}' % _RETRY_NS)
            return
        self._bus.metrics.dead_lettered.labels(advisory.consumer, "max_deliveries").inc()
        conn.publish(msg.raw_reply, b"+ACK")

    def _read(self, data: bytes) -> tuple[_MaxDeliveries | None, str]:
        why = refusal(data)
        if why is not None:
            return None, why
        try:
            advisory = _advisory.decode(data)
        except msgspec.DecodeError as exc:
            return None, str(exc)
        if advisory.stream != self._bus.subjects.stream or advisory.consumer not in self._watched:
            return None, f"not about this agent's consumers ({advisory.stream}/{advisory.consumer})"
        return advisory, ""

    async def _dead_letter(self, advisory: _MaxDeliveries) -> None:
        stored = await cancellation_kept(self._bus.transport.direct_get(advisory.stream, {"seq": advisory.stream_seq}))
        if stored is None:
            data, subject, note = b"", "", " (the original is no longer in the log)"
        else:
            data, subject, note = stored.data, stored.subject, ""
        log.warning("dead-lettering %s seq %d: not settled after %d deliveries",
                    advisory.consumer, advisory.stream_seq, advisory.deliveries)
        await write_dead_letter(
            self._bus,
            agent=self._agent,
            consumer=advisory.consumer,
            stream=advisory.stream,
            stream_seq=advisory.stream_seq,
            subject=subject,
            original=data,
            reason="max_deliveries",
            deliveries=advisory.deliveries,
            error=f"not settled after {advisory.deliveries} deliveries: the process handling it "
                  f"died or hung on every attempt{note}",
            envelope=loose_envelope(data) if data else None,
        )
