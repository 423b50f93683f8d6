"""The bus's error tree, split by what the caller should do.

    BusError
    ├── BusUnavailable         retry later: no server, connection lost, publish not acked in time
    │   ├── NoResponders       nobody listens on the subject (a service not running, no leader)
    │   └── NoAnswer           a request got no answer in time (it may have been acted on)
    ├── RequestTimeout         no reply in time; the request itself is in the log
    ├── ConcurrencyConflict    re-read and retry: an expected-last-sequence check failed
    ├── PermissionDenied       fix credentials or subject: the server refused the operation
    ├── ConfigurationError     fix the configuration: bad name, fsync off, drifted stream
    ├── RemoteError            the other side answered a request with a failure
    ├── QueryError             the query service refused or failed a query (see `.kind`)
    ├── ObjectNotFound         the object store holds no object of that name (or it was deleted)
    ├── ObjectCorrupt          an object's stored bytes or metadata do not match (digest, size,
    │                          chunks, unreadable metadata): the object cannot be trusted
    └── HandlerError           raised *by handlers* to steer settlement
        ├── RetryableError     redeliver after a backoff (any other exception is treated so too)
        └── PermanentError     never retry: dead-letter at once

Foreign errors (nats-py, OS) are translated at the boundary with `raise ... from`.
"""

from __future__ import annotations


class BusError(Exception):
    """Base of every error the bus raises."""


class BusUnavailable(BusError):
    """The NATS server cannot be reached or did not answer in time. Retrying later may work."""


class NoResponders(BusUnavailable):
    """Nobody listens on the subject a request went to: a service that is not running, or a
    stream without a leader during an election."""


class NoAnswer(BusUnavailable):
    """A request was not answered in time; it may still have been acted on."""


class RequestTimeout(BusError):
    """A request got no reply within its timeout."""

    def __init__(self, message: str, *, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class ConcurrencyConflict(BusError):
    """An append expected the subject's last sequence to be `expected`, but it was `actual`."""

    def __init__(self, message: str, *, expected: int | None, actual: int | None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class PermissionDenied(BusError):
    """The server refused a publish or subscribe for this connection's credentials."""


class ConfigurationError(BusError):
    """The configuration (or the server's) is wrong; the message says how to fix it."""


class RemoteError(BusError):
    """A request was answered with a failure by the handler on the other side."""

    def __init__(self, message: str, *, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class QueryError(BusError):
    """A query was not answered; `kind` is bad_sql, not_allowed, timeout, lag, too_large (the request,
    the result or the query's memory is over a limit, which the message names) or internal."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class ObjectNotFound(BusError):
    """The object store bucket holds no object of that name (never put, or deleted)."""


class ObjectCorrupt(BusError):
    """An object in the object store is not what its metadata says: its chunks' digest or size
    differ, chunks are missing or extra, or its metadata cannot be read. Nothing read from it
    may be used; the message names the bucket, the object and what is wrong."""


class HandlerError(BusError):
    """Raised by a handler to choose how its message is settled."""


class RetryableError(HandlerError):
    """Redeliver the message later; `delay_s` overrides the policy's backoff for this attempt."""

    def __init__(self, message: str = "", *, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class PermanentError(HandlerError):
    """The message can never be handled: dead-letter it now, with this message as the reason."""
