"""Typed, frozen configuration, built in entry points and passed down.

Nothing here reads the environment; `BusConfig.from_env` is for entry points only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from bus.errors import ConfigurationError
from schemas.envelope import MAX_HOPS_ON_WIRE
from schemas.limits import MAX_NAME_CHARS, misnamed

DEFAULT_URL = "nats://127.0.0.1:4222"
def check_name(value: str, what: str) -> str:
    """Return `value` if it is a valid agent name, tag or namespace (the same rule the envelope
    decoder applies, schemas.limits); else raise ConfigurationError saying which characters are
    allowed."""
    if not 1 <= len(value) <= MAX_NAME_CHARS or misnamed(value) is not None:
        raise ConfigurationError(
            f"invalid {what} {value!r}: use 1-{MAX_NAME_CHARS} letters, digits, '_' or '-' "
            "(it becomes a NATS subject token, so no dots, spaces or wildcards)"
        )
    return value


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Redelivery budget of a consumer. `backoff_s[i]` is the delay after failed attempt i+1;
    the last value repeats. After `max_deliver` attempts the message is dead-lettered."""

    backoff_s: tuple[float, ...] = (0.5, 2.0, 10.0, 30.0)
    max_deliver: int = 5

    def __post_init__(self) -> None:
        if self.max_deliver < 1:
            raise ConfigurationError("max_deliver must be at least 1")
        if not self.backoff_s or any(d < 0 for d in self.backoff_s):
            raise ConfigurationError("backoff_s needs at least one non-negative delay")


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a consumer engine pulls, runs and settles messages."""

    # Handlers running at once per process.
    concurrency: int = 16
    # Messages held locally beyond the running ones; priority orders this window.
    prefetch: int = 256
    # Server-side redelivery timer; a running handler extends it with in-progress heartbeats.
    ack_wait_s: float = 30.0
    # Server-side cap on unacked messages across all replicas of one agent name.
    max_ack_pending: int = 20_000
    retry: RetryPolicy = RetryPolicy()
    # Settlements are recorded in one `delivery.report` event before their acks go out.
    report_interval_s: float = 0.02
    report_max: int = 1000
    # Bounded shutdown: how long in-flight handlers may finish before they are cancelled.
    drain_timeout_s: float = 10.0
    # A message more than this many handled messages down a chain (Envelope.hops) is not
    # handled but dead-lettered as `hop_limit`: agents answering each other stop here.
    max_hops: int = 32

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.prefetch < 0:
            raise ConfigurationError("concurrency must be >= 1 and prefetch >= 0")
        if not 1 <= self.max_hops <= MAX_HOPS_ON_WIRE:
            raise ConfigurationError(f"max_hops must be 1..{MAX_HOPS_ON_WIRE}, not {self.max_hops}")


class PublisherSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Group commit: concurrent publishes are coalesced into JetStream atomic batches."""

    max_batch: int = 1000  # the server's atomic batch limit
    # Units on their way: one committing, the rest already staged at the server (the server
    # allows 50 uncommitted batches per stream, shared by every publisher).
    max_inflight_batches: int = 4
    # A publish() call is answered (ack or BusUnavailable) within this long. A leader election
    # (4-9 s in nats-server) is waited out within it.
    ack_timeout_s: float = 10.0
    # An attempt unanswered for this long is re-sent with the same message ids (stored at most
    # once): its ack may have died with a stream leader while the connection stays up. This is
    # how long publishing may trail a new leader's election.
    resend_after_s: float = 1.0
    # Fewer messages than this go out as pipelined single requests instead of an atomic batch.
    # A batch costs the server a few ms whatever its size; a single fsynced write ~0.2 ms. Measured
    # here: 8 messages 3.0 ms batched vs 1.7 ms single, 32 messages 3.2 ms vs 5.9 ms.
    min_atomic_batch: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 1000:
            raise ConfigurationError("max_batch must be 1..1000 (the server's atomic batch limit)")
        if not 1 <= self.max_inflight_batches <= 16:
            raise ConfigurationError("max_inflight_batches must be 1..16")
        if self.ack_timeout_s <= 0 or self.resend_after_s <= 0:
            raise ConfigurationError("ack_timeout_s and resend_after_s must be positive")
        if not 2 <= self.min_atomic_batch <= self.max_batch + 1:
            raise ConfigurationError("min_atomic_batch must be 2..max_batch+1 (max_batch+1: never batch)")


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The event log stream. Limits retention: it *is* the event store.

    `replicas` (1..5) copies are kept on distinct servers of a cluster; `placement_tags` pins them
    to servers carrying every tag (`server_tags` in their config). The internal streams (the
    max-deliveries advisories) are replicated and placed the same way."""

    max_age_s: float = 0.0  # 0 = keep forever
    max_bytes: int = -1
    duplicate_window_s: float = 600.0
    replicas: int = 1
    placement_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 5:
            raise ConfigurationError(f"replicas must be 1..5 (JetStream's limit), not {self.replicas}")
        if any(not tag or "," in tag or tag != tag.strip() for tag in self.placement_tags):
            raise ConfigurationError(f"invalid placement tags {list(self.placement_tags)!r}: non-empty, no commas")


class TlsSettings(msgspec.Struct, frozen=True, kw_only=True):
    """TLS for every connection: a CA bundle to verify the servers with, and a client
    certificate when the servers ask for one. `tls://` URLs (or a server requiring TLS) turn TLS
    on; these settings say how."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def split_urls(url: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Every URL of a comma-separated string (or of several strings), stripped, in order.
    Raises ConfigurationError when there is none."""
    parts = url.split(",") if isinstance(url, str) else [p for u in url for p in str(u).split(",")]
    urls = tuple(p.strip() for p in parts if p.strip())
    if not urls:
        raise ConfigurationError("no NATS server URL given (BUS_URL is empty)")
    return urls


class BusConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a `Bus` needs. `name` is this process's identity as a sender."""

    # One server, or a cluster's seed servers: a comma-separated string or a sequence of URLs.
    url: str | tuple[str, ...] = DEFAULT_URL
    namespace: str = "default"
    name: str = "client"
    # The servers' HTTP monitoring endpoints (comma-separated: one per cluster node), used to
    # verify fsync-on-every-write at start on every node that holds the log.
    monitor_url: str | None = None
    tls: TlsSettings | None = None
    # The nkey credential file this process connects with (bus.identity; `bus up` turns
    # authorization on and writes the admin one under <home>/auth/creds/). None: no credential.
    credentials: str | None = None
    # Subjects this process's request inboxes live under. None: `_INBOX.<credential's public
    # key>` with a credential (only its holder may subscribe there), else `_INBOX`.
    inbox_prefix: str | None = None
    # Refuse to start if the server is known not to fsync every write.
    require_fsync: bool = True
    connect_timeout_s: float = 2.0
    # Seal private records (bus.privacy) under their agent's key as they are published; off only
    # to measure what sealing costs (`bus bench`), or for a log no one will ever need to forget.
    seal_private: bool = True
    stream: StreamSettings = StreamSettings()
    publisher: PublisherSettings = PublisherSettings()
    consumer: ConsumerSettings = ConsumerSettings()

    def __post_init__(self) -> None:
        check_name(self.namespace, "namespace")
        check_name(self.name, "sender name")
        split_urls(self.url)

    @property
    def servers(self) -> tuple[str, ...]:
        """The seed URLs, in order."""
        return split_urls(self.url)

    @property
    def monitor_urls(self) -> tuple[str, ...]:
        """The monitoring endpoints given, in order (none: fsync cannot be verified)."""
        return split_urls(self.monitor_url) if self.monitor_url and self.monitor_url.strip(", ") else ()

    @property
    def shown_url(self) -> str:
        """The seed URLs for messages: comma-separated, without credentials."""
        return ",".join(_without_credentials(u) for u in self.servers)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "BusConfig":
        """Build a config from the environment (entry points only):

            BUS_URL             seed URLs, comma-separated
            BUS_NAMESPACE       namespace (default "default")
            BUS_MONITOR_URL     monitoring URLs, comma-separated (one per node)
            BUS_REPLICAS        the log's replica count, 1..5 (a new log; see `bus stream update`)
            BUS_PLACEMENT_TAGS  comma-separated server tags the log's replicas must carry
            BUS_TLS_CA, BUS_TLS_CERT, BUS_TLS_KEY   TLS files
            BUS_INBOX_PREFIX    inbox subject prefix
            BUS_CREDS           the nkey credential file to connect with

        Raises ConfigurationError for a value that cannot be used, naming the variable."""
        env = os.environ if env is None else env
        fields: dict[str, object] = {
            "url": env.get("BUS_URL", DEFAULT_URL),
            "namespace": env.get("BUS_NAMESPACE", "default"),
            "monitor_url": env.get("BUS_MONITOR_URL") or None,
        }
        if env.get("BUS_CREDS"):
            fields["credentials"] = env["BUS_CREDS"]
        if env.get("BUS_INBOX_PREFIX"):
            fields["inbox_prefix"] = env["BUS_INBOX_PREFIX"]
        if any(env.get(k) for k in ("BUS_TLS_CA", "BUS_TLS_CERT", "BUS_TLS_KEY")):
            fields["tls"] = TlsSettings(
                ca_file=env.get("BUS_TLS_CA") or None, cert_file=env.get("BUS_TLS_CERT") or None,
                key_file=env.get("BUS_TLS_KEY") or None,
            )
        stream = stream_from_env(env)
        if stream is not None:
            fields["stream"] = stream
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]


def stream_from_env(env: Mapping[str, str], base: StreamSettings | None = None) -> StreamSettings | None:
    """`base` with BUS_REPLICAS and BUS_PLACEMENT_TAGS applied; None when neither is set.
    Raises ConfigurationError naming the variable."""
    replicas_text = env.get("BUS_REPLICAS", "").strip()
    tags_text = env.get("BUS_PLACEMENT_TAGS", "").strip()
    if not replicas_text and not tags_text:
        return None
    changes: dict[str, object] = {}
    if replicas_text:
        try:
            changes["replicas"] = int(replicas_text)
        except ValueError:
            raise ConfigurationError(f"BUS_REPLICAS={replicas_text!r} is not a whole number (1..5)") from None
    if tags_text:
        changes["placement_tags"] = tuple(t.strip() for t in tags_text.split(",") if t.strip())
    try:
        return msgspec.structs.replace(base or StreamSettings(), **changes)
    except ConfigurationError as exc:
        raise ConfigurationError(f"BUS_REPLICAS / BUS_PLACEMENT_TAGS: {exc}") from None


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "nats", url
    return f"{scheme}://{rest.rpartition('@')[2]}"
