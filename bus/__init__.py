"""Transport: `Bus` (NATS + JetStream), topology, consumers, settlement, the server launcher, CLI."""

from bus.client import Bus, Handler, Sent
from bus.config import BusConfig, ConsumerSettings, PublisherSettings, RetryPolicy, StreamSettings
from bus.errors import (
    BusError,
    BusUnavailable,
    ConcurrencyConflict,
    ConfigurationError,
    HandlerError,
    PermanentError,
    PermissionDenied,
    QueryError,
    RemoteError,
    RequestTimeout,
    RetryableError,
)
from bus.publisher import PubAck

__all__ = [
    "Bus",
    "BusConfig",
    "BusError",
    "BusUnavailable",
    "ConcurrencyConflict",
    "ConfigurationError",
    "ConsumerSettings",
    "Handler",
    "HandlerError",
    "PermanentError",
    "PermissionDenied",
    "PubAck",
    "PublisherSettings",
    "QueryError",
    "RemoteError",
    "RequestTimeout",
    "RetryPolicy",
    "RetryableError",
    "Sent",
    "StreamSettings",
]
