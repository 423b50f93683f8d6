"""Callback-driven raw pull from one durable JetStream consumer, over a raw NATS connection.

nats-py's `fetch()` tops out near 15k msg/s on the reference box because every message passes
through `next_msg`. Publishing `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` requests ourselves,
with several requests outstanding at once, and reading the replies straight off the socket
(bus.wire: no per-message `Msg`, header parsing, queue or task wake-up) removes nearly all of
the client's per-message cost.

Connection. Given a `WireConnection`, the pull subscribes on it and its owner runs the
connection's `run()`; the owner may share it between pulls (one socket per consumer engine).
Given a nats-py client instead, the pull opens a private connection to the same server with
the same credentials and owns it (`run()` then keeps it alive too, `close()` closes it).

Credit. `window` bounds the messages requested-but-not-yet-delivered plus the messages delivered
and not yet `release()`d. A new request asks for the free part of the window once at least
`window // 4` (at least 1) is free, so requests stay few and large.

Status replies (headers only, no reply subject):
    100  idle heartbeat: the server still holds our request (liveness)
    404  no messages (only for no_wait requests; handled like 408)
    408  a request expired; `Nats-Pending-Messages` is the credit it left unused
    409  a request was refused or ended (max waiting, leadership change, consumer deleted, server
         shutdown); with `Nats-Pending-Messages` only that credit is returned, without it all of
         it is presumed lost and the credit is reset
    503  no responders: the consumer does not exist (it is recreated through `recover`)

Lost requests. A server restart or a reconnect silently drops waiting requests. The watchdog
resets the credit and pulls again when the connection reconnected (its `reconnects` counter
moved) or when a request is outstanding and nothing (message or heartbeat) arrived for two
heartbeats. A reset can overlap with requests the server still holds: those deliver beyond the
window until they expire (`expires_s`), never more than one extra window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
import nats.errors

from bus.errors import BusError
from bus.transport import Transport
from bus.wire import WireConnection, header_value, parse_status
from bus.wire.protocol import pub_frame

log = logging.getLogger("continuum.pull")

_NS = 1_000_000_000
_NAK = b"-NAK"


class PullSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Timing of raw pull requests."""

    # How long the server holds a request; a 408 then returns its unused credit.
    expires_s: float = 30.0
    # The server sends a heartbeat this often while it holds an idle request (<= expires_s / 2).
    # Two missed ones mean the request is gone (its server died, the consumer's leader moved):
    # this bounds how long a failover leaves the consumer idle.
    heartbeat_s: float = 1.0
    # How often the watchdog checks for reconnects, silence and unused credit.
    tick_s: float = 0.25
    # After a refused request (409 without credit, 400, 503) wait this long before pulling again.
    retry_s: float = 0.5
    # How long recreating a lost consumer may take before the watchdog goes on (and retries):
    # during a leader election the API does not answer, and pulling must not wait for it.
    recover_timeout_s: float = 1.0


class Delivered(NamedTuple):
    """One delivery as read off the wire, undecoded: its subject, its ack subject (the
    JetStream reply subject, which carries the delivery facts, see `ack_facts`), its payload
    and its raw header block (b"" if none; see bus.wire.parse_headers). `subject` and `reply`
    give the two subjects as text."""

    raw_subject: bytes
    raw_reply: bytes
    data: bytes
    header: bytes

    @property
    def subject(self) -> str:
        return self.raw_subject.decode()

    @property
    def reply(self) -> str:
        return self.raw_reply.decode()


# Delivery facts parsed from a JetStream reply subject, as a plain tuple (this runs per message):
# (stream, consumer, delivered, stream_seq, consumer_seq, timestamp_ns, pending)
AckFacts = tuple[str, str, int, int, int, int, int]


def ack_facts(reply: bytes) -> AckFacts | None:
    """Parse `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (v1) or the
    v2 form with domain and account hash (`$JS.ACK.<domain>.<hash>.<stream>...[.<token>]`).
    Returns None for anything else."""
    tokens = reply.split(b".")
    n = len(tokens)
    if n == 9:
        base = 2
    elif n >= 11:
        base = 4
    else:
        return None
    if tokens[0] != b"$JS" or tokens[1] != b"ACK":
        return None
    try:
        return (
            tokens[base].decode(),
            tokens[base + 1].decode(),
            int(tokens[base + 2]),
            int(tokens[base + 3]),
            int(tokens[base + 4]),
            int(tokens[base + 5]),
            int(tokens[base + 6]),
        )
    except (ValueError, UnicodeDecodeError):
        return None


def parse_ack_subject(reply: str) -> AckFacts | None:
    """`ack_facts` of a reply subject given as text."""
    return ack_facts(reply.encode())


class RawPull:
    """Pulls one durable consumer into `on_message`, keeping credit outstanding.

    Lifecycle: `await start()` subscribes and issues the first request (readiness); `run()` is
    the watchdog task body; `stop()` stops requesting and hands back (naks) anything that still
    arrives; `close()` removes interest, after which nothing more arrives.
    `on_message(pull, delivered)` is called synchronously for every delivery and must not
    block; the caller then owes one `release()` per delivery.
    """

    def __init__(
        self,
        conn: "WireConnection | Transport",
        *,
        stream: str,
        consumer: str,
        window: int,
        on_message: Callable[["RawPull", Delivered], None],
        settings: PullSettings | None = None,
        may_pull: Callable[[], bool] | None = None,
        recover: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.stream = stream
        self.consumer = consumer
        self.window = window
        self._owned = not isinstance(conn, WireConnection)
        # A Transport: a private connection of its making (see start).
        self._transport = conn if self._owned else None
        self._conn: WireConnection | None = None if self._owned else conn
        self._on_message = on_message
        self._settings = settings or PullSettings()
        if self._settings.heartbeat_s * 2 > self._settings.expires_s:
            raise ValueError("heartbeat_s must be at most expires_s / 2 (the server rejects more)")
        self._may_pull = may_pull or (lambda: True)
        self._recover = recover
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}".encode()
        self._min_request = max(1, window // 4)
        self._expires_ns = int(self._settings.expires_s * _NS)
        self._heartbeat_ns = int(self._settings.heartbeat_s * _NS)
        self._inbox = b""
        self._sid: int | None = None
        self.held = 0  # delivered, not yet released
        self.requested = 0  # asked for, not yet delivered
        self._stopped = False
        self._lost = False
        self._not_before = 0.0
        self._last_activity = time.monotonic()
        self._reconnects = 0

    @property
    def connection(self) -> WireConnection:
        """The connection deliveries arrive on (and acks may go out on)."""
        if self._conn is None:
            raise RuntimeError("RawPull.connection before start()")
        return self._conn

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to a private inbox and issue the first request; with a private connection,
        connect it first. Raises BusError (BusUnavailable, PermissionDenied)."""
        if self._conn is None:
            self._conn = self._transport.wire(f"pull:{self.consumer}")
            await self._conn.connect()
        conn = self._conn
        inbox = conn.new_inbox()
        self._inbox = inbox.encode()
        self._reconnects = conn.reconnects
        self._sid = conn.subscribe(inbox, self._on_frame)
        self._last_activity = time.monotonic()
        await self.pull()

    async def run(self) -> None:
        """Watchdog: re-pull after reconnects, silence, expiries and refusals. Runs until
        cancelled; with a private connection it also keeps that connection alive."""
        if self._owned and self._conn is not None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._conn.run())
                tg.create_task(self._watch())
        else:
            await self._watch()

    async def _watch(self) -> None:
        tick = self._settings.tick_s
        silence = 2 * self._settings.heartbeat_s + tick
        while True:
            await asyncio.sleep(tick)
            conn = self._conn
            if self._stopped or conn is None:
                continue
            reconnects = conn.reconnects
            if reconnects != self._reconnects:
                self._reconnects = reconnects
                self._reset("the connection to NATS was re-established")
            elif self.requested and time.monotonic() - self._last_activity > silence:
                self._reset(f"no message or heartbeat for {silence:.1f}s")
            if self._lost and self._recover is not None and conn.is_connected:
                self._lost = False
                try:
                    async with asyncio.timeout(self._settings.recover_timeout_s):
                        await self._recover()
                except (nats.errors.Error, TimeoutError, BusError) as exc:
                    self._lost = True
                    log.warning("cannot recreate consumer %s yet: %s", self.consumer, str(exc) or type(exc).__name__)
                    self._not_before = time.monotonic() + self._settings.retry_s
            await self.pull()

    def stop(self) -> None:
        """Issue no more requests; deliveries that still arrive are handed back at once."""
        self._stopped = True

    async def close(self) -> None:
        """Stop, then remove interest: deliveries already on their way are processed (handed
        back, see `stop`), and the server drops the requests it still holds for this inbox
        (it checks for interest before delivering), so nothing handed back returns here.
        A private connection is closed. Never raises."""
        self._stopped = True
        sid, self._sid = self._sid, None
        conn = self._conn
        if conn is None:
            return
        if sid is not None:
            await conn.unsubscribe(sid)
        if self._owned:
            await conn.close()

    # -- credit ----------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return self.window - self.held - self.requested

    def release(self, count: int = 1) -> bool:
        """Return the credit of `count` deliveries that are no longer held. Returns True when
        enough credit is free for a request: the caller then awaits `pull()`."""
        self.held = held = self.held - count if self.held > count else 0
        return self.window - held - self.requested >= self._min_request

    async def pull(self) -> None:
        """Request the free part of the window if it is large enough and pulling is allowed."""
        self.request()

    def request(self) -> None:
        """`pull()` without awaiting: the request is written at the end of this loop turn."""
        free = self.window - self.held - self.requested
        conn = self._conn
        if (
            free < self._min_request
            or self._stopped
            or self._sid is None
            or conn is None
            or not conn.is_connected
            or not self._may_pull()
            or time.monotonic() < self._not_before
        ):
            return
        body = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (free, self._expires_ns, self._heartbeat_ns)
        try:
            conn.write(pub_frame(self._api, body, self._inbox))
        except BusError as exc:
            log.debug("pull for %s not sent: %s", self.consumer, exc)
            return
        if self.requested == 0:
            # Silence is measured from the moment credit is outstanding again.
            self._last_activity = time.monotonic()
        self.requested += free

    def _reset(self, why: str) -> None:
        if self.requested:
            log.info("consumer %s: %s; pulling again", self.consumer, why)
        self.requested = 0
        self._last_activity = time.monotonic()

    # -- incoming (called from the socket's read callback) -----------------------------------

    def _on_frame(self, subject: bytes, reply: bytes, header: bytes, data: bytes) -> None:
        self._last_activity = time.monotonic()
        if reply:
            if self.requested:
                self.requested -= 1
            if self._stopped:
                # Shutting down: give it back now rather than after ack_wait.
                try:
                    self._conn.write(pub_frame(reply, _NAK))  # type: ignore[union-attr]
                except BusError:
                    pass
                return
            self.held += 1
            self._on_message(self, Delivered(subject, reply, data, header))
            return
        self._on_status(header)

    def _on_status(self, header: bytes) -> None:
        status, description = parse_status(header)
        if status == "100":
            return
        unused = header_value(header, "Nats-Pending-Messages")
        if status in ("404", "408"):
            self._return_credit(unused)
        elif status == "409":
            if unused is not None:
                self._return_credit(unused)
            else:
                self._reset(f"request refused ({description})")
                self._not_before = time.monotonic() + self._settings.retry_s
            if "deleted" in description.lower():
                self._lost = True
        elif status == "503":
            self._reset("the consumer has no responder")
            self._lost = True
            self._not_before = time.monotonic() + self._settings.retry_s
        else:
            log.warning("consumer %s: unexpected pull status %s %s", self.consumer, status or "(none)",
                        description)
            self._reset(f"status {status}")
            self._not_before = time.monotonic() + self._settings.retry_s
        self.request()

    def _return_credit(self, unused: str | None) -> None:
        try:
            count = int(unused) if unused is not None else 0
        except ValueError:
            count = 0
        self.requested = max(0, self.requested - count)
