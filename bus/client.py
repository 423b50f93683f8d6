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
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from bus.cancellation import cancellation_kept
from bus.config import BusConfig, ConsumerSettings, check_name, split_urls
from bus.errors import (
    BusUnavailable,
    ConfigurationError,
    NoAnswer,
    PermissionDenied,
    NoResponders,
    QueryError,
    RemoteError,
    RequestTimeout,
)
from bus.fsync import check_fsync
from bus.metrics import BusMetrics
from bus.privacy.keyring import Keyring, key_bucket_config
from bus.privacy.sealing import CannotOpen, data_subject, key_id, open_payload, seal
from bus.publisher import PubAck, Publisher
from bus.settle import FORGED_SENDER
from bus.subjects import Subjects
from bus.topology import (
    agent_consumer_configs,
    dead_letter_consumer_config,
    ensure_advisory_stream,
    ensure_consumer,
    ensure_stream,
    log_stream_checks,
    like_log,
    log_stream_config,
    placement,
    stream_nodes,
)
from bus.transport import ConnectionSpec, Transport, any_reachable, translate
from bus.wire import WireConnection, parse_urls
from bus.wire.connection import stop_keeper
from schemas import Codec, DecodeError, Delivery, Envelope, PayloadRegistry, decode_loose, derived_id, new_id, utcnow
from schemas.ids import id_problem, is_id, unidentified
from schemas.envelope import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN
from schemas.payloads import RequestFailed, Sealed
from schemas.query import QueryFailure, QueryRequest, QueryResult

if TYPE_CHECKING:
    from bus.consumer import ConsumerEngine

log = logging.getLogger("continuum.bus")

Handler = Callable[[Envelope[Any], Delivery], Awaitable[None]]

# How long entering a Bus may spend on the advisory stream (it may have no leader right now).
ADVISORY_SETUP_S = 2.0

_query_response = msgspec.json.Decoder(QueryResult | QueryFailure)
_query_encoder = msgspec.json.Encoder()


def answer_from(codec: Codec, data: bytes, responder: str, request_id: str) -> Envelope[Any]:
    """The reply to `request_id` that `responder` published (on the reply subject naming it).
    The server vouches for the subject; the envelope must say the same. Raises RemoteError
    (not a valid envelope, or an envelope claiming another sender: `forged_sender`)."""
    try:
        reply = codec.decode(data)
    except DecodeError as exc:
        raise RemoteError(f"the reply to request {request_id} is not a valid envelope: {exc}",
                          error_type=exc.problem) from exc
    if reply.sender != responder:
        raise RemoteError(
            f"the reply to request {request_id} was published by {responder!r} but says it is from "
            f"{reply.sender!r}", error_type=FORGED_SENDER,
        )
    return reply


async def server_reachable(url: str | Sequence[str], timeout_s: float = 2.0) -> bool:
    """True if something accepts TCP connections at any of the URLs (a comma-separated string
    or a sequence). Raises ConfigurationError for an unusable URL."""
    return await any_reachable(parse_urls(split_urls(url)), timeout_s)


def _log_keeper_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the publishing connection's keeper failed; publishes will time out",
                  exc_info=task.exception())


class LogExtent(msgspec.Struct, frozen=True):
    """The log's first and last stream sequences, how many messages it holds and their bytes
    (all 0 when it was never written)."""

    first_seq: int
    last_seq: int
    messages: int
    bytes: int


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
        self._transport: Transport | None = None
        self._keys: Keyring | None = None
        # Publishing's own connection (bus.wire): frames and acks, no nats-py internals.
        self._wire: WireConnection | None = None
        self._wire_keeper: asyncio.Task[None] | None = None
        self._publisher: Publisher | None = None
        # The highest log sequence this Bus wrote or was delivered: what its queries wait for by
        # default (read-your-writes, and what-you-saw, for the whole session).
        self._session_seq = 0
        # Where queries go: the unscoped service until the server refuses it to this credential.
        self._query_subject = self.subjects.query

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "Bus":
        transport = Transport(ConnectionSpec.from_config(self.config))
        await transport.__aenter__()
        self._transport = transport
        try:
            # A live stream is used as it is (a warning names what differs): only an operator
            # changes a log's retention or replicas (`bus stream update`), never a process starting.
            # A credential that may not create the log (an agent's, on a server where it does
            # not exist yet) is refused at once rather than after the API's timeouts.
            info = await transport.guarded("$JS.API.STREAM.", ensure_stream(
                transport.js,
                log_stream_config(self.subjects, self.config.stream),
                checked=log_stream_checks(self.config.stream),
            ))
            await check_fsync(self.config, stream_nodes(info))
            await self._ensure_advisories(transport, info)
            self._keys = Keyring(transport, self.subjects)
            await self._ensure_key_store(transport, info)
            self.codec.use_opener(self._open_sealed)
            wire = await self._open_wire(transport)
            self._publisher = Publisher(
                wire, transport, subjects=self.subjects, settings=self.config.publisher, metrics=self.metrics
            )
            await self._publisher.__aenter__()
        except BaseException:
            self._publisher = None
            try:
                await self._close_wire()
            finally:
                self._transport = None
                await transport.__aexit__(None, None, None)
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
                transport, self._transport = self._transport, None
                if transport is not None:
                    await transport.__aexit__(exc_type, exc, tb)

    async def _ensure_advisories(self, transport: Transport, log_info: Any) -> None:
        """Create the advisory stream if missing (replicated like the log). Bounded and never
        fatal: only dead-lettering needs it, and consumer engines ensure it again when they start."""
        try:
            async with asyncio.timeout(ADVISORY_SETUP_S):
                await ensure_advisory_stream(transport.js, self.subjects, log_info)
        except (TimeoutError, BusUnavailable) as exc:
            log.warning("the advisory stream %s is not available yet (%s); consumer engines create it "
                        "when they start", self.subjects.advisory_stream, exc or "no answer in time")

    async def _ensure_key_store(self, transport: Transport, log_info: Any) -> None:
        """Create the key store of private records if missing (replicated like the log), then
        load this process's own key when it has one (an agent's runtime opens its own records
        from then on without a read). Bounded and never fatal: a credential that may not create
        it (an agent's) or read this key (the console's) only seals and opens less."""
        try:
            async with asyncio.timeout(ADVISORY_SETUP_S):
                settings = like_log(log_info)
                with contextlib.suppress(PermissionDenied):
                    await transport.guarded("$JS.API.STREAM.", ensure_stream(
                        transport.js, key_bucket_config(self.subjects, settings.replicas, placement(settings.placement_tags))
                    ))
                with contextlib.suppress(PermissionDenied, ConfigurationError):
                    await self.keys.load(key_id(self.config.name))
        except (TimeoutError, BusUnavailable) as exc:
            log.warning("the key store %s is not available yet (%s)", self.subjects.keys_bucket, exc or "no answer in time")

    def _open_sealed(self, envelope: Envelope[Sealed]) -> bytes | None:
        """The payload a sealed envelope hides, when this process holds its key (the codec's
        opener: no I/O); else None."""
        sealed = envelope.payload
        entry = self._keys.cached(sealed.key) if self._keys is not None else None
        if entry is None:
            return None
        try:
            return open_payload(envelope.id, sealed, entry)
        except CannotOpen:
            return None

    @property
    def keys(self) -> Keyring:
        """The keys of private records (bus.privacy.keyring) this process holds or may read."""
        if self._keys is None:
            raise RuntimeError("Bus is not connected; use `async with Bus(config) as bus:`")
        return self._keys

    async def open_record(self, data: bytes) -> Envelope[Any]:
        """Decode stored bytes, loading the key a sealed payload needs first (the payload stays
        `Sealed` when the key was forgotten or this credential may not read it). Raises
        DecodeError, BusUnavailable."""
        envelope = self.codec.decode(data)
        if type(envelope.payload) is Sealed and self.keys.cached(envelope.payload.key) is None:
            with contextlib.suppress(PermissionDenied):
                if await self.keys.load(envelope.payload.key) is not None:
                    envelope = self.codec.decode(data)
        return envelope

    async def unsealed(self, data: bytes) -> bytes:
        """Stored bytes as they were before sealing (the envelope with its payload opened), when
        this credential holds or may load the key; else `data` unchanged. For readers of raw
        records (a fold fed by hand). Raises BusUnavailable."""
        if b'"kind":"sealed"' not in data:
            return data
        try:
            envelope = decode_loose(data)
            sealed = msgspec.json.decode(envelope.payload, type=Sealed)
        except (DecodeError, msgspec.ValidationError, msgspec.DecodeError):
            return data
        with contextlib.suppress(PermissionDenied):
            entry = await self.keys.load(sealed.key)
            if entry is not None:
                with contextlib.suppress(CannotOpen):
                    plain = open_payload(envelope.id, sealed, entry)
                    return self.codec.encode(msgspec.structs.replace(envelope, payload=msgspec.Raw(plain)))
        return data

    async def _open_wire(self, transport: Transport) -> WireConnection:
        """Connect publishing's WireConnection and start its keeper (reconnects, keepalive), a
        task this Bus owns. Raises BusUnavailable, PermissionDenied, ConfigurationError."""
        wire = transport.wire("publish")
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
            await stop_keeper(keeper)  # a failure was logged by _log_keeper_failure

    @property
    def transport(self) -> Transport:
        """Every NATS connection of this Bus (bus.transport): requests, subscriptions, direct
        gets, raw connections for hot paths."""
        if self._transport is None:
            raise RuntimeError("Bus is not connected; use `async with Bus(config) as bus:`")
        return self._transport

    @property
    def js(self) -> JetStreamContext:
        """The JetStream API (bus-internal modules only)."""
        return self.transport.js

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
        hops: int = 0,
    ) -> Envelope[Any]:
        """Build an envelope (no I/O). The correlation id defaults to the envelope's own id;
        `hops` is how many handled messages led to it (see Envelope.hops).

        Raises ConfigurationError for an invalid name, a priority outside 0..9, or an `id`,
        `correlation_id` or `causation_id` that is not a UUID in lowercase text.
        """
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise ConfigurationError(f"priority {priority} is outside {PRIORITY_MIN}..{PRIORITY_MAX}")
        envelope_id = id or new_id()
        if id is not None or correlation_id is not None or causation_id is not None:
            # What a consumer's decoder would refuse is refused here (fresh ids need no check).
            wrong = unidentified(envelope_id, correlation_id, causation_id)
            if wrong is not None:
                raise ConfigurationError(wrong)
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
            hops=hops,
        )

    def subject_for(self, envelope: Envelope[Any]) -> str:
        """The subject an envelope is published on, from its `to` or `tag`."""
        if envelope.to is not None:
            return self.subjects.inbox(envelope.to, envelope.sender)
        if envelope.tag is not None:
            return self.subjects.group(envelope.tag, envelope.sender)
        raise ConfigurationError("an envelope needs `to` or `tag` to be sent; use record() for events")

    async def publish(self, envelope: Envelope[Any], subject: str | None = None, **occ: Any) -> Sent:
        """Publish an envelope durably and return it with the server's receipt. A private
        record (bus.privacy.sealing.PRIVATE_KINDS) is stored sealed under its agent's key (made
        on its first record); the envelope returned is the one given.

        `occ` may hold `expected_last_subject_seq` and `expected_last_subject`.
        Raises BusUnavailable, ConcurrencyConflict, PermissionDenied.
        """
        stored = envelope
        if self.config.seal_private:
            agent = data_subject(envelope.payload)
            if agent is not None:
                key = key_id(agent)
                stored = seal(envelope, key, await self.keys.for_writing(key))
        data = self.codec.encode(stored)
        ack = await self.publisher.publish(
            subject or self.subject_for(envelope), data, msg_id=envelope.id, **occ
        )
        if ack.seq > self._session_seq:
            self._session_seq = ack.seq
        return Sent(envelope, ack)

    @property
    def session_seq(self) -> int:
        """The highest log sequence this Bus has written or been delivered (0: none yet). A query
        waits for the views to have applied it unless told otherwise."""
        return self._session_seq

    def saw(self, seq: int) -> None:
        """Note that this session has seen log sequence `seq` (a delivery it handles, a record it
        read): later queries wait for it."""
        if seq > self._session_seq:
            self._session_seq = seq

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
        reply_subject = self.subjects.reply(self.config.name, envelope.id, to)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with self.transport.expect(reply_subject, timeout_s=timeout_s) as waiter:
            await self.publish(envelope)
            answer = await waiter.next(max(0.001, timeout_s - (loop.time() - started)))
            data = answer.data if answer is not None else await self._stored_reply(reply_subject)
            if data is None:
                self.metrics.requests.labels("timeout").inc()
                raise RequestTimeout(
                    f"no reply from {to!r} within {timeout_s}s (request {envelope.id} is in the log "
                    "and will still be handled when the agent runs)",
                    request_id=envelope.id,
                )
        try:
            reply = answer_from(self.codec, data, to, envelope.id)
        except RemoteError:
            self.metrics.requests.labels("failed").inc()
            raise
        self.metrics.request_seconds.observe(loop.time() - started)
        if isinstance(reply.payload, RequestFailed):
            self.metrics.requests.labels("failed").inc()
            raise RemoteError(reply.payload.reason, error_type=reply.payload.error_type)
        self.metrics.requests.labels("ok").inc()
        return reply

    async def _stored_reply(self, reply_subject: str) -> bytes | None:
        """A reply stored while the live subscription missed it (e.g. during a reconnect)."""
        try:
            stored = await cancellation_kept(
                self.transport.direct_get(self.subjects.stream, {"last_by_subj": reply_subject})
            )
        except BusUnavailable:
            return None
        return None if stored is None else stored.data

    async def reply(self, request: Envelope[Any], payload: Any, *, sender: str | None = None) -> Sent:
        """Answer `request`. The reply id is derived from the request id, so a redelivered
        request that is answered again is stored once. Raises ConfigurationError if `request`
        expects no reply, or cannot be answered (its id is not a UUID in lowercase text)."""
        if request.reply_to is None:
            raise ConfigurationError(f"envelope {request.id} is not a request (no reply_to)")
        if not is_id(request.id):
            # Its reply's id is derived from its id, and its reply subject names it.
            raise ConfigurationError(f"the request cannot be answered: {id_problem('id', request.id)}")
        responder = sender or request.to or self.config.name
        envelope = self.envelope(
            payload,
            to=request.reply_to,
            sender=responder,
            id=derived_id(request.id, "reply"),
            correlation_id=request.correlation_id,
            causation_id=request.id,
            hops=request.hops + 1,
        )
        return await self.publish(envelope, self.subjects.reply(request.reply_to, request.id, responder))

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

    async def prepare_agent(
        self, agent: str, tags: Sequence[str] = (), settings: ConsumerSettings | None = None
    ) -> None:
        """Create (or bring up to date) `agent`'s consumers: its inbox, its tags' broadcasts and
        its dead-letter watcher. An agent's own credential cannot change consumers (so it cannot
        widen what it reads); whoever issues its credential prepares them with this. Raises
        BusUnavailable, PermissionDenied."""
        name = check_name(agent, "agent name")
        configs = agent_consumer_configs(
            self.subjects, name, [check_name(t, "tag") for t in tags], settings or self.config.consumer
        )

        async def prepare() -> None:
            for config in configs:
                await ensure_consumer(self.js, self.subjects.stream, config)
            await ensure_advisory_stream(self.js, self.subjects, await self.js.stream_info(self.subjects.stream))
            await ensure_consumer(self.js, self.subjects.advisory_stream, dead_letter_consumer_config(self.subjects, name))

        try:
            # Any JetStream API refusal meanwhile is this preparation's: raise it at once.
            await self.transport.guarded("$JS.API.", prepare())
        except Exception as exc:  # nats-py's errors, translated here (a BusError stays itself)
            raise translate(exc, f"preparing the consumers of agent {name!r}") from exc

    # -- queries --------------------------------------------------------------------------

    async def query(
        self,
        sql: str,
        params: Sequence[Any] = (),
        *,
        min_seq: int | None = None,
        max_rows: int = 10_000,
        timeout_s: float = 10.0,
        scope: str | None = None,
    ) -> QueryResult:
        """Run read-only SQL on the projection service and return its rows.

        Session consistency by default: the views the query reads are first brought up to the
        highest log sequence this Bus has written or been delivered (`session_seq`), so a query
        sees this session's own sends and records. `min_seq=N` waits for sequence N instead;
        `min_seq=0` does not wait (whatever the views hold now).

        `scope="<agent>"` reads only what that agent may (projections.scopes); an agent's
        credential may query in its own scope only, so a Bus refused the unscoped service asks
        again in its own name's scope, and keeps doing so. Raises QueryError (kind "timeout"
        when the views did not get there within `timeout_s`), BusUnavailable, PermissionDenied."""
        wait_for = self._session_seq if min_seq is None else min_seq
        request = QueryRequest(
            sql=sql, params=list(params), min_seq=wait_for or None, max_rows=max_rows, timeout_s=timeout_s,
        )
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
        subject = self._query_subject if scope is None else f"{self.subjects.query}.{check_name(scope, 'agent name')}"
        try:
            try:
                msg = await cancellation_kept(self.transport.request(subject, data, timeout_s=timeout_s + 2.0))
            except PermissionDenied:
                if scope is not None or subject != self.subjects.query:
                    raise
                # An agent's credential: its queries are answered in its own scope.
                self._query_subject = f"{self.subjects.query}.{self.config.name}"
                msg = await cancellation_kept(
                    self.transport.request(self._query_subject, data, timeout_s=timeout_s + 2.0)
                )
        except NoResponders as exc:
            raise BusUnavailable(
                "no projection service is answering queries: start one with `bus projections run` (or `bus up`)"
            ) from exc
        except NoAnswer as exc:
            raise QueryError(f"query not answered within {timeout_s}s", kind="timeout") from exc
        try:
            response = _query_response.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise QueryError(f"the query service's answer is not a query response: {exc}", kind="internal") from exc
        if isinstance(response, QueryFailure):
            raise QueryError(response.message, kind=response.kind)
        return response

    async def last_seq(self) -> int:
        """The log's last stream sequence (0 when empty). Raises BusUnavailable."""
        return (await self.log_bounds())[1]

    async def log_bounds(self) -> tuple[int, int]:
        """The log's first and last stream sequences ((0, 0) when it was never written).
        Raises BusUnavailable (no answer: e.g. the log has no leader right now)."""
        extent = await self.log_extent()
        return extent.first_seq, extent.last_seq

    async def log_extent(self) -> LogExtent:
        """The log's sequences, message count and bytes, from the stream's state.
        Raises BusUnavailable (no answer: e.g. the log has no leader right now)."""
        try:
            info = await cancellation_kept(self.js.stream_info(self.subjects.stream))
        except Exception as exc:  # nats-py's errors, translated here
            raise translate(exc, f"reading the state of {self.subjects.stream}") from exc
        state = info.state
        return LogExtent(int(state.first_seq), int(state.last_seq), int(state.messages or 0), int(state.bytes or 0))
