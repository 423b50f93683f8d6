"""The one seam between Continuum and NATS: every connection a process opens is made here.

    spec = ConnectionSpec.from_config(config)             # seeds, credentials, TLS, name, inbox prefix
    async with Transport(spec) as transport:
        answer = await transport.request(subject, data, timeout_s=2)
        sub = await transport.subscribe(subject, on_message, queue="group")
        stored = await transport.direct_get(stream, {"last_by_subj": subject})
        conn = transport.wire("consumer:planner")           # a raw connection for a hot path

Two kinds of connection, both built from the one `ConnectionSpec`:
- the control connection (nats-py) for requests, subscriptions and the JetStream API; it follows
  the cluster's server list and lame-duck notices and reconnects on its own;
- `WireConnection`s (bus.wire) for the hot paths: publishing, pull deliveries and their acks,
  reading the log in order. They start from the seeds plus every server the cluster announced,
  and follow later announcements themselves.

Nothing outside `bus/` imports `nats`; everything outside reaches NATS through `Bus` and this
module's public API. Errors leave as bus.errors: BusUnavailable (no server, lost, no answer in
time; `NoResponders` when nobody listens on a subject), PermissionDenied, ConfigurationError.
"""

from __future__ import annotations

import asyncio
import datetime
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext

from bus.config import BusConfig, TlsSettings
from bus.errors import BusError, BusUnavailable, ConfigurationError, NoAnswer, NoResponders, PermissionDenied
from bus.identity.keys import Credential, load_credential
from bus.identity.permissions import inbox_prefix
from bus.refusal import RefusalWatch, acting_as, parse_refusal
from bus.wire import ServerAddress, WireConnection, WireSettings, parse_urls
from bus.wire.connection import HANDSHAKE_RETRY_PAUSES_S
from bus.wire.address import with_credentials

log = logging.getLogger("continuum.transport")
T = TypeVar("T")

# Between reconnect rounds over the server list. A cluster node that died is skipped at once
# (connection refused), so this bounds how long a client waits once every node is down.
RECONNECT_WAIT_S = 0.25
PING_INTERVAL_S = 1
MAX_PINGS_OUT = 2
# One direct-get attempt's wait before asking again (another replica, likely).
READ_ATTEMPT_S = 1.0
# One JetStream API request's wait for an answer (they take milliseconds when a leader answers).
JS_API_TIMEOUT_S = 2.0


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """An SSL context verifying servers with `tls.ca_file` (else the system's CAs) and presenting
    `tls.cert_file` when given. Raises ConfigurationError for unreadable files."""
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the TLS files ({tls.ca_file}, {tls.cert_file}): {exc}") from exc
    return context


class ConnectionSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Where every connection of a process goes and how it presents itself.

    `servers` are seed URLs (`nats://[user:password@]host:port`, `tls://...`); a cluster's other
    nodes are learned from the servers. An nkey `credential` (bus.identity) signs the server's
    nonce; user/password or a token may ride in the URLs instead."""

    servers: tuple[str, ...]
    name: str
    inbox_prefix: str = "_INBOX"
    tls: TlsSettings | None = None
    credential: Credential | None = None
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = RECONNECT_WAIT_S

    def __post_init__(self) -> None:
        self.addresses()  # raises ConfigurationError for an unusable URL

    @classmethod
    def from_config(cls, config: BusConfig, *, purpose: str = "") -> "ConnectionSpec":
        """The spec of a Bus with `config`: its seeds, TLS, credential, inbox prefix, and its name
        as the connection name (`continuum:<name>[:<purpose>]`). Raises ConfigurationError (a
        credential file that cannot be read)."""
        name = f"continuum:{config.name}" + (f":{purpose}" if purpose else "")
        credential = load_credential(config.credentials) if config.credentials else None
        inbox = config.inbox_prefix or (inbox_prefix(credential.public_key) if credential is not None else "_INBOX")
        return cls(
            servers=config.servers, name=name, inbox_prefix=inbox, tls=config.tls,
            connect_timeout_s=config.connect_timeout_s, credential=credential,
        )

    @classmethod
    def from_urls(cls, urls: str | Iterable[str], **fields: Any) -> "ConnectionSpec":
        """A spec from a comma-separated URL string or several strings. Raises
        ConfigurationError for an empty or unusable list."""
        return cls(servers=tuple(f"{a.scheme}://{_userinfo(a)}{a.netloc}" for a in parse_urls(urls)), **fields)

    def addresses(self) -> list[ServerAddress]:
        """The seeds as addresses, in order. Raises ConfigurationError."""
        return parse_urls(self.servers)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context for TLS connections, or None when no seed asks for TLS and no TLS
        settings are given (a server requiring TLS then gets the default context)."""
        if self.tls is not None:
            return tls_context(self.tls)
        if any(a.tls for a in self.addresses()):
            return ssl.create_default_context()
        return None

    def wire_settings(self) -> WireSettings:
        return WireSettings(
            connect_timeout_s=self.connect_timeout_s,
            reconnect_wait_s=self.reconnect_wait_s,
            inbox_prefix=self.inbox_prefix,
            ssl_context=self.ssl_context(),
            credential=self.credential,
        )


_TLS_UNTRUSTED = "tls-untrusted: "


def _is_auth_refusal(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text or (
        "authentication" in text and "expired" not in text
    )


def _userinfo(address: ServerAddress) -> str:
    if address.user is not None:
        return f"{address.user}:{address.password or ''}@"
    if address.token is not None:
        return f"{address.token}@"
    return ""


class Inbound(msgspec.Struct, frozen=True):
    """A message received on a subscription or as an answer."""

    subject: str
    data: bytes
    reply: str = ""
    headers: dict[str, str] = {}

    @property
    def status(self) -> str:
        """The NATS status code of a status message ("404", "503"), else ""."""
        return self.headers.get("Status", "")


class StoredMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message read back from a stream."""

    subject: str
    seq: int
    headers: dict[str, str]
    data: bytes

    @property
    def stored_ns(self) -> int:
        """When the server stored it, ns since the epoch (from `Nats-Time-Stamp`); 0 when the
        answer does not say."""
        stamp = self.headers.get("Nats-Time-Stamp", "")
        # RFC 3339 with up to nine fractional digits, which datetime (microseconds) cannot hold.
        whole, _, rest = stamp.partition(".")
        digits = rest.rstrip("Z")
        try:
            when = datetime.datetime.fromisoformat(whole.removesuffix("Z") + "+00:00")
            fraction = int(digits.ljust(9, "0")[:9]) if digits.isdigit() else 0
        except ValueError:
            return 0
        return int(when.timestamp()) * 1_000_000_000 + fraction


class Subscription:
    """A live subscription; `await sub.close()` removes it (idempotent, never raises)."""

    def __init__(self, sub: NatsSubscription) -> None:
        self._sub = sub
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await self._sub.unsubscribe()


class OneReply:
    """Waits for the first message on one subject (`Transport.expect`)."""

    def __init__(self, sub: NatsSubscription) -> None:
        self._sub = sub

    async def next(self, timeout_s: float) -> Inbound | None:
        """The message, or None when none came within `timeout_s`. Raises BusUnavailable when
        the connection is closed."""
        try:
            msg = await self._sub.next_msg(timeout=max(0.001, timeout_s))
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return None
        except nats.errors.ConnectionClosedError as exc:
            raise BusUnavailable("the NATS connection is closed") from exc
        return _inbound(msg)


MessageHandler = Callable[[Inbound], Awaitable[None]]


def _inbound(msg: Msg) -> Inbound:
    return Inbound(msg.subject, msg.data, msg.reply or "", dict(msg.headers or {}))


def translate(exc: BaseException, what: str) -> BusError:
    """The bus error for a nats-py (or socket) error raised while doing `what`."""
    if isinstance(exc, BusError):
        return exc
    if isinstance(exc, nats.errors.NoRespondersError):
        return NoResponders(f"{what}: nobody is listening (no responders)")
    if isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return NoAnswer(f"{what}: no answer in time")
    text = str(exc)
    if "permissions violation" in text.lower() or "authorization" in text.lower():
        return PermissionDenied(f"{what}: {text}")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return ConfigurationError(f"{what}: the message is over the server's limit ({text})")
    return BusUnavailable(f"{what}: {type(exc).__name__}: {text}")


# What nats-py raises for a request or a subscription that could not be served.
_NATS_FAILURES = (nats.errors.Error, asyncio.TimeoutError, TimeoutError, OSError)


class Transport:
    """Every NATS connection of one process (see the module docstring). An async context
    manager; no I/O until entered."""

    def __init__(self, spec: ConnectionSpec) -> None:
        self.spec = spec
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        # Calls waiting on the control connection, failed at once when the server refuses them.
        self.refusals = RefusalWatch(acting_as(spec.name, spec.credential))
        self._refused_at_connect: asyncio.Future[str] | None = None

    async def __aenter__(self) -> "Transport":
        """Connect the control connection. Raises BusUnavailable when no seed answers (at once:
        nats-py would retry a refused first connect forever), PermissionDenied, ConfigurationError."""
        spec = self.spec
        if not await any_reachable(spec.addresses(), spec.connect_timeout_s):
            raise BusUnavailable(
                f"no NATS server is running at {_shown(spec)}: start one with `bus up --detach`, "
                "or point the config at a running server (BUS_URL, read by BusConfig.from_env)"
            )
        options: dict[str, Any] = {}
        context = spec.ssl_context()
        if context is not None:
            options["tls"] = context
        if spec.credential is not None:
            options["nkeys_seed_str"] = spec.credential.seed
        settings = dict(
            servers=list(spec.servers),
            name=spec.name,
            connect_timeout=spec.connect_timeout_s,
            max_reconnect_attempts=-1,
            reconnect_time_wait=spec.reconnect_wait_s,
            allow_reconnect=True,
            pending_size=64 * 1024 * 1024,
            # A hung server keeps the socket open: unanswered PINGs are how it is noticed
            # (here within ~3 s) and the connection moves to another node.
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_PINGS_OUT,
            inbox_prefix=spec.inbox_prefix,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            **options,
        )
        # A server reloading its authorization refuses or drops some new connections: a refused
        # or failed first connect to a reachable server is tried again (bus.wire's pauses).
        for pause in (*HANDSHAKE_RETRY_PAUSES_S, None):
            nc = NATS()
            self._refused_at_connect = asyncio.get_running_loop().create_future()
            try:
                await self._connect(nc, settings)
                break
            except (PermissionDenied, BusUnavailable) as exc:
                if pause is None or isinstance(exc.__cause__, asyncio.TimeoutError):  # a hung server: no retry
                    raise
                log.info("%s: %s; trying again in %.2fs (a server reloading its authorization does this)",
                         spec.name, exc, pause)
                await asyncio.sleep(pause)
        self._nc = nc
        # Each JetStream API call waits this long; callers retry while an election explains the
        # silence (bus.topology.patiently), so a lost request costs seconds, not a whole timeout.
        self._js = self._nc.jetstream(timeout=JS_API_TIMEOUT_S)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Drain the control connection (or just close it when the server is gone)."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
            return
        try:
            await nc.drain()
        except (nats.errors.Error, asyncio.TimeoutError, OSError):
            await nc.close()  # the server is gone: nothing left to drain

    async def _connect(self, nc: NATS, options: dict[str, Any]) -> None:
        """Connect `nc`; a first connection the server refuses (no credential, an unknown or
        revoked one) raises PermissionDenied at once (nats-py would try again for ever).
        Raises BusUnavailable, PermissionDenied, ConfigurationError (TLS not trusted)."""
        try:
            await self._connect_or_refused(nc, options)
        except (OSError, nats.errors.NoServersError, asyncio.TimeoutError) as exc:
            raise BusUnavailable(
                f"cannot reach NATS at {_shown(self.spec)}: start one with `bus up`, or point the config at a "
                "running server (BUS_URL, read by BusConfig.from_env)"
            ) from exc
        except nats.errors.Error as exc:
            raise translate(exc, f"connecting to {_shown(self.spec)}") from exc

    async def _connect_or_refused(self, nc: NATS, options: dict[str, Any]) -> None:
        connecting = asyncio.ensure_future(nc.connect(**options))
        refused = self._refused_at_connect
        assert refused is not None
        try:
            await asyncio.wait((connecting, refused), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            raise
        if connecting.done():
            connecting.result()
            return
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError, OSError):
            await nc.close()
        why = refused.result()
        if why.startswith(_TLS_UNTRUSTED):
            raise ConfigurationError(
                f"the server at {_shown(self.spec)} serves TLS with a certificate this client does not trust "
                f"({why.removeprefix(_TLS_UNTRUSTED)}): give the CA that signed it (BUS_TLS_CA; `bus up --tls` "
                "keeps it in <home>/auth/tls/ca.pem)"
            )
        who = f"credential {self.spec.credential.path}" if self.spec.credential is not None else "no credential"
        raise PermissionDenied(
            f"the server at {_shown(self.spec)} refused the connection ({who}): {why}; "
            "a server with authorization on needs a valid credential (BUS_CREDS / --creds; `bus creds list`)"
        )

    async def _on_error(self, exc: Exception) -> None:
        refused = self._refused_at_connect
        if self._nc is None and refused is not None and not refused.done():
            if _is_auth_refusal(exc):
                refused.set_result(str(exc).removeprefix("nats: ").strip("'"))
                return
            if isinstance(exc, ssl.SSLCertVerificationError):  # nats-py would try again for ever
                refused.set_result(_TLS_UNTRUSTED + (exc.verify_message or str(exc)))
                return
        refusal = parse_refusal(str(exc))
        if refusal is not None:
            self.refusals.refused(refusal)
            # The waiting call gets PermissionDenied; an unguarded one (a bare publish) only this line.
            log.info("%s: the server refused to let it %s to %s", self.spec.name, refusal.action, refusal.subject)
            return
        log.warning("%s: NATS client error: %s", self.spec.name, exc)

    async def guarded(self, subject_prefix: str, call: Awaitable[T]) -> T:
        """`call` (a JetStream API call or a request on the control connection), raising
        PermissionDenied as soon as the server refuses to let this identity publish to a
        subject starting with `subject_prefix`, instead of after the call's timeout."""
        return await self.refusals.guard(subject_prefix, call)

    async def _on_disconnected(self) -> None:
        nc = self._nc
        if nc is None or nc.is_closed or nc.is_draining:
            return  # (closing it: nats-py says disconnected then too)
        log.warning("%s: the control connection to NATS was lost; reconnecting", self.spec.name)

    async def _on_reconnected(self) -> None:
        nc = self._nc
        log.info("%s: the control connection reconnected to NATS at %s", self.spec.name,
                 nc.connected_url.netloc if nc is not None and nc.connected_url is not None else "?")

    # -- state -----------------------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        """The control connection, for bus-internal modules only."""
        if self._nc is None:
            raise RuntimeError("the transport is not connected; enter it first")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream API on the control connection, for bus-internal modules only."""
        if self._js is None:
            raise RuntimeError("the transport is not connected; enter it first")
        return self._js

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def known_servers(self) -> list[ServerAddress]:
        """The server the control connection is on, then every other one it knows (seeds and
        those the cluster announced), each with the seeds' credentials."""
        seeds = self.spec.addresses()
        fallback = next((a for a in seeds if a.user is not None or a.token is not None), None)
        found: list[ServerAddress] = []
        nc = self._nc
        uris = []
        if nc is not None:
            if nc.connected_url is not None:
                uris.append(nc.connected_url)
            uris.extend(nc.servers or [])
        for uri in uris:
            if uri.scheme not in ("nats", "tls") or not uri.hostname:
                continue
            address = with_credentials(
                ServerAddress(host=uri.hostname, port=uri.port or 4222, tls=uri.scheme == "tls"), fallback
            )
            if address not in found:
                found.append(address)
        for seed in seeds:
            if seed not in found:
                found.append(seed)
        return found

    def server_facts(self) -> dict[str, Any]:
        """What the control connection's server announced: `version` and `max_payload` (empty
        while disconnected)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return {}
        version = nc.connected_server_version
        facts: dict[str, Any] = {"max_payload": nc.max_payload}
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            facts["version"] = f"{version.major}.{version.minor}.{version.patch}"
        return facts

    # -- raw connections for hot paths ---------------------------------------------------------

    def wire(self, purpose: str) -> WireConnection:
        """A new raw connection (not yet connected) named `<spec name>:<purpose>`, to the known
        servers, with the spec's credentials, TLS and inbox prefix. The caller connects it, runs
        its keeper (`run()`) in a task it owns, and closes it."""
        return WireConnection(
            self.known_servers(), name=f"{self.spec.name}:{purpose}", settings=self.spec.wire_settings()
        )

    # -- requests and subscriptions ------------------------------------------------------------

    async def request(
        self, subject: str, data: bytes = b"", *, timeout_s: float = 5.0, headers: dict[str, str] | None = None
    ) -> Inbound:
        """Publish `data` on `subject` and return the first answer. Raises NoResponders when
        nobody listens, BusUnavailable on no answer in time or a lost connection,
        PermissionDenied, ConfigurationError (over the server's message limit)."""
        try:
            msg = await self.refusals.guard(subject, self.nc.request(subject, data, timeout=timeout_s, headers=headers))
        except _NATS_FAILURES as exc:
            raise translate(exc, f"request on {subject}") from exc
        return _inbound(msg)

    async def publish(self, subject: str, data: bytes, *, reply: str = "", headers: dict[str, str] | None = None) -> None:
        """Publish without waiting for anything (core NATS, at most once). Raises BusUnavailable,
        ConfigurationError."""
        try:
            await self.nc.publish(subject, data, reply=reply, headers=headers)
        except _NATS_FAILURES as exc:
            raise translate(exc, f"publish on {subject}") from exc

    async def subscribe(
        self, subject: str, handler: MessageHandler, *, queue: str = "", max_pending: int = 65_536
    ) -> Subscription:
        """Run `handler` for each message on `subject` (one queue-group member when `queue`),
        one at a time, in arrival order. A handler's exception is logged and loses that message
        only. Raises BusUnavailable, PermissionDenied."""

        async def deliver(msg: Msg) -> None:
            try:
                await handler(_inbound(msg))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: the handler of %s failed; that message is dropped", self.spec.name, subject)

        try:
            sub = await self.nc.subscribe(subject, queue=queue, cb=deliver, pending_msgs_limit=max_pending)
        except _NATS_FAILURES as exc:
            raise translate(exc, f"subscribe to {subject}") from exc
        await self._confirm_interest(sub, subject)
        return Subscription(sub)

    async def _confirm_interest(self, sub: NatsSubscription, subject: str, timeout_s: float = JS_API_TIMEOUT_S) -> None:
        """Round-trip to the server so a refused subscription raises PermissionDenied now (the
        server answers SUB with -ERR before the PONG), and the interest is known to the server
        when this returns. Unsubscribes on failure. Raises BusUnavailable, PermissionDenied."""
        try:
            await self.refusals.guard(subject, self.nc.flush(timeout=timeout_s), action="subscribe", finish=True)
        except BaseException as exc:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await sub.unsubscribe()
            if isinstance(exc, _NATS_FAILURES):
                raise translate(exc, f"subscribe to {subject}") from exc
            raise

    async def respond(self, to: Inbound, data: bytes) -> bool:
        """Answer a request (nothing when it expects no answer); False when the answer could not
        be sent (connection lost). Never raises."""
        if not to.reply:
            return False
        try:
            await self.nc.publish(to.reply, data)
        except _NATS_FAILURES as exc:
            log.warning("%s: cannot answer on %s: %s", self.spec.name, to.reply, exc)
            return False
        return True

    async def gather(self, subject: str, data: bytes = b"", *, wait_s: float) -> list[Inbound]:
        """Publish a request that several may answer and collect the answers that come within
        `wait_s` (a roll call). Raises BusUnavailable, PermissionDenied."""
        inbox = self.new_inbox()
        answers: list[Inbound] = []

        async def collect(msg: Msg) -> None:
            answers.append(_inbound(msg))

        try:
            sub = await self.nc.subscribe(inbox, cb=collect)
            try:
                await self.nc.publish(subject, data, reply=inbox)
                await asyncio.sleep(wait_s)
            finally:
                with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                    await sub.unsubscribe()
        except _NATS_FAILURES as exc:
            raise translate(exc, f"roll call on {subject}") from exc
        return [a for a in answers if not a.status]

    @contextlib.asynccontextmanager
    async def expect(self, subject: str, *, timeout_s: float) -> Any:
        """Listen for one message on `subject`; the interest is known to the server before the
        block runs (so an answer to something published inside cannot be missed).

            async with transport.expect(reply_subject, timeout_s=5) as waiter:
                ...publish the request...
                answer = await waiter.next(timeout_s)     # None if nothing came

        Raises BusUnavailable (the server did not confirm the interest in time), PermissionDenied.
        """
        try:
            sub = await self.nc.subscribe(subject, max_msgs=1)
        except _NATS_FAILURES as exc:
            raise translate(exc, f"subscribe to {subject}") from exc
        await self._confirm_interest(sub, subject, max(1, int(timeout_s)))
        try:
            yield OneReply(sub)
        finally:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await sub.unsubscribe()

    def new_inbox(self) -> str:
        return self.nc.new_inbox()

    async def flush(self, timeout_s: float = 2.0) -> None:
        """Return once the server has read everything sent so far. Raises BusUnavailable."""
        try:
            await self.nc.flush(timeout=max(1, int(timeout_s)))
        except _NATS_FAILURES as exc:
            raise translate(exc, "flush") from exc

    # -- reading stored messages -----------------------------------------------------------------

    async def direct_get(self, stream: str, request: dict[str, Any], *, timeout_s: float = 5.0) -> StoredMessage | None:
        """One message by JetStream direct get (`{"seq": n}`, `{"last_by_subj": s}`, ...), served
        by any replica; None when there is none. Raises BusUnavailable (NoResponders: direct get
        is off, or the stream has no replica answering)."""
        answer = await self._read_patiently(
            stream, request, timeout_s, lambda attempt_s: self.request(
                f"$JS.API.DIRECT.GET.{stream}", msgspec.json.encode(request), timeout_s=attempt_s
            ),
        )
        return _stored_or_none(answer, f"direct get {request}")

    async def direct_get_last(self, stream: str, subject: str, *, timeout_s: float = 5.0) -> StoredMessage | None:
        """The last message stored on `subject` (a literal subject), by the direct get whose API
        subject names it (`$JS.API.DIRECT.GET.<stream>.<subject>`): what a permission on that
        API subject can grant for one subject alone (a key of the key store). None when there
        is none. Raises BusUnavailable, PermissionDenied."""
        api = f"$JS.API.DIRECT.GET.{stream}.{subject}"
        answer = await self._read_patiently(
            stream, {"last_by_subj": subject}, timeout_s, lambda attempt_s: self.request(api, b"", timeout_s=attempt_s)
        )
        return _stored_or_none(answer, f"direct get of {subject}")

    async def direct_get_batch(
        self, stream: str, request: dict[str, Any], *, limit: int, timeout_s: float = 5.0
    ) -> list[StoredMessage]:
        """A batched direct get (`request` holds `"batch": limit`): up to `limit` messages in
        stream order, empty when nothing matched. Raises BusUnavailable."""
        return await self._read_patiently(
            stream, request, timeout_s, lambda attempt_s: self._direct_batch(stream, request, limit, attempt_s)
        )

    async def _read_patiently(
        self, stream: str, request: dict[str, Any], timeout_s: float, attempt: Callable[[float], Awaitable[Any]]
    ) -> Any:
        """Run a read (direct get) attempt of at most READ_ATTEMPT_S, again while time is left
        when it was not answered: any replica serves direct gets, and one that hangs (a paused
        or partitioned node still counted as a responder) must cost one attempt, not the whole
        timeout; the next attempt goes to another. Raises BusUnavailable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            try:
                return await attempt(max(0.001, min(READ_ATTEMPT_S, remaining)))
            except NoAnswer:
                if deadline - loop.time() <= 0.001:
                    raise NoAnswer(f"direct get {request} from {stream}: no answer within {timeout_s}s") from None

    async def _direct_batch(
        self, stream: str, request: dict[str, Any], limit: int, timeout_s: float
    ) -> list[StoredMessage]:
        inbox = self.new_inbox()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        out: list[StoredMessage] = []
        try:
            sub = await self.nc.subscribe(inbox)
            try:
                # Same connection: the server sees the SUB before the request, no flush needed.
                await self.nc.publish(f"$JS.API.DIRECT.GET.{stream}", msgspec.json.encode(request), reply=inbox)
                while True:
                    # The whole batch comes from one replica, back to back: only the first
                    # message waits for the attempt's timeout.
                    wait = deadline - loop.time() if not out else max(deadline - loop.time(), READ_ATTEMPT_S)
                    answer = _inbound(await sub.next_msg(timeout=max(0.001, wait)))
                    status = answer.status
                    if status in ("204", "404"):
                        return out
                    if status:
                        raise BusUnavailable(
                            f"direct get {request} refused: {status} {answer.headers.get('Description', '')}"
                        )
                    out.append(_stored(answer))
                    if len(out) >= limit:
                        # The end-of-batch marker follows; not waiting for it saves a round trip.
                        return out
            finally:
                with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                    await sub.unsubscribe()
        except _NATS_FAILURES as exc:
            raise translate(exc, f"direct get {request} from {stream}") from exc


def _stored_or_none(answer: Inbound, what: str) -> StoredMessage | None:
    """A direct get's answer: the message, None for 404 (nothing there). Raises BusUnavailable
    for another status, naming `what` was asked."""
    status = answer.status
    if status == "404":
        return None
    if status:
        raise BusUnavailable(f"{what} refused: {status} {answer.headers.get('Description', '')}")
    return _stored(answer)


def _stored(answer: Inbound) -> StoredMessage:
    headers = answer.headers
    return StoredMessage(
        subject=headers.get("Nats-Subject", ""),
        seq=int(headers.get("Nats-Sequence", "0") or 0),
        headers=headers,
        data=answer.data,
    )


def _shown(spec: ConnectionSpec) -> str:
    """The seeds for messages, without credentials."""
    return ",".join(f"{a.scheme}://{a.netloc}" for a in spec.addresses())


async def any_reachable(addresses: Sequence[ServerAddress], timeout_s: float) -> bool:
    """True if any of `addresses` accepts a TCP connection (tried at once, not in turn)."""

    async def reachable(address: ServerAddress) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), timeout_s)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    results = await asyncio.gather(*(reachable(a) for a in addresses))
    return any(results)
