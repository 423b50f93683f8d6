"""The model seam: one async method, Messages-API shaped, whoever answers.

    class Model(Protocol):
        provider: str
        async def complete(self, request: ModelRequest) -> ModelResponse

`AnthropicModel` (agents.llm.claude) calls Claude; `OfflineModel` (agents.llm.offline) answers
deterministically without a network; `ReplayModel` (agents.llm.replay) answers from recorded
calls. Agent code cannot tell them apart, so the offline demo and tests run the same paths as
production.

`call_model` wraps one call: it measures latency and returns the `LlmCallCompleted` event to
record (full request and response, cost); on failure it raises the `ModelError` carrying the
`LlmCallFailed` event to record.
"""

from __future__ import annotations

import hashlib
import time
from typing import Protocol, runtime_checkable

import msgspec

from agents.llm.cost import cost_usd
from agents.llm.errors import ModelError
from schemas.payloads.llm import LlmCallCompleted, LlmCallFailed, ModelRequest, ModelResponse

_canonical = msgspec.json.Encoder(order="deterministic")


@runtime_checkable
class Model(Protocol):
    """Anything that completes a Messages-API request."""

    provider: str

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Answer `request`. Raises a `ModelError` subclass (agents.llm.errors) on failure."""
        ...


def request_fingerprint(request: ModelRequest) -> str:
    """SHA-256 hex of the canonical JSON encoding of `request` (sorted keys, defaults omitted):
    equal requests have equal fingerprints in every process."""
    return hashlib.sha256(_canonical.encode(request)).hexdigest()


async def call_model(
    model: Model, request: ModelRequest, *, agent: str, call_id: str, step: str = ""
) -> LlmCallCompleted:
    """Call `model` and return the event that records the call (response inside).

    Raises the `ModelError` the model raised, with `error.failed_call` set to the
    `LlmCallFailed` event to record (so failures are in the log too).
    """
    started = time.perf_counter()
    try:
        response = await model.complete(request)
    except ModelError as exc:
        latency_ms = (time.perf_counter() - started) * 1000.0
        exc.failed_call = failed_call(
            model, request, exc, agent=agent, call_id=call_id, latency_ms=latency_ms, step=step
        )
        raise
    latency_ms = (time.perf_counter() - started) * 1000.0
    return LlmCallCompleted(
        agent=agent,
        call_id=call_id,
        provider=model.provider,
        model=response.model,
        request=request,
        response=response,
        request_sha256=request_fingerprint(request),
        latency_ms=round(latency_ms, 3),
        cost_usd=cost_usd(response.model, response.usage),
        step=step,
    )


def failed_call(
    model: Model,
    request: ModelRequest,
    error: ModelError,
    *,
    agent: str,
    call_id: str,
    latency_ms: float,
    step: str = "",
) -> LlmCallFailed:
    """The event that records a call which raised `error`."""
    return LlmCallFailed(
        agent=agent,
        call_id=call_id,
        provider=model.provider,
        model=request.model,
        request=request,
        request_sha256=request_fingerprint(request),
        error_type=type(error).__name__,
        message=str(error),
        retryable=error.retryable,
        latency_ms=round(latency_ms, 3),
        status_code=error.status_code,
        step=step,
    )
