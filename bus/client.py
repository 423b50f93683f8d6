"""`Bus`: one connection to the log, as an async context manager.

    async with Bus(BusConfig(name="planner")) as bus:
        sent = await bus.send("researcher", TaskRequested(title="read today's papers"))
        reply = await bus.request("researcher", Ping(), timeout_s=5)
        async with bus.consumer("planner", handle, tags=["team"]):
            ...

Every envelope is published durably (the call returns after the server stored it) with
`Nats-Msg-Id` = envelope id, so a re-sent envelope is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from bus.cancellation import cancellation_kept
from bus.config import BusConfig, ConsumerSettings, check_name
from bus.errors import (
    BusUnavailable,
    ConfigurationError,
    QueryError,
    RemoteError,
    RequestTimeout,
)
from bus.metrics import BusMetrics
from bus.publisher import PubAck, Publisher
from bus.server import read_varz
from bus.subjects import Subjects
from bus.topology import advisory_stream_config, ensure_stream, log_stream_checks, log_stream_config
from bus.wire import WireConnection, WireSettings, inbox_prefix_of_client, servers_of_client
from schemas import Codec, DecodeError, Delivery, Envelope, PayloadRegistry, derived_id, new_id, utcnow
from schemas.envelope import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN
from schemas.payloads import RequestFailed
from schemas.query import QueryFailure, QueryRequest, QueryResult

if TYPE_CHECKING:
    from bus.consumer import ConsumerEngine

log = logging.getLogger("continuum.bus")

Handler = Callable[[Envelope[Any], Delivery], Awaitable[None]]

_query_response = msgspec.json.Decoder(QueryResult | QueryFailure)
_query_encoder = msgspec.json.Encoder()


async def server_reachable(url: str, timeout_s: float = 2.0) -> bool:
    """True if something accepts TCP connections at `url` (any of a comma-separated list)."""
    for part in url.split(","):
        parsed = urllib.parse.urlsplit(part.strip() if "://" in part else f"nats://{part.strip()}")
        if not parsed.hostname:
            continue
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname, parsed.port or 4222), timeout_s
            )
        except (OSError, asyncio.TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def _log_keeper_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the publishing connection's keeper failed; publishes will time out",
                  exc_info=task.exception())


class Sent(msgspec.Struct, frozen=True):
    """A published envelope and the server's receipt for it."""

    envelope: Envelope[Any]
    ack: PubAck


class Bus:
    """A connection to the Continuum log. Does no I/O until entered."""

    def __init__(
        self,
        config: BusConfig,
        *,
        registry: PayloadRegistry | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.subjects = Subjects(config.namespace)
        self.codec = Codec(registry)
        self.metrics = BusMetrics(metrics_registry or CollectorRegistry())
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        # Publishing's own connection (bus.wire): frames and acks, no nats-py internals.
        self._wire: WireConnection | None = None
        self._wire_keeper: asyncio.Task[None] | None = None
        self._publisher: Publisher | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "Bus":
        # nats-py retries a refused *first* connect forever when reconnects are unlimited, so
        # look before leaping: a clear error now beats a silent hang.
        if not await server_reachable(self.config.url, self.config.connect_timeout_s):
            raise BusUnavailable(
                f"no NATS server is running at {self.config.url}: start one with `bus up --detach`, "
                "or point BUS_URL at a running server"
            )
        await self._check_fsync()
        try:
            self._nc = await nats.connect(
                self.config.url,
                name=f"continuum:{self.config.name}",
                connect_timeout=self.config.connect_timeout_s,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                pending_size=64 * 1024 * 1024,
                error_cb=self._on_error,
            )
        except (OSError, nats.errors.NoServersError, asyncio.TimeoutError) as exc:
            raise BusUnavailable(
                f"cannot reach NATS at {self.config.url}: start one with `bus up`, "
                "or point BUS_URL at a running server"
            ) from exc
        try:
            self._js = self._nc.jetstream(timeout=self.config.publisher.ack_timeout_s)
            # A live stream is used as it is (a warning names what differs): only an operator
            # changes a log's retention (`bus stream update`), never a process starting up.
            await ensure_stream(
                self._js,
                log_stream_config(self.subjects, self.config.stream),
                checked=log_stream_checks(self.config.stream),
            )
            await ensure_stream(self._js, advisory_stream_config(self.subjects))
            wire = await self._open_wire(self._nc)
            self._publisher = Publisher(
                wire, self._js, subjects=self.subjects, settings=self.config.publisher, metrics=self.metrics
            )
            await self._publisher.__aenter__()
        except BaseException:
            self._publisher = None
            try:
                await self._close_wire()
            finally:
                await self._nc.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._publisher is not None:
                await self._publisher.__aexit__(exc_type, exc, tb)
        finally:
            self._publisher = None
            try:
                await self._close_wire()  # after the publisher: its last acks come back on it
            finally:
                await self._close_control_plane()

    async def _open_wire(self, nc: NATS) -> WireConnection:
        """Connect publishing's WireConnection to the servers (and with the credentials and inbox
        prefix) of the control-plane client, and start its keeper (reconnects, keepalive), a task
        this Bus owns. Raises BusUnavailable, PermissionDenied, ConfigurationError."""
        settings = WireSettings(
            connect_timeout_s=self.config.connect_timeout_s, inbox_prefix=inbox_prefix_of_client(nc)
        )
        wire = WireConnection(servers_of_client(nc), name=f"continuum:{self.config.name}:publish", settings=settings)
        await wire.connect()
        self._wire = wire
        self._wire_keeper = asyncio.get_running_loop().create_task(wire.run(), name="bus-wire-keeper")
        self._wire_keeper.add_done_callback(_log_keeper_failure)
        return wire

    async def _close_wire(self) -> None:
        """Close publishing's connection (bounded), then stop its keeper."""
        wire, self._wire = self._wire, None
        keeper, self._wire_keeper = self._wire_keeper, None
        try:
            if wire is not None:
                await wire.close()
        finally:
            if keeper is not None:
                keeper.cancel()  # it may be waiting between reconnect rounds
                try:
                    await keeper
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # this task itself is being cancelled
                except Exception:  # noqa: S110 - logged by _log_keeper_failure
                    pass

    async def _close_control_plane(self) -> None:
        """Drain the nats-py client (or just close it when the server is gone)."""
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except (nats.errors.ConnectionReconnectingError, nats.errors.ConnectionClosedError,
                    nats.errors.FlushTimeoutError, asyncio.TimeoutError):
                # The server is gone: nothing left to drain, just release the connection.
                await nc.close()

    async def _check_fsync(self) -> None:
        if self.config.monitor_url is None:
            log.debug("no monitor_url: cannot verify that the server fsyncs every write")
            return
        try:
            varz = await asyncio.to_thread(read_varz, self.config.monitor_url)
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s/varz to verify fsync: %s", self.config.monitor_url, exc)
            return
        sync_always = bool(varz.get("jetstream", {}).get("config", {}).get("sync_always"))
        if not sync_always and self.config.require_fsync:
            raise ConfigurationError(
                "the NATS server does not fsync every write, so acked events can be lost on power "
                "failure: set `jetstream { sync_interval: always }` in its config (the repo's "
                "nats.conf does), or pass require_fsync=False to accept that risk"
            )

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats client error: %s", exc)

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("Bus is not connected; use `async with Bus(config) as bus:`")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("Bus is not connected; use `async with Bus(config) as bus:`")
        return self._js

    @property
    def max_payload(self) -> int:
        """The largest message (headers included) the connected server accepts, in bytes, as the
        server announced it to the publishing connection."""
        if self._wire is None:
            raise RuntimeError("Bus is not connected; use `async with Bus(config) as bus:`")
        return self._wire.max_payload

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            raise RuntimeError("Bus is not connected; use `async with Bus(config) as bus:`")
        return self._publisher

    # -- building and publishing envelopes ------------------------------------------------

    def envelope(
        self,
        payload: Any,
        *,
        to: str | None = None,
        tag: str | None = None,
        sender: str | None = None,
        id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        reply_to: str | None = None,
        priority: int = PRIORITY_DEFAULT,
        expires_in_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Envelope[Any]:
        """Build an envelope (no I/O). The correlation id defaults to the envelope's own id.

        Raises ConfigurationError for an invalid name or a priority outside 0..9.
        """
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise ConfigurationError(f"priority {priority} is outside {PRIORITY_MIN}..{PRIORITY_MAX}")
        envelope_id = id or new_id()
        now = utcnow()
        return Envelope(
            id=envelope_id,
            sender=check_name(sender or self.config.name, "sender name"),
            payload=payload,
            created_at=now,
            to=to,
            tag=tag,
            correlation_id=correlation_id or envelope_id,
            causation_id=causation_id,
            reply_to=reply_to,
            priority=priority,
            expires_at=None if expires_in_s is None else now + timedelta(seconds=expires_in_s),
            headers=headers or {},
        )

    def subject_for(self, envelope: Envelope[Any]) -> str:
        """The subject an envelope is published on, from its `to` or `tag`."""
        if envelope.to is not None:
            return self.subjects.inbox(envelope.to, envelope.sender)
        if envelope.tag is not None:
            return self.subjects.group(envelope.tag, envelope.sender)
        raise ConfigurationError("an envelope needs `to` or `tag` to be sent; use record() for events")

    async def publish(self, envelope: Envelope[Any], subject: str | None = None, **occ: Any) -> Sent:
        """Publish an envelope durably and return it with the server's receipt.

        `occ` may hold `expected_last_subject_seq` and `expected_last_subject`.
        Raises BusUnavailable, ConcurrencyConflict, PermissionDenied.
        """
        data = self.codec.encode(envelope)
        ack = await self.publisher.publish(
            subject or self.subject_for(envelope), data, msg_id=envelope.id, **occ
        )
        return Sent(envelope, ack)

    async def send(self, to: str, payload: Any, **fields: Any) -> Sent:
        """Send `payload` to the agent named `to`. `fields` are those of `envelope()`."""
        return await self.publish(self.envelope(payload, to=check_name(to, "agent name"), **fields))

    async def broadcast(self, tag: str, payload: Any, **fields: Any) -> Sent:
        """Send `payload` to every agent name carrying `tag` (once per name)."""
        return await self.publish(self.envelope(payload, tag=check_name(tag, "tag"), **fields))

    async def record(
        self,
        agent: str,
        payload: Any,
        *,
        expected_seq: int | None = None,
        fence: str | None = None,
        **fields: Any,
    ) -> Sent:
        """Append an event about `agent` to the log at `<ns>.event.<agent>.<kind>`.

        With `expected_seq`, the append succeeds only if the agent's last event is at that stream
        sequence (0: it has none) and raises ConcurrencyConflict otherwise: a fenced, single-writer
        append. `fence` narrows the check to one subject filter (e.g. the subject of the agent's
        state alone, so heartbeats do not conflict with it). The previous sequence is carried in
        the `Bus-Prev-Seq` header so projections can detect a missing or rewritten event.
        """
        envelope = self.envelope(payload, sender=fields.pop("sender", agent), **fields)
        subject = self.subjects.event(agent, envelope.kind)
        if expected_seq is None:
            return await self.publish(envelope, subject)
        headers = dict(envelope.headers)
        headers["Bus-Prev-Seq"] = str(expected_seq)
        envelope = msgspec.structs.replace(envelope, headers=headers)
        return await self.publish(
            envelope,
            subject,
            expected_last_subject_seq=expected_seq,
            expected_last_subject=fence or self.subjects.event_filter(agent),
        )

    # -- request / reply ------------------------------------------------------------------

    async def request(self, to: str, payload: Any, *, timeout_s: float = 5.0, **fields: Any) -> Envelope[Any]:
        """Send a request to `to` and return the reply envelope.

        The reply subscription is in place (and flushed) before the request is published, so
        the first reply cannot be missed; both request and reply are in the log. Raises
        RequestTimeout, RemoteError (the handler failed, or the reply is not a valid envelope),
        BusUnavailable.
        """
        envelope = self.envelope(payload, to=check_name(to, "agent name"), reply_to=self.config.name, **fields)
        reply_subject = self.subjects.reply(self.config.name, envelope.id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sub = await self.nc.subscribe(reply_subject, max_msgs=1)
        try:
            await self.nc.flush(timeout=max(1, int(timeout_s)))
            await self.publish(envelope)
            remaining = max(0.001, timeout_s - (loop.time() - started))
            try:
                msg = await sub.next_msg(timeout=remaining)
                data = msg.data
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                data = await self._stored_reply(reply_subject)
                if data is None:
                    self.metrics.requests.labels("timeout").inc()
                    raise RequestTimeout(
                        f"no reply from {to!r} within {timeout_s}s (request {envelope.id} is in the log "
                        "and will still be handled when the agent runs)",
                        request_id=envelope.id,
                    ) from None
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.BadSubscriptionError:
                pass  # already removed after its one message
        try:
            reply = self.codec.decode(data)
        except DecodeError as exc:
            # Anyone may publish on a reply subject: what came back is not the agent's answer.
            self.metrics.requests.labels("failed").inc()
            raise RemoteError(f"the reply to request {envelope.id} is not a valid envelope: {exc}",
                              error_type=exc.problem) from exc
        self.metrics.request_seconds.observe(loop.time() - started)
        if isinstance(reply.payload, RequestFailed):
            self.metrics.requests.labels("failed").inc()
            raise RemoteError(reply.payload.reason, error_type=reply.payload.error_type)
        self.metrics.requests.labels("ok").inc()
        return reply

    async def _stored_reply(self, reply_subject: str) -> bytes | None:
        """A reply stored while the live subscription missed it (e.g. during a reconnect)."""
        try:
            msg = await cancellation_kept(self.js.get_msg(self.subjects.stream, subject=reply_subject, direct=True))
        except (NotFoundError, nats.errors.TimeoutError):
            return None
        return msg.data

    async def reply(self, request: Envelope[Any], payload: Any, *, sender: str | None = None) -> Sent:
        """Answer `request`. The reply id is derived from the request id, so a redelivered
        request that is answered again is stored once. Raises ConfigurationError if `request`
        expects no reply."""
        if request.reply_to is None:
            raise ConfigurationError(f"envelope {request.id} is not a request (no reply_to)")
        envelope = self.envelope(
            payload,
            to=request.reply_to,
            sender=sender or request.to or self.config.name,
            id=derived_id(request.id, "reply"),
            correlation_id=request.correlation_id,
            causation_id=request.id,
        )
        return await self.publish(envelope, self.subjects.reply(request.reply_to, request.id))

    # -- consuming ------------------------------------------------------------------------

    def consumer(
        self,
        agent: str,
        handler: Handler,
        *,
        tags: Sequence[str] = (),
        settings: ConsumerSettings | None = None,
    ) -> "ConsumerEngine":
        """A consumer engine running `handler` for each envelope sent to `agent` or to its `tags`.
        Use it as an async context manager; it runs until the block exits."""
        from bus.consumer import ConsumerEngine

        return ConsumerEngine(
            self,
            agent=check_name(agent, "agent name"),
            tags=tuple(check_name(t, "tag") for t in tags),
            handler=handler,
            settings=settings or self.config.consumer,
        )

    # -- queries --------------------------------------------------------------------------

    async def query(
        self,
        sql: str,
        params: Sequence[Any] = (),
        *,
        min_seq: int | None = None,
        max_rows: int = 10_000,
        timeout_s: float = 10.0,
    ) -> QueryResult:
        """Run read-only SQL on the projection service. With `min_seq`, wait until the views have
        applied that stream sequence. Raises QueryError, BusUnavailable."""
        request = QueryRequest(sql=sql, params=list(params), min_seq=min_seq, max_rows=max_rows, timeout_s=timeout_s)
        try:
            data = _query_encoder.encode(request)
        except (TypeError, msgspec.EncodeError) as exc:
            raise QueryError(f"the query parameters cannot be sent: {exc}", kind="bad_sql") from exc
        # Refused here, as the service would (nats-py would raise its own MaxPayloadError).
        if len(data) > self.max_payload:
            raise QueryError(
                f"the query request is {len(data)} bytes, over the server's message limit of "
                f"{self.max_payload} bytes: send less SQL or fewer parameters",
                kind="too_large",
            )
        try:
            msg = await cancellation_kept(self.nc.request(self.subjects.query, data, timeout=timeout_s + 2.0))
        except nats.errors.NoRespondersError as exc:
            raise BusUnavailable(
                "no projection service is answering queries: start one with `bus projections run` (or `bus up`)"
            ) from exc
        except (nats.errors.TimeoutError, asyncio.TimeoutError) as exc:
            raise QueryError(f"query not answered within {timeout_s}s", kind="timeout") from exc
        try:
            response = _query_response.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise QueryError(f"the query service's answer is not a query response: {exc}", kind="internal") from exc
        if isinstance(response, QueryFailure):
            raise QueryError(response.message, kind=response.kind)
        return response

    async def last_seq(self) -> int:
        """The log's last stream sequence (0 when empty)."""
        info = await cancellation_kept(self.js.stream_info(self.subjects.stream))
        return int(info.state.last_seq)
