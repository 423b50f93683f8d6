"""Language models behind one seam: `Model.complete(ModelRequest) -> ModelResponse`.

    AnthropicModel  Claude via the async Anthropic SDK (agents.llm.claude)
    OfflineModel    deterministic rules, no network (agents.llm.offline)
    ReplayModel     answers from recorded calls (agents.llm.replay)

The request/response types are the wire types of schemas.payloads.llm, so every call can be
recorded in full as an `llm.call.completed` event (`call_model` builds it).
"""

from agents.llm.cost import PRICES, Price, cost_usd
from agents.llm.errors import (
    AccessDenied,
    BadModelRequest,
    InvalidModelResponse,
    ModelError,
    ModelTimeout,
    ModelUnavailable,
    Overloaded,
    PermanentModelError,
    RateLimited,
    ReplayMismatch,
    RetryableModelError,
)
from agents.llm.model import Model, call_model, failed_call, request_fingerprint
from agents.llm.offline import OfflineModel
from agents.llm.replay import ReplayModel
from agents.llm.settings import AnthropicSettings
from schemas.payloads.llm import (
    ContentBlock,
    LlmCallCompleted,
    LlmCallFailed,
    Message,
    ModelRequest,
    ModelResponse,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    Usage,
)


def __getattr__(name: str) -> object:
    # The Claude adapter imports the anthropic SDK (~2 s of CPU); agent processes running the
    # offline model should not pay for it, so it is loaded on first use.
    if name == "AnthropicModel":
        from agents.llm.claude import AnthropicModel

        return AnthropicModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRICES",
    "AccessDenied",
    "AnthropicModel",
    "AnthropicSettings",
    "BadModelRequest",
    "ContentBlock",
    "InvalidModelResponse",
    "LlmCallCompleted",
    "LlmCallFailed",
    "Message",
    "Model",
    "ModelError",
    "ModelRequest",
    "ModelResponse",
    "ModelTimeout",
    "ModelUnavailable",
    "OfflineModel",
    "Overloaded",
    "PermanentModelError",
    "Price",
    "RateLimited",
    "RedactedThinkingBlock",
    "ReplayMismatch",
    "ReplayModel",
    "RetryableModelError",
    "TextBlock",
    "ThinkingBlock",
    "ToolResultBlock",
    "ToolSpec",
    "ToolUseBlock",
    "Usage",
    "call_model",
    "cost_usd",
    "failed_call",
    "request_fingerprint",
]
