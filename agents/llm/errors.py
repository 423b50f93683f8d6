"""The model errors, split by what the caller should do.

    ModelError
    ├── RetryableModelError     a redelivery may succeed (also a bus RetryableError: nak + backoff)
    │   ├── RateLimited         429; `delay_s` is the server's retry-after when it sent one
    │   ├── Overloaded          529: the provider is overloaded
    │   ├── ModelTimeout        no answer in time (client timeout or 408)
    │   └── ModelUnavailable    connection failed, 5xx, 409
    └── PermanentModelError     retrying cannot help (also a bus PermanentError: dead-letter)
        ├── BadModelRequest     400/404/413/422: the request is wrong (model name, size, shape)
        ├── AccessDenied        401/402/403: credentials, billing or permission
        ├── InvalidModelResponse the answer has a shape this code does not handle
        └── ReplayMismatch      a replay met a request that was never recorded

Because each side also subclasses the bus's `RetryableError` / `PermanentError`, a handler can
let a model error propagate and the consumer settles the message correctly. Foreign errors
(anthropic, httpx) are translated in `agents.llm.claude` with `raise ... from`.
"""

from __future__ import annotations

from typing import Any

from bus.errors import PermanentError, RetryableError


class ModelError(Exception):
    """Base of every model error. `status_code` is the HTTP status when there was one;
    `failed_call` is the `LlmCallFailed` event to record, set by `agents.llm.call_model`."""

    status_code: int | None = None
    failed_call: Any = None

    @property
    def retryable(self) -> bool:
        return isinstance(self, RetryableModelError)


class RetryableModelError(ModelError, RetryableError):
    """A later attempt may succeed."""

    def __init__(self, message: str = "", *, delay_s: float | None = None, status_code: int | None = None) -> None:
        RetryableError.__init__(self, message, delay_s=delay_s)
        self.status_code = status_code


class RateLimited(RetryableModelError):
    """The provider's rate limit was hit (429)."""


class Overloaded(RetryableModelError):
    """The provider is overloaded (529)."""


class ModelTimeout(RetryableModelError):
    """No answer in time."""


class ModelUnavailable(RetryableModelError):
    """The provider could not be reached or failed (connection error, 5xx, 409)."""


class PermanentModelError(ModelError, PermanentError):
    """Retrying the same request cannot succeed."""

    def __init__(self, message: str = "", *, status_code: int | None = None) -> None:
        PermanentError.__init__(self, message)
        self.status_code = status_code


class BadModelRequest(PermanentModelError):
    """The request was refused as malformed, too large or for an unknown model."""


class AccessDenied(PermanentModelError):
    """The credentials are missing or wrong, billing failed, or the key lacks permission."""


class InvalidModelResponse(PermanentModelError):
    """The provider's answer cannot be represented (e.g. a content block type this code does
    not handle). The message carries the raw answer so nothing is lost."""


class ReplayMismatch(PermanentModelError):
    """A replayed agent issued a request that is not in the recording: its decisions diverged."""
