"""The Claude adapter against a faked HTTP transport: the real SDK builds and parses the traffic.

The fake sits at the lowest seam (httpx2.MockTransport under anthropic.AsyncAnthropic): request
JSON, retries, status-code handling and response parsing are all the real SDK's. No network.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx2
import pytest

from agents.llm import (
    AccessDenied,
    AnthropicModel,
    AnthropicSettings,
    BadModelRequest,
    InvalidModelResponse,
    ModelTimeout,
    ModelUnavailable,
    Overloaded,
    PermanentModelError,
    RateLimited,
    RetryableModelError,
    call_model,
)
from agents.llm.claude import request_params
from bus.errors import PermanentError, RetryableError
from schemas.payloads.llm import (
    Message,
    ModelRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
)

MODEL = "claude-sonnet-5-5"


def _request() -> ModelRequest:
    return ModelRequest(
        model=MODEL,
        max_tokens=1024,
        system=[
            TextBlock(text="Agent: reader\nRole: reader\n\nYou read papers.", cache=True),
            TextBlock(text="<core_memory>...</core_memory>", cache=True),
            TextBlock(text="<memory_metadata>3 facts</memory_metadata>"),
        ],
        tools=[
            ToolSpec(
                name="archival_search", description="Search facts.", input_schema={"type": "object", "properties": {}}
            ),
            ToolSpec(
                name="archival_insert",
                description="Record a fact.",
                input_schema={"type": "object", "properties": {"subject": {"type": "string"}}, "required": ["subject"]},
                cache=True,
            ),
        ],
        messages=[
            Message(role="user", content=[TextBlock(text="Read p01.")]),
            Message(
                role="assistant",
                content=[
                    ThinkingBlock(thinking="I should record it.", signature="sig-1"),
                    ToolUseBlock(id="toolu_1", name="archival_insert", input={"subject": "fec:x"}),
                ],
            ),
            Message(role="user", content=[ToolResultBlock(tool_use_id="toolu_1", content="recorded fact f1")]),
        ],
    )


RESPONSE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [
        {"type": "text", "text": "Recorded. Checking related facts."},
        {"type": "tool_use", "id": "toolu_2", "name": "archival_search", "input": {"query": "fec"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 120,
        "output_tokens": 45,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 2400,
        "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 0},
    },
}


def _model(handler: Callable[[httpx2.Request], httpx2.Response], *, max_retries: int = 0) -> AnthropicModel:
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    return AnthropicModel(AnthropicSettings(api_key="test-key", max_retries=max_retries), http_client=client)


async def test_request_body_carries_system_tools_messages_and_cache_breakpoints() -> None:
    """The JSON posted to /v1/messages has the model, max_tokens, the system blocks with
    cache_control on the stable prefix (prompt, core memory) and not on the metadata, the tools
    with a breakpoint on the last, and the messages with thinking, tool_use and tool_result
    blocks verbatim."""
    seen: list[dict] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/messages"
        seen.append(json.loads(request.content))
        return httpx2.Response(200, json=RESPONSE)

    async with _model(handler) as model:
        await model.complete(_request())
    body = seen[0]
    assert body["model"] == MODEL and body["max_tokens"] == 1024
    assert "temperature" not in body
    assert [b.get("cache_control") for b in body["system"]] == [{"type": "ephemeral"}, {"type": "ephemeral"}, None]
    assert body["system"][0]["text"].startswith("Agent: reader")
    assert [t["name"] for t in body["tools"]] == ["archival_search", "archival_insert"]
    assert "cache_control" not in body["tools"][0] and body["tools"][1]["cache_control"] == {"type": "ephemeral"}
    assert body["tools"][1]["input_schema"]["required"] == ["subject"]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Read p01."}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should record it.", "signature": "sig-1"},
                {"type": "tool_use", "id": "toolu_1", "name": "archival_insert", "input": {"subject": "fec:x"}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "recorded fact f1"}]},
    ]


async def test_response_parses_text_tool_use_and_cache_usage() -> None:
    """A realistic response becomes a ModelResponse with its text and tool_use blocks, the stop
    reason, and usage including cache reads and writes; the recorded call prices it."""
    async with _model(lambda request: httpx2.Response(200, json=RESPONSE)) as model:
        call = await call_model(model, _request(), agent="reader", call_id="c1")
    response = call.response
    assert response.text == "Recorded. Checking related facts."
    assert response.tool_uses == [ToolUseBlock(id="toolu_2", name="archival_search", input={"query": "fec"})]
    assert response.stop_reason == "tool_use"
    assert response.usage.cache_read_input_tokens == 2400
    assert response.usage.cache_creation_input_tokens == 300
    assert call.provider == "anthropic" and call.model == MODEL
    # Sonnet 5.5: $2 in, $10 out, $2.50 5-minute writes, $0.10 reads per Mtok.
    expected = (120 * 2.0 + 45 * 10.0 + 300 * 2.5 + 2400 * 0.10) / 1e6
    assert call.cost_usd == pytest.approx(expected)


async def test_one_hour_cache_ttl_is_sent_when_configured() -> None:
    """With cache_ttl="1h" each breakpoint asks for the 1-hour cache."""
    params = request_params(_request(), cache_ttl="1h")
    assert params["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}


def test_more_than_four_cache_breakpoints_is_refused_before_sending() -> None:
    """The API allows 4 breakpoints; a fifth is a BadModelRequest raised locally."""
    request = ModelRequest(
        model=MODEL,
        max_tokens=10,
        system=[TextBlock(text=str(i), cache=True) for i in range(5)],
        messages=[Message(role="user", content=[TextBlock(text="hi")])],
    )
    with pytest.raises(BadModelRequest, match="5 cache breakpoints"):
        request_params(request)


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (429, RateLimited, True),
        (529, Overloaded, True),
        (500, ModelUnavailable, True),
        (503, ModelUnavailable, True),
        (408, ModelTimeout, True),
        (400, BadModelRequest, False),
        (404, BadModelRequest, False),
        (401, AccessDenied, False),
        (403, AccessDenied, False),
    ],
)
async def test_status_codes_map_to_the_error_tree(status: int, error: type, retryable: bool) -> None:
    """Each HTTP error status becomes its error kind; retryable ones are bus RetryableErrors
    (nak + backoff), permanent ones bus PermanentErrors (dead-letter); the recorded failure
    carries the status."""
    body = {"type": "error", "error": {"type": "some_error", "message": f"status {status}"}}

    async with _model(lambda request: httpx2.Response(status, json=body)) as model:
        with pytest.raises(error) as info:
            await call_model(model, _request(), agent="reader", call_id="c1")
    exc = info.value
    assert exc.retryable is retryable
    assert isinstance(exc, RetryableModelError if retryable else PermanentModelError)
    assert isinstance(exc, RetryableError if retryable else PermanentError)
    assert exc.status_code == status
    assert exc.failed_call.error_type == error.__name__ and exc.failed_call.status_code == status
    assert isinstance(exc.__cause__, Exception)


async def test_rate_limit_carries_the_servers_retry_after() -> None:
    """A 429 with retry-after becomes RateLimited whose delay_s steers the bus's redelivery."""
    async with _model(lambda request: httpx2.Response(429, headers={"retry-after": "7"}, json={})) as model:
        with pytest.raises(RateLimited) as info:
            await model.complete(_request())
    assert info.value.delay_s == 7.0


@pytest.mark.parametrize(
    ("raised", "error"),
    [(httpx2.ConnectError("refused"), ModelUnavailable), (httpx2.ReadTimeout("slow"), ModelTimeout)],
)
async def test_transport_failures_are_retryable(raised: Exception, error: type) -> None:
    """A connection failure or a timeout below the SDK becomes a retryable model error."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        raise raised

    async with _model(handler) as model:
        with pytest.raises(error):
            await model.complete(_request())


async def test_sdk_retries_within_its_budget_then_succeeds() -> None:
    """max_retries=2: two overloaded answers are retried by the SDK (honouring retry-after-ms)
    and the third attempt's answer is returned; three attempts in all."""
    attempts: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        attempts.append(1)
        if len(attempts) < 3:
            return httpx2.Response(529, headers={"retry-after-ms": "1"}, json={})
        return httpx2.Response(200, json=RESPONSE)

    async with _model(handler, max_retries=2) as model:
        response = await model.complete(_request())
    assert len(attempts) == 3 and response.id == "msg_01"


async def test_sdk_retry_budget_is_bounded() -> None:
    """max_retries=1: a persistently overloaded API is tried exactly twice, then Overloaded."""
    attempts: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        attempts.append(1)
        return httpx2.Response(529, headers={"retry-after-ms": "1"}, json={})

    async with _model(handler, max_retries=1) as model:
        with pytest.raises(Overloaded):
            await model.complete(_request())
    assert len(attempts) == 2


async def test_unknown_content_block_is_a_clear_permanent_error() -> None:
    """A block type this code does not handle raises InvalidModelResponse naming it, with the
    raw response in the message (nothing is silently dropped)."""
    weird = dict(RESPONSE, content=[{"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}}])
    async with _model(lambda request: httpx2.Response(200, json=weird)) as model:
        with pytest.raises(InvalidModelResponse, match="server_tool_use") as info:
            await model.complete(_request())
    assert "msg_01" in str(info.value)


async def test_thinking_blocks_in_a_response_are_kept_for_the_next_turn() -> None:
    """Thinking blocks come back with their signature, so the tool loop can pass them back."""
    with_thinking = dict(
        RESPONSE, content=[{"type": "thinking", "thinking": "hmm", "signature": "s"}, *RESPONSE["content"]]
    )
    async with _model(lambda request: httpx2.Response(200, json=with_thinking)) as model:
        response = await model.complete(_request())
    assert response.content[0] == ThinkingBlock(thinking="hmm", signature="s")
    assert response.as_message().content[0] == ThinkingBlock(thinking="hmm", signature="s")


async def test_cancellation_propagates_and_is_not_translated() -> None:
    """Cancelling a call in flight raises CancelledError to the caller (never a model error)."""
    started = asyncio.Event()

    async def handler(request: httpx2.Request) -> httpx2.Response:
        started.set()
        await asyncio.Event().wait()  # the provider never answers
        raise AssertionError("unreachable")

    async with _model(handler, max_retries=2) as model:
        task = asyncio.create_task(model.complete(_request()))
        try:
            await asyncio.wait_for(started.wait(), timeout=5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            task.cancel()
