"""Claude through the async Anthropic SDK: Messages API, tool use, prompt caching.

    async with AnthropicModel(AnthropicSettings(api_key=key)) as model:
        response = await model.complete(request)

Prompt caching: a `TextBlock(cache=True)` or `ToolSpec(cache=True)` becomes a `cache_control`
breakpoint. The context compiler marks the tools, the system prompt and the core-memory block
(the stable prefix); the API allows at most 4 breakpoints, which is checked before sending.

Retry budget: the SDK retries 408/409/429/5xx and connection failures itself, `max_retries`
times (exponential backoff from 0.5 s to 8 s, or the server's retry-after, which the SDK obeys
without a cap). When those are spent the error reaches the bus consumer, which redelivers the
message up to its `max_deliver`. One LLM step therefore makes at most
`(max_retries + 1) x max_deliver` HTTP attempts: 3 x 5 = 15 with the defaults
(`max_retries=2`, `RetryPolicy.max_deliver=5`), each bounded by `timeout_s`.

Errors: every anthropic/httpx error is translated into agents.llm.errors with `raise ... from`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import anthropic
import httpx2
import msgspec

from agents.llm.errors import (
    AccessDenied,
    BadModelRequest,
    InvalidModelResponse,
    ModelError,
    ModelTimeout,
    ModelUnavailable,
    Overloaded,
    RateLimited,
)
from agents.llm.settings import AnthropicSettings
from agents.llm.validate import validate_request
from schemas.payloads.llm import (
    ContentBlock,
    Message,
    ModelRequest,
    ModelResponse,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)

MAX_CACHE_BREAKPOINTS = 4
class AnthropicModel:
    """`Model` backed by `anthropic.AsyncAnthropic`. Does no I/O until the first call.

    `http_client` replaces the SDK's transport (tests pass an `httpx2.AsyncClient` over an
    `httpx2.MockTransport`; the SDK uses httpx2, not httpx).
    """

    provider = "anthropic"

    def __init__(self, settings: AnthropicSettings, *, http_client: httpx2.AsyncClient | None = None) -> None:
        if settings.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.settings = settings
        self._client = anthropic.AsyncAnthropic(
            api_key=settings.api_key,
            base_url=settings.base_url,
            max_retries=settings.max_retries,
            timeout=httpx2.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            http_client=http_client,
        )

    async def __aenter__(self) -> "AnthropicModel":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Send `request` to the Messages API and return the answer.

        Raises RetryableModelError (rate limit, overloaded, timeout, unavailable) or
        PermanentModelError (bad request, access denied, invalid response).
        """
        validate_request(request)
        params = request_params(request, cache_ttl=self.settings.cache_ttl)
        try:
            message = await self._client.messages.create(**params)
        except anthropic.AnthropicError as exc:
            raise translate_error(exc) from exc
        except httpx2.HTTPError as exc:  # a transport error the SDK did not wrap
            raise ModelUnavailable(f"HTTP error talking to the model: {exc}") from exc
        return parse_message(message.model_dump(mode="json"))


# -- request ----------------------------------------------------------------------------------


def request_params(request: ModelRequest, *, cache_ttl: str = "5m") -> dict[str, Any]:
    """The keyword arguments of `messages.create` for `request`.

    Raises BadModelRequest when it marks more than 4 cache breakpoints.
    """
    cache_control: dict[str, str] = {"type": "ephemeral"}
    if cache_ttl != "5m":
        cache_control["ttl"] = cache_ttl
    breakpoints = 0

    def mark(block: dict[str, Any], cache: bool) -> dict[str, Any]:
        nonlocal breakpoints
        if cache:
            breakpoints += 1
            block["cache_control"] = dict(cache_control)
        return block

    params: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": [_message_param(m, mark) for m in request.messages],
    }
    if request.tools:
        params["tools"] = [
            mark({"name": t.name, "description": t.description, "input_schema": t.input_schema}, t.cache)
            for t in request.tools
        ]
    if request.system:
        params["system"] = [mark({"type": "text", "text": b.text}, b.cache) for b in request.system]
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.stop_sequences:
        params["stop_sequences"] = list(request.stop_sequences)
    if breakpoints > MAX_CACHE_BREAKPOINTS:
        raise BadModelRequest(
            f"the request marks {breakpoints} cache breakpoints; the API allows {MAX_CACHE_BREAKPOINTS}"
        )
    return params


def _message_param(message: Message, mark: Any) -> dict[str, Any]:
    return {"role": message.role, "content": [_block_param(b, mark) for b in message.content]}


def _block_param(block: ContentBlock, mark: Any) -> dict[str, Any]:
    match block:
        case TextBlock(text=text, cache=cache):
            return mark({"type": "text", "text": text}, cache)
        case ToolUseBlock(id=id_, name=name, input=input_):
            return {"type": "tool_use", "id": id_, "name": name, "input": input_}
        case ToolResultBlock(tool_use_id=tool_use_id, content=content, is_error=is_error):
            out: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id, "content": content}
            if is_error:
                out["is_error"] = True
            return out
        case ThinkingBlock(thinking=thinking, signature=signature):
            return {"type": "thinking", "thinking": thinking, "signature": signature}
        case RedactedThinkingBlock(data=data):
            return {"type": "redacted_thinking", "data": data}
    raise BadModelRequest(f"cannot send a {type(block).__name__} block")


# -- response ---------------------------------------------------------------------------------


def parse_message(raw: dict[str, Any]) -> ModelResponse:
    """A `ModelResponse` from the JSON form of an API message.

    Raises InvalidModelResponse (carrying the raw JSON) for a content block type this code does
    not handle (server tools are never offered, so they should not appear).
    """
    content: list[Any] = []
    for block in raw.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            content.append(TextBlock(text=block["text"]))
        elif kind == "tool_use":
            content.append(ToolUseBlock(id=block["id"], name=block["name"], input=dict(block.get("input") or {})))
        elif kind == "thinking":
            content.append(ThinkingBlock(thinking=block["thinking"], signature=block["signature"]))
        elif kind == "redacted_thinking":
            content.append(RedactedThinkingBlock(data=block["data"]))
        else:
            raise InvalidModelResponse(
                f"unsupported content block type {kind!r} in model response: "
                f"{msgspec.json.encode(raw).decode()[:4000]}"
            )
    usage = raw.get("usage") or {}
    creation = usage.get("cache_creation") or {}
    try:
        return ModelResponse(
            id=raw["id"],
            model=raw["model"],
            content=content,
            stop_reason=raw.get("stop_reason") or "end_turn",
            stop_sequence=raw.get("stop_sequence"),
            usage=Usage(
                input_tokens=int(usage.get("input_tokens") or 0),
                output_tokens=int(usage.get("output_tokens") or 0),
                cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens") or 0),
                cache_read_input_tokens=int(usage.get("cache_read_input_tokens") or 0),
                cache_creation_1h_input_tokens=int(creation.get("ephemeral_1h_input_tokens") or 0),
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModelResponse(f"malformed model response ({exc}): {str(raw)[:4000]}") from exc


# -- errors -----------------------------------------------------------------------------------


def translate_error(exc: anthropic.AnthropicError) -> ModelError:
    """The agents.llm.errors equivalent of an anthropic SDK error (not raised: returned)."""
    if isinstance(exc, anthropic.APITimeoutError):
        return ModelTimeout(f"the model did not answer in time: {exc}")
    if isinstance(exc, anthropic.APIConnectionError):
        return ModelUnavailable(f"cannot reach the model API: {exc}")
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        detail = f"{status} {exc.api_message or exc.message}"
        if status == 429:
            return RateLimited(f"rate limited: {detail}", delay_s=_retry_after(exc.response), status_code=status)
        if status == 529:
            return Overloaded(f"model overloaded: {detail}", delay_s=_retry_after(exc.response), status_code=status)
        if status == 408:
            return ModelTimeout(f"request timed out: {detail}", status_code=status)
        if status == 409 or status >= 500:
            return ModelUnavailable(f"model API failed: {detail}", status_code=status)
        if status in (401, 402, 403):
            return AccessDenied(f"access denied: {detail}", status_code=status)
        return BadModelRequest(f"request refused: {detail}", status_code=status)
    if isinstance(exc, anthropic.APIResponseValidationError):
        return InvalidModelResponse(f"response did not validate: {exc}")
    if isinstance(exc, anthropic.CredentialsError):
        return AccessDenied(f"no usable credentials: {exc}")
    return InvalidModelResponse(f"unexpected model client error: {type(exc).__name__}: {exc}")


def _retry_after(response: httpx2.Response) -> float | None:
    headers = response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None
