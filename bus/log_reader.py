"""Reading the log in stream order, fast: an ordered push consumer read over a raw connection.

    async with LogReader(bus, start_seq=checkpoint + 1, name="live") as reader:
        records = await reader.read(10_000)   # 1..10_000 LogRecords, waits for the first

A projection needs four things per message (stream sequence, timestamp, subject, bytes), all in
the frame itself: the sequence and timestamp sit in the `$JS.ACK...` reply subject. So the
reader takes a `WireConnection` of its own (`bus.transport.wire("reader:<name>")`: the spec's
servers, credentials and TLS) and turns each delivery into a `LogRecord` in the socket's read
callback, without a `Msg`, a header parse or a task wake-up per message.

The consumer is ephemeral and server-side cheap: `ack_policy: none`, R1, in memory, flow
controlled, with idle heartbeats, starting at the next sequence wanted. Ordered-consumer rules
apply: the consumer sequence must advance by one. The reader starts a new consumer after the last
sequence it delivered when
  - the consumer sequence jumps, a heartbeat names a later one, or a non-100 status arrives
    (consumer deleted, leadership change);
  - the connection was re-established (`conn.reconnects` moved: an R1 consumer in memory does not
    survive its server, and what was pushed meanwhile is lost);
  - nothing (message or heartbeat) arrived for two heartbeats (its server died unnoticed).
Creating a consumer is bounded (`CONTROL_TIMEOUT_S`) and, while `read` is waiting, retried with a
growing pause until it works; a replaced consumer is not deleted (the server drops an ephemeral
consumer `inactive_threshold` after its inbox lost interest). Closing deletes the current one,
waiting `DELETE_TIMEOUT_S` at most.

Flow control: the server pauses after a window of bytes until its request is answered. The
reader answers at once while fewer than `HOLD_FLOW_AT` records wait to be read, else when `read`
has taken enough of them: memory stays bounded when the caller reads slower than the server sends.

Errors (bus.errors): BusUnavailable (cannot connect, the consumer cannot be created in time when
entering, the stream does not exist, the connection keeper died), PermissionDenied,
ConfigurationError (the server refused the consumer's configuration).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple

import msgspec
import nats.errors
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from bus.cancellation import cancellation_kept
from bus.errors import BusError, BusUnavailable, ConfigurationError, PermissionDenied
from bus.wire import WireConnection, header_value
from bus.wire.connection import stop_keeper

if TYPE_CHECKING:
    from bus.client import Bus

log = logging.getLogger("continuum.log_reader")

# One JetStream API call (create, delete a consumer) waits this long at most.
CONTROL_TIMEOUT_S = 1.0
DELETE_TIMEOUT_S = 0.5
# Entering the reader gives up creating its first consumer after this long.
START_TIMEOUT_S = 10.0
# Pauses between attempts to create a consumer: from the first, doubling, up to the last. The
# last is short because the usual cause is a cluster electing a new leader (4-9 s with no
# answer): the views resume within a pause of the election, and an attempt is one small request.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 0.25
# Unanswered attempts to create a consumer under one name before trying under a new one.
SAME_NAME_ATTEMPTS = 3
# Records waiting to be read beyond which flow-control requests wait for `read`.
HOLD_FLOW_AT = 65_536

# "NATS/1.0\r\nNats-Msg-Id: <36-char id>\r\n\r\n" is 64 bytes; longer headers carry more (the
# fence of a checked append): a record keeps only those.
_PLAIN_HEADER = 96
_ACK = b"ACK"
# Below any consumer sequence + 1: once set, every later delivery of that consumer is ignored.
_BROKEN = -2
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]+")


class LogRecord(NamedTuple):
    """One stored message: stream sequence, server timestamp (ns since the epoch), subject, bytes,
    and its raw NATS header block (b"" when it has none, or only a message id)."""

    seq: int
    time_ns: int
    subject: bytes
    data: bytes
    header: bytes = b""


class LogReader:
    """Reads `bus`'s stream from `start_seq` in order (see the module docstring). An async
    context manager; `read` never returns a sequence twice, nor out of order."""

    def __init__(self, bus: Bus, *, start_seq: int = 1, heartbeat_s: float = 1.0, name: str = "projection") -> None:
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be more than 0")
        self._bus = bus
        self._stream = bus.subjects.stream
        self._heartbeat_s = heartbeat_s
        self._name = name
        self._tick_s = min(0.25, heartbeat_s / 4)
        self.restarts = 0
        self._next_seq = max(1, start_seq)  # the next sequence wanted
        self._head_seq = 0
        self._last_reply: list[bytes] | None = None  # tokens of the last record's reply subject
        self._ready: list[LogRecord] = []
        self._cseq = 0  # the current consumer's last delivery, or _BROKEN
        self._why: str | None = None  # why the current consumer must be replaced
        self._heard = 0  # status messages (heartbeats, flow control) of the current consumer
        self._quiet: tuple[int, int] = (0, 0)
        self._quiet_since = 0.0
        self._held_flow: bytes | None = None  # a flow-control reply not sent yet (HOLD_FLOW_AT)
        self._waiter: asyncio.Future[None] | None = None
        self._conn: WireConnection | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._sid: int | None = None
        self._reconnects = 0
        self._consumer: str | None = None

    @property
    def last_seq(self) -> int:
        """The last sequence handed out by `read` (or queued for it)."""
        return self._next_seq - 1

    @property
    def head_seq(self) -> int:
        """The log's last sequence as of the latest delivery (sequence + pending)."""
        tokens = self._last_reply
        if tokens is not None:
            base = 5 if len(tokens) == 9 else 7
            self._head_seq = max(self._head_seq, int(tokens[base]) + int(tokens[base + 3]))
        return max(self._head_seq, self.last_seq)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> LogReader:
        """Connect, then create the consumer (retried for up to START_TIMEOUT_S). Raises
        BusUnavailable, PermissionDenied, ConfigurationError."""
        conn = self._bus.transport.wire(f"reader:{self._name}")
        await conn.connect()
        self._conn = conn
        self._keeper = asyncio.get_running_loop().create_task(conn.run(), name=f"log-reader-{self._name}-keeper")
        try:
            await self._follow(deadline=time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the connection, then delete the consumer (DELETE_TIMEOUT_S at most). Raises
        nothing of its own."""
        await self._close()

    async def _close(self) -> None:
        self._cseq = _BROKEN
        consumer, self._consumer = self._consumer, None
        conn, keeper = self._conn, self._keeper
        try:
            if conn is not None:
                await conn.close(timeout_s=DELETE_TIMEOUT_S)
        finally:
            failure = await stop_keeper(keeper)
            if failure is not None:
                log.warning("the log reader's connection keeper had failed: %r", failure)
        if consumer is not None:
            await self._delete(consumer)

    async def _delete(self, consumer: str) -> None:
        # Tidiness only: the server drops the consumer after inactive_threshold anyway. When its
        # server is gone this must not hold up the caller.
        try:
            async with asyncio.timeout(DELETE_TIMEOUT_S):
                await cancellation_kept(self._bus.js.delete_consumer(self._stream, consumer))
        except (nats.errors.Error, NotFoundError, TimeoutError, RuntimeError) as exc:
            log.debug("log consumer %s not deleted: %r", consumer, exc)

    # -- reading ---------------------------------------------------------------------------

    async def read(self, max_records: int) -> list[LogRecord]:
        """Return 1..`max_records` records in sequence order, waiting for the first one. A
        consumer that has to be replaced is replaced here, retried until it works. Raises
        BusUnavailable (the stream does not exist, the connection keeper died), PermissionDenied,
        ConfigurationError."""
        ready = self._ready
        while not ready:
            why = self._restart_reason()
            if why is None:
                await self._wait(self._tick_s)
                continue
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError()  # being stopped: no new consumer
            log.info("log reader %s restarting after seq %d: %s", self._name, self.last_seq, why)
            self.restarts += 1
            await self._follow(deadline=None)
        out = ready[:max_records]
        del ready[:max_records]
        if self._held_flow is not None and len(ready) < HOLD_FLOW_AT:
            subject, self._held_flow = self._held_flow, None
            self._answer(subject)
        return out

    async def _wait(self, timeout_s: float) -> None:
        """Until a record arrives or `timeout_s` passed."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation that
            # arrives as the result does.
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._waiter = None

    def _restart_reason(self) -> str | None:
        """Why the current consumer must be replaced, or None. Raises BusUnavailable when the
        connection keeper died (nothing would reconnect)."""
        keeper = self._keeper
        if keeper is not None and keeper.done():
            failure = None if keeper.cancelled() else keeper.exception()
            raise BusUnavailable(f"the log reader's connection keeper stopped: {failure!r}") from failure
        if self._why is not None:
            return self._why
        conn = self._conn
        if conn is not None and conn.reconnects != self._reconnects:
            return "the connection to NATS was re-established"
        heard = (self._cseq, self._heard)
        now = time.monotonic()
        if heard != self._quiet:
            self._quiet, self._quiet_since = heard, now
        elif now - self._quiet_since > 2 * self._heartbeat_s:
            return f"no message or heartbeat for {now - self._quiet_since:.1f}s"
        return None

    # -- deliveries (called from the socket's read callback) ---------------------------------

    def _on_message(self, subject: bytes, reply: bytes, header: bytes, data: bytes) -> None:
        """The hot path, once per delivery: split the reply subject, check the consumer
        sequence, append the record. Nothing else is parsed (the header block is kept raw)."""
        tokens = reply.split(b".")
        if len(tokens) < 9 or tokens[1] != _ACK:
            self._on_status(reply, header)
            return
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending> (9 tokens), or
        # with <domain>.<account hash> after ACK and a random token at the end (12).
        base = 5 if len(tokens) == 9 else 7
        cseq = int(tokens[base + 1])
        if cseq != self._cseq + 1:
            self._broken(f"consumer sequence jumped (expected {self._cseq + 1}, got {cseq})")
            return
        self._cseq = cseq
        seq = int(tokens[base])
        if seq >= self._next_seq:  # else: delivered already (a consumer never starts lower)
            self._ready.append(tuple.__new__(LogRecord, (
                seq, int(tokens[base + 2]), subject, data, header if len(header) > _PLAIN_HEADER else b"",
            )))
            self._next_seq = seq + 1
            self._last_reply = tokens
            if self._waiter is not None:
                self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_status(self, reply: bytes, header: bytes) -> None:
        """A heartbeat or a flow-control request (100), or the end of the consumer (409...)."""
        if self._cseq == _BROKEN:
            return
        first_line = header.partition(b"\r\n")[0]
        code = first_line[9:12]  # b"NATS/1.0 100 Idle Heartbeat"
        if not code:
            return  # not from the consumer: someone published to its inbox
        self._heard += 1
        if code != b"100":
            self._broken(f"consumer status {first_line.decode(errors='replace')}")
            return
        if reply:  # flow control: the server sends more once this is answered
            self._flow(reply)
            return
        stalled = header_value(header, "Nats-Consumer-Stalled")
        if stalled:  # a flow-control answer was lost, or is being held
            self._flow(stalled.encode())
        last = header_value(header, "Nats-Last-Consumer")
        if last and last.isdigit() and int(last) > self._cseq:
            self._broken(f"a heartbeat says consumer seq {last}, the last one received is {self._cseq}")

    def _flow(self, subject: bytes) -> None:
        if len(self._ready) >= HOLD_FLOW_AT:
            self._held_flow = subject  # answered by `read` (a later request replaces an earlier one)
        else:
            self._answer(subject)

    def _answer(self, subject: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.publish(subject, b"")
        except (BusError, ValueError) as exc:
            log.debug("flow-control answer not sent: %s", exc)  # the next stall notice repeats it

    def _broken(self, why: str) -> None:
        """Ignore the current consumer from now on; `read` replaces it."""
        self._cseq = _BROKEN
        if self._why is None:
            self._why = why
        self._held_flow = None
        if self._waiter is not None:
            self._wake()

    # -- the consumer ----------------------------------------------------------------------

    async def _follow(self, *, deadline: float | None) -> None:
        """Drop the current consumer's inbox; subscribe a new one and create a consumer pushing
        to it from the next sequence wanted. Attempts are bounded and repeated until one works
        or `deadline` (monotonic) passes: `SAME_NAME_ATTEMPTS` with the same name (a create that
        timed out but happened is answered by the next one), then with a new name and inbox (the
        server may have placed the consumer on a node that has just died, and then answers
        nothing for that name until the node is back). Raises BusUnavailable, PermissionDenied,
        ConfigurationError."""
        conn = self._conn
        assert conn is not None
        pause = RETRY_FIRST_S
        for attempt in itertools.count(1):
            if attempt % SAME_NAME_ATTEMPTS == 1:
                config = await self._new_inbox(conn)
            try:
                await self._create(conn, config)
                self._quiet_since = time.monotonic()
                return
            except BusUnavailable as exc:
                if isinstance(exc, _StreamGone) or (deadline is not None and time.monotonic() + pause > deadline):
                    raise
                level = logging.INFO if attempt % 10 == 1 else logging.DEBUG
                log.log(level, "log reader %s: cannot create its consumer yet (attempt %d: %s); again in %.2fs",
                        self._name, attempt, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)

    async def _new_inbox(self, conn: WireConnection) -> js_api.ConsumerConfig:
        """Drop the current consumer's inbox, subscribe a new one, and name a new consumer for
        it: its config."""
        self._cseq = _BROKEN
        self._consumer = None
        old, self._sid = self._sid, None
        if old is not None:
            # No drain: what the old consumer still sends is unwanted, and none of it reaches
            # the callback once this returns (nor waits on a server that stopped answering).
            await conn.unsubscribe(old, drain_timeout_s=0)
        inbox = conn.new_inbox()
        self._cseq, self._heard, self._why, self._held_flow = 0, 0, None, None
        self._quiet, self._quiet_since = (0, 0), time.monotonic()
        self._sid = conn.subscribe(inbox, self._on_message)
        name = f"{_UNSAFE_NAME.sub('_', self._name)[:32]}-{secrets.token_hex(8)}"
        self._consumer = name  # from now on: an attempt may have created it even if cancelled
        return self._consumer_config(name, inbox)

    async def _create(self, conn: WireConnection, config: js_api.ConsumerConfig) -> None:
        """One bounded attempt. Raises BusUnavailable (retry; but not `_StreamGone`, the stream
        does not exist), PermissionDenied, ConfigurationError (the server refused the config)."""
        if not await conn.wait_connected(CONTROL_TIMEOUT_S):
            raise BusUnavailable("the log reader's connection is down")
        # A reconnect from now on may lose deliveries of the consumer being created: `read`
        # then starts over. One before is harmless (the subscription was sent again).
        self._reconnects = conn.reconnects
        # On the reader's own connection, not the Bus's control connection: it fails over with
        # the deliveries. (Through TLS, the control connection leaves a hung server only after
        # asyncio's 30 s TLS shutdown timeout; the views would wait for it.)
        request = _CREATE.encode({"stream_name": self._stream, "config": config.as_dict()})
        try:
            _, data = await conn.request(
                f"$JS.API.CONSUMER.CREATE.{self._stream}.{config.name}", request, timeout_s=CONTROL_TIMEOUT_S
            )
        except BusUnavailable as exc:
            raise BusUnavailable(f"creating the log consumer on {self._stream}: {exc}") from exc
        try:
            error = _API_ANSWER.decode(data).error
        except msgspec.DecodeError as exc:
            raise BusUnavailable(f"creating the log consumer on {self._stream}: not a JetStream answer: {exc}") from exc
        if error is None:
            return
        if error.code == 404:
            raise _StreamGone(f"cannot read the log: the stream {self._stream} does not exist ({error.description})")
        if error.code == 400:
            raise ConfigurationError(f"the server refused the log consumer on {self._stream}: {error.description}")
        raise BusUnavailable(f"creating the log consumer on {self._stream}: {error.code} {error.description}")

    def _consumer_config(self, name: str, inbox: str) -> js_api.ConsumerConfig:
        return js_api.ConsumerConfig(
            name=name,
            description=f"continuum {self._name} reader",
            deliver_subject=inbox,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._next_seq,
            ack_policy=js_api.AckPolicy.NONE,
            replay_policy=js_api.ReplayPolicy.INSTANT,
            flow_control=True,
            idle_heartbeat=self._heartbeat_s,
            inactive_threshold=max(10.0, 5 * self._heartbeat_s),
            mem_storage=True,
            num_replicas=1,
        )


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _ApiAnswer(msgspec.Struct):
    """A JetStream API answer: only whether it is an error matters here."""

    error: _ApiError | None = None


_CREATE = msgspec.json.Encoder()
_API_ANSWER = msgspec.json.Decoder(_ApiAnswer)


class _StreamGone(BusUnavailable):
    """The log's stream does not exist: retrying the consumer at once will not help."""
