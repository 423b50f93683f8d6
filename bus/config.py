"""Typed, frozen configuration, built in entry points and passed down.

Nothing here reads the environment; `BusConfig.from_env` is for entry points only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from bus.errors import ConfigurationError
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

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.prefetch < 0:
            raise ConfigurationError("concurrency must be >= 1 and prefetch >= 0")


class PublisherSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Group commit: concurrent publishes are coalesced into JetStream atomic batches."""

    max_batch: int = 1000  # the server's atomic batch limit
    # Units on their way: one committing, the rest already staged at the server (the server
    # allows 50 uncommitted batches per stream, shared by every publisher).
    max_inflight_batches: int = 4
    # A publish() call is answered (ack or BusUnavailable) within this long.
    ack_timeout_s: float = 10.0
    # Fewer messages than this go out as pipelined single requests instead of an atomic batch.
    # A batch costs the server a few ms whatever its size; a single fsynced write ~0.2 ms. Measured
    # here: 8 messages 3.0 ms batched vs 1.7 ms single, 32 messages 3.2 ms vs 5.9 ms.
    min_atomic_batch: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 1000:
            raise ConfigurationError("max_batch must be 1..1000 (the server's atomic batch limit)")
        if not 1 <= self.max_inflight_batches <= 16:
            raise ConfigurationError("max_inflight_batches must be 1..16")
        if self.ack_timeout_s <= 0:
            raise ConfigurationError("ack_timeout_s must be positive")
        if not 2 <= self.min_atomic_batch <= self.max_batch + 1:
            raise ConfigurationError("min_atomic_batch must be 2..max_batch+1 (max_batch+1: never batch)")


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The event log stream. Limits retention: it *is* the event store."""

    max_age_s: float = 0.0  # 0 = keep forever
    max_bytes: int = -1
    duplicate_window_s: float = 600.0
    replicas: int = 1


class BusConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a `Bus` needs. `name` is this process's identity as a sender."""

    url: str = DEFAULT_URL
    namespace: str = "default"
    name: str = "client"
    # The server's HTTP monitoring endpoint, used to verify fsync-on-every-write at start.
    monitor_url: str | None = None
    # Refuse to start if the server is known not to fsync every write.
    require_fsync: bool = True
    connect_timeout_s: float = 2.0
    stream: StreamSettings = StreamSettings()
    publisher: PublisherSettings = PublisherSettings()
    consumer: ConsumerSettings = ConsumerSettings()

    def __post_init__(self) -> None:
        check_name(self.namespace, "namespace")
        check_name(self.name, "sender name")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "BusConfig":
        """Build a config from BUS_URL, BUS_NAMESPACE and BUS_MONITOR_URL (entry points only)."""
        env = os.environ if env is None else env
        fields: dict[str, object] = {
            "url": env.get("BUS_URL", DEFAULT_URL),
            "namespace": env.get("BUS_NAMESPACE", "default"),
            "monitor_url": env.get("BUS_MONITOR_URL") or None,
        }
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]
