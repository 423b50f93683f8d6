"""A plain NATS client connection for the bus's hot paths.

nats-py turns every delivered message into a `Msg`, parses all of its headers, queues it and
wakes a task for it, and every publish is a coroutine: ~30 us of CPU per delivered-and-acked
message here. This connection hands each message to its subscription's callback as raw byte
strings straight from the socket callback (`FrameParser`), and coalesces writes: every frame
written during one event-loop turn leaves in one `send`.

    conn = WireConnection(parse_urls(url), name="planner")
    await conn.connect()                       # INFO / CONNECT / PING / PONG; raises BusError
    sid = conn.subscribe(inbox, on_message)    # on_message(subject, reply, header, data)
    conn.publish(subject, payload, reply)      # buffered, sent at the end of this loop turn
    await conn.flush()                         # round trip: everything before it reached the server
    ... run `conn.run()` in a task group: reconnects and keepalive ...
    await conn.close()

Reconnects: when the connection drops, `run()` tries every server every `reconnect_wait_s`
until one answers, re-subscribes every live subscription and sends what was written while
disconnected (up to `max_reconnect_buffer` bytes; beyond that `publish` raises). `reconnects`
counts the successful ones, so an owner can tell that requests it made before were lost;
`wait_connected` waits for the next one.

Errors (all from bus.errors): BusUnavailable (cannot connect, connection lost, timeout; its
subclass ProtocolViolation for bytes that are not NATS), PermissionDenied (authorization or a
permissions violation), ConfigurationError (a server that cannot speak headers).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from bus.errors import BusError, BusUnavailable, ConfigurationError, NoAnswer, NoResponders, PermissionDenied
from bus.refusal import Refusal, parse_refusal
from bus.wire.address import ServerAddress, parse_url, with_credentials
from bus.wire.protocol import (
    PING,
    PONG,
    FrameParser,
    MessageCallback,
    ProtocolViolation,
    check_subject,
    parse_status,
    connect_frame,
    pub_frame,
    sub_frame,
    unsub_frame,
)

log = logging.getLogger("continuum.wire")

# What a server that names no limit in its INFO accepts (nats-server's default).
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# nats-server refuses or drops some connections that arrive while it reloads its authorization
# (measured on 2.15.1 under back-to-back reloads: ~4% refused as an authorization violation, ~2.5%
# closed during the handshake), and a reload follows every credential issued or revoked. A
# handshake refused or dropped by every server is tried again after each of these pauses, so a
# revoked credential is refused ~0.35 s later than at once.
HANDSHAKE_RETRY_PAUSES_S = (0.05, 0.1, 0.2)


class HandshakeDropped(BusUnavailable):
    """The server accepted the TCP connection, then closed it before the handshake ended."""


class WireSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Timing and limits of one raw connection."""

    connect_timeout_s: float = 2.0
    # Pause between rounds over the server list while reconnecting.
    reconnect_wait_s: float = 0.5
    # A PING this often; after `max_pings_out` unanswered ones the connection is stale. A server
    # that hangs (SIGSTOP, a partition) keeps the socket open: this bounds how long a client
    # stays with it (~3 s) before moving to another node of the cluster.
    ping_interval_s: float = 1.0
    max_pings_out: int = 2
    # Frames written while disconnected, kept for the next connection (acks stay valid).
    max_reconnect_buffer: int = 8 * 1024 * 1024
    inbox_prefix: str = "_INBOX"
    # An ssl.SSLContext for tls:// servers (and servers that require TLS); None: the default one.
    ssl_context: Any = None
    # An nkey credential (bus.identity.keys.Credential): signs the nonce of the server's INFO.
    credential: Any = None


def refusal(text: str) -> BusError:
    """The bus error for a server's `-ERR` text."""
    lowered = text.lower()
    if "authorization" in lowered or "authentication" in lowered or "permission" in lowered:
        return PermissionDenied(f"NATS refused: {text}")
    return BusUnavailable(f"NATS error: {text}")


class _Link(asyncio.Protocol):
    """One TCP connection: handshake state, parser, transport. Events of a link that is not
    (or no longer) the owner's live one are ignored."""

    def __init__(self, owner: "WireConnection", loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.parser = FrameParser(owner._subs, self, owner._callback_failed)
        self.transport: asyncio.Transport | None = None
        self.live = False
        self.stage = "info"  # -> "connect" (CONNECT sent, awaiting PONG) -> "open"
        self.info: dict[str, Any] = {}
        # The handshake step being awaited: first the INFO, then the PONG after CONNECT.
        self.waiter: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except ProtocolViolation as exc:
            log.warning("dropping the connection to NATS: %s", exc)
            self._fail(exc)
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(BusUnavailable(f"the NATS connection was lost{f': {exc}' if exc else ''}"))
        if not self.lost.done():
            self.lost.set_result(None)
        if self.live:
            self.live = False
            self.owner._on_lost(self, exc)

    # ControlHandler

    def on_ping(self) -> None:
        if self.transport is not None:
            self.transport.write(PONG)

    def on_pong(self) -> None:
        if self.stage == "connect":
            self.stage = "open"
            if not self.waiter.done():
                self.waiter.set_result(None)
        elif self.live:
            self.owner._on_pong()

    def on_info(self, info: dict[str, Any]) -> None:
        self.info.update(info)  # a later INFO updates (cluster URLs, lame duck mode)
        if self.stage == "info" and not self.waiter.done():
            self.waiter.set_result(None)
        elif self.live:
            self.owner._on_info(self, info)

    def on_error(self, text: str) -> None:
        error = refusal(text)
        if not self.waiter.done():
            self.waiter.set_exception(error)
        elif self.live:
            self.owner._on_error(text, error)
        else:
            log.debug("NATS error on a closing connection: %s", text)

    # helpers

    def next_step(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        self.stage = "connect"
        self.waiter = loop.create_future()
        return self.waiter

    def _fail(self, error: BaseException) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(error)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class WireConnection:
    """One plain NATS connection (see the module docstring). Not thread-safe; one event loop."""

    def __init__(
        self, servers: Sequence[ServerAddress], *, name: str, settings: WireSettings | None = None
    ) -> None:
        if not servers:
            raise ConfigurationError("a NATS connection needs at least one server")
        self.name = name
        self.settings = settings or WireSettings()
        self.reconnects = 0
        self.info: dict[str, Any] = {}
        self.last_error: str | None = None
        self._servers = list(servers)
        self._server_index = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._connected = False
        self._closed = False
        self._subs: dict[bytes, MessageCallback] = {}
        self._sub_subjects: dict[bytes, bytes] = {}
        self._next_sid = 0
        self._out: list[bytes] = []
        self._out_handle: asyncio.Handle | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pongs: collections.deque[tuple[asyncio.Future[None] | None, int]] = collections.deque()
        self._errors = 0  # -ERR permission refusals seen so far
        self._last_refusal: BusError | None = None
        self._refusal_listeners: list[Callable[[Refusal], None]] = []
        self._pings_out = 0
        self._lost = asyncio.Event()
        self._up = asyncio.Event()

    # -- state -----------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def max_payload(self) -> int:
        """The largest message (header block included) the connected server accepts, in bytes,
        from its INFO; nats-server's default (1 MiB) before the first connection."""
        value = self.info.get("max_payload")
        return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_PAYLOAD

    @property
    def server(self) -> ServerAddress:
        """The server this connection is (or was last) connected to."""
        return self._servers[self._server_index]

    def on_refusal(self, listener: Callable[[Refusal], None]) -> None:
        """Call `listener` (in the socket callback: no I/O, no raising) with each permission
        refusal the server sends (a publish or subscription it dropped)."""
        self._refusal_listeners.append(listener)

    def new_inbox(self) -> str:
        """A unique subject under this connection's inbox prefix."""
        return f"{self.settings.inbox_prefix}.{secrets.token_hex(11)}"

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the first server that completes the handshake, in list order.

        Raises PermissionDenied if a server refused the credentials (and none accepted them),
        else BusUnavailable when none could be reached; ConfigurationError for a server too old
        to speak headers.
        """
        if self._closed:
            raise BusUnavailable("the connection is closed")
        self._loop = asyncio.get_running_loop()
        for pause in (*HANDSHAKE_RETRY_PAUSES_S, None):
            refused: BusError | None = None
            failed: BusError | None = None
            for index, server in enumerate(self._servers):
                try:
                    link = await self._open(server)
                except PermissionDenied as exc:
                    refused = exc
                    continue
                except BusUnavailable as exc:
                    failed = exc
                    continue
                self._server_index = index
                self._adopt(link)
                return
            error = refused or failed
            assert error is not None
            if pause is None or not (refused is not None or isinstance(failed, HandshakeDropped)):
                raise error
            log.info("%s: %s; trying again in %.2fs (a server reloading its authorization does this)",
                     self.name, error, pause)
            await asyncio.sleep(pause)

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until the connection is up (at once if it is); True if it is.
        False when it is closed or the time ran out. Never raises."""
        if self._connected:
            return True
        if self._closed or timeout_s <= 0:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
        except TimeoutError:
            return False
        return self._connected

    async def run(self) -> None:
        """Keep the connection alive until `close()`: PING every `ping_interval_s` (dropping a
        stale connection), reconnect after a loss. Run it in the owner's task group."""
        if self._loop is None:
            raise RuntimeError("WireConnection.run() before connect()")
        while not self._closed:
            if self._connected:
                try:
                    async with asyncio.timeout(self.settings.ping_interval_s):
                        await self._lost.wait()
                except TimeoutError:
                    self._keepalive()
                continue
            await self._reconnect()

    async def close(self, timeout_s: float = 1.0) -> None:
        """Send what is written, then close the socket (waiting up to `timeout_s`). Idempotent.
        Frames kept for a reconnect that never came are dropped."""
        if self._closed:
            return
        self._closed = True
        link, self._link = self._link, None
        self._connected = False
        self._lost.set()
        self._up.set()  # wakes wait_connected(), which then sees the connection closed
        self._pending.clear()
        self._pending_size = 0
        if link is not None:
            link.live = False
            if link.transport is not None and not link.transport.is_closing():
                if self._out:
                    link.transport.write(b"".join(self._out))
                link.transport.close()
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(link.lost)
            except TimeoutError:
                link.abort()
        if self._out_handle is not None:
            self._out_handle.cancel()
            self._out_handle = None
        self._out.clear()
        self._fail_pongs(BusUnavailable("the connection was closed"))

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(self, subject: str, callback: MessageCallback) -> int:
        """Deliver messages on `subject` to `callback(subject, reply, header, data)` (all
        bytes; header b"" when the message has none). The callback runs inside the socket's
        read callback: it must not block, and an exception it raises loses that message only.
        Returns the subscription id. Raises ValueError for an invalid subject."""
        raw = check_subject(subject)
        self._next_sid += 1
        sid = b"%d" % self._next_sid
        self._subs[sid] = callback
        self._sub_subjects[sid] = raw
        if self._connected:
            self.write(sub_frame(raw, sid))
        # Else the subscription is sent with the others once connected.
        return self._next_sid

    async def unsubscribe(self, sid: int, *, drain_timeout_s: float = 1.0) -> None:
        """Remove interest. Messages the server sent before it saw the UNSUB still reach the
        callback (for up to `drain_timeout_s`); none after this returns. Never raises."""
        key = b"%d" % sid
        if self._sub_subjects.pop(key, None) is None:
            self._subs.pop(key, None)
            return
        try:
            if self._connected:
                self.write(unsub_frame(key))
                if drain_timeout_s > 0:  # (0: nothing to drain; a PING waited on for 0 s only fails)
                    await self.flush(drain_timeout_s)
        except BusError as exc:
            log.debug("unsubscribe of %d not confirmed: %s", sid, exc)
        finally:
            self._subs.pop(key, None)

    async def request(self, subject: str, payload: bytes, *, timeout_s: float) -> tuple[bytes, bytes]:
        """Publish `payload` to `subject` with a fresh inbox as its reply subject and return the
        first answer's (header, data). For control requests (JetStream API calls) made on this
        connection, so they fail over with it. Raises NoResponders (nobody listens on `subject`:
        the server said so at once), NoAnswer (no answer within `timeout_s`), BusUnavailable (not
        connected), PermissionDenied (the server refused the publish or the inbox), ValueError
        (an invalid subject)."""
        assert self._loop is not None, "connect first"
        answered: asyncio.Future[tuple[bytes, bytes]] = self._loop.create_future()

        def on_answer(_subject: bytes, _reply: bytes, header: bytes, data: bytes) -> None:
            if not answered.done():
                answered.set_result((header, data))

        def on_refusal(refusal: Refusal) -> None:
            if refusal.subject.lower() in (subject.lower(), inbox.lower()) and not answered.done():
                answered.set_exception(refusal.error(self.name))

        inbox = self.new_inbox()
        sid = self.subscribe(inbox, on_answer)
        self._refusal_listeners.append(on_refusal)
        try:
            self.publish(subject, payload, inbox)
            async with asyncio.timeout(timeout_s):
                header, data = await answered
        except TimeoutError:
            raise NoAnswer(f"no answer on {subject} within {timeout_s}s") from None
        finally:
            self._refusal_listeners.remove(on_refusal)
            await self.unsubscribe(sid, drain_timeout_s=0)
        if header and parse_status(header)[0] == "503":
            raise NoResponders(f"nobody listens on {subject}")
        return header, data

    # -- writing -----------------------------------------------------------------------------

    def publish(self, subject: str | bytes, payload: bytes, reply: str | bytes = b"") -> None:
        """Queue a PUB frame (sent at the end of this event-loop turn). Raises ValueError for an
        invalid subject, BusUnavailable when closed or when the reconnect buffer is full."""
        raw_reply = check_subject(reply, "reply subject") if reply else b""
        self.write(pub_frame(check_subject(subject), payload, raw_reply))

    def write(self, frames: bytes) -> None:
        """Queue already encoded client frames (see bus.wire.protocol). While disconnected they
        are kept for the next connection. Raises BusUnavailable when closed or when that buffer
        is full."""
        if self._connected:
            self._out.append(frames)
            if self._out_handle is None:
                assert self._loop is not None
                self._out_handle = self._loop.call_soon(self._write_out)
            return
        if self._closed:
            raise BusUnavailable("the NATS connection is closed")
        if self._pending_size + len(frames) > self.settings.max_reconnect_buffer:
            raise BusUnavailable(
                f"not connected to NATS and {self._pending_size} bytes already wait for the reconnect"
            )
        self._pending.append(frames)
        self._pending_size += len(frames)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Return once the server answered a PING sent after everything written so far (so it
        has read all of it). Raises BusUnavailable when not connected, lost or not answered in
        `timeout_s` (default connect_timeout_s), PermissionDenied when the server refused
        something on this connection meanwhile."""
        if not self._connected:
            raise BusUnavailable("not connected to NATS")
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        errors = self._errors
        self._pongs.append((future, errors))
        self.write(PING)
        timeout = self.settings.connect_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise BusUnavailable(f"NATS did not answer a PING within {timeout}s") from None
        if self._errors != errors and self._last_refusal is not None:
            raise self._last_refusal

    def _write_out(self) -> None:
        self._out_handle = None
        out = self._out
        link = self._link
        if not out or link is None or link.transport is None:
            return  # nothing, or lost meanwhile (_on_lost moved the frames to the reconnect buffer)
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        link.transport.write(data)

    # -- connecting ----------------------------------------------------------------------------

    async def _open(self, server: ServerAddress) -> _Link:
        """TCP connect, read INFO, maybe TLS, CONNECT + PING, wait for PONG. Raises BusError."""
        loop = asyncio.get_running_loop()
        link = _Link(self, loop)
        timeout = self.settings.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: link, server.host, server.port)
                await link.waiter  # INFO
                if server.tls or link.info.get("tls_required"):
                    context = self.settings.ssl_context or ssl.create_default_context()
                    assert link.transport is not None
                    link.transport = await loop.start_tls(  # type: ignore[assignment]
                        link.transport, link, context, server_hostname=server.host
                    )
                if not link.info.get("headers", False):
                    raise ConfigurationError(
                        f"the NATS server at {server.netloc} does not support headers (2.2+ needed)"
                    )
                options: dict[str, Any] = {
                    "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                    "protocol": 1, "echo": True, "lang": "python/continuum-wire", "version": "1",
                    "name": self.name, **server.connect_options(),
                }
                credential = self.settings.credential
                if credential is not None:
                    options["nkey"] = credential.public_key
                    options["sig"] = credential.sign(link.info.get("nonce", ""))
                step = link.next_step(loop)
                assert link.transport is not None
                link.transport.write(connect_frame(options) + PING)
                await step  # PONG, or -ERR for refused credentials
        except TimeoutError as exc:
            link.abort()
            raise BusUnavailable(
                f"NATS at {server.netloc} did not complete the handshake within {timeout}s"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            link.abort()
            raise BusUnavailable(f"cannot connect to NATS at {server.netloc}: {exc}") from exc
        except BusUnavailable as exc:
            link.abort()
            if link.transport is None:
                raise
            raise HandshakeDropped(f"NATS at {server.netloc} closed the connection during the handshake") from exc
        except BaseException:
            link.abort()
            raise
        return link

    def _adopt(self, link: _Link) -> None:
        """Make a handshaken link the live one: re-subscribe, then send what waited."""
        assert link.transport is not None
        self._link = link
        link.live = True
        self.info = dict(link.info)
        self._learn_servers(link.info)
        self._connected = True
        self._pings_out = 0
        self._lost.clear()
        self._up.set()
        frames = [sub_frame(subject, sid) for sid, subject in self._sub_subjects.items()]
        frames += self._pending
        self._pending = []
        self._pending_size = 0
        if frames:
            link.transport.write(b"".join(frames))

    async def _reconnect(self) -> None:
        rounds = 0
        while not self._closed:
            count = len(self._servers)
            for step in range(count):
                if self._closed:
                    return
                # The server just lost is tried last: it is likely down (or leaving).
                index = (self._server_index + 1 + step) % count
                server = self._servers[index]
                try:
                    link = await self._open(server)
                except BusError as exc:
                    level = logging.WARNING if rounds == 1 and step == 0 else logging.DEBUG
                    log.log(level, "%s: cannot reconnect to %s yet: %s", self.name, server.netloc, exc)
                    continue
                if self._closed:
                    link.abort()
                    return
                self._server_index = index
                self.reconnects += 1
                self._adopt(link)
                log.info("%s: reconnected to NATS at %s", self.name, server.netloc)
                return
            rounds += 1
            await asyncio.sleep(self.settings.reconnect_wait_s)

    # -- events from the live link ------------------------------------------------------------

    def _on_lost(self, link: _Link, exc: Exception | None) -> None:
        if link is not self._link:
            return
        self._link = None
        self._connected = False
        self._up.clear()
        if self._out_handle is not None:
            self._out_handle.cancel()
            self._out_handle = None
        # Frames queued for this turn never reached the socket: keep them for the next link.
        if self._out and not self._closed:
            self._pending[:0] = self._out
            self._pending_size += sum(len(f) for f in self._out)
        self._out.clear()
        self._fail_pongs(BusUnavailable("the NATS connection was lost"))
        self._lost.set()
        if not self._closed:
            log.warning("%s: lost the NATS connection (%s); reconnecting", self.name,
                        exc or "closed by the server")

    def _on_info(self, link: _Link, info: dict[str, Any]) -> None:
        """An INFO on the live link: learn the cluster's servers; in lame-duck mode (the server
        is shutting down) move to another server now rather than when it closes on us."""
        self.info.update(info)
        self._learn_servers(info)
        if info.get("ldm") and len(self._servers) > 1:
            log.info("%s: %s is entering lame-duck mode; moving to another server", self.name, self.server.netloc)
            link.abort()

    def _learn_servers(self, info: dict[str, Any]) -> None:
        """Add the servers a cluster announces (`connect_urls`), with the seeds' credentials."""
        urls = info.get("connect_urls")
        if not isinstance(urls, list):
            return
        fallback = next((a for a in self._servers if a.user is not None or a.token is not None), None)
        tls = self.server.tls
        for url in urls:
            if not isinstance(url, str):
                continue
            try:
                address = parse_url(f"{'tls' if tls else 'nats'}://{url}" if "://" not in url else url)
            except BusError:
                continue
            address = with_credentials(address, fallback)
            if all(a.netloc != address.netloc for a in self._servers):
                self._servers.append(address)

    def _on_pong(self) -> None:
        self._pings_out = 0
        if self._pongs:
            future, _ = self._pongs.popleft()
            if future is not None and not future.done():
                future.set_result(None)

    def _on_error(self, text: str, error: BusError) -> None:
        self.last_error = text
        if isinstance(error, PermissionDenied):
            self._errors += 1
            self._last_refusal = error
            refusal = parse_refusal(text)
            if refusal is not None:
                for listener in self._refusal_listeners:
                    try:
                        listener(refusal)
                    except Exception:  # noqa: BLE001 - one listener's bug must not stop the others
                        log.exception("%s: a refusal listener failed", self.name)
                # The caller whose publish or subscription it was gets PermissionDenied.
                log.info("%s: the server refused to let it %s to %s", self.name, refusal.action, refusal.subject)
                return
        log.warning("%s: NATS error: %s", self.name, text)

    def _keepalive(self) -> None:
        link = self._link
        if link is None:
            return
        if self._pings_out >= self.settings.max_pings_out:
            log.warning("%s: NATS did not answer %d PINGs; dropping the connection", self.name, self._pings_out)
            link.abort()
            return
        self._pings_out += 1
        self._pongs.append((None, self._errors))
        self.write(PING)

    def _fail_pongs(self, error: BusUnavailable) -> None:
        pongs, self._pongs = self._pongs, collections.deque()
        for future, _ in pongs:
            if future is not None and not future.done():
                future.set_exception(BusUnavailable(str(error)))

    def _callback_failed(self, exc: BaseException) -> None:
        log.error("%s: a message callback failed; that message is dropped", self.name, exc_info=exc)


async def stop_keeper(keeper: asyncio.Task[None] | None) -> BaseException | None:
    """Cancel a connection's keeper task (it may be waiting between reconnect rounds) and wait
    for it; return what it had failed with, if anything. Re-raises CancelledError only when the
    calling task itself is being cancelled."""
    if keeper is None:
        return None
    keeper.cancel()
    try:
        await keeper
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this task itself is being cancelled
    except Exception as exc:  # noqa: BLE001 - handed to the caller, who says what it means
        return exc
    return None
