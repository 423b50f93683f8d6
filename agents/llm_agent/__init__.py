"""LLM agents on the runtime: a model with memory tools, every call and edit a recorded step.

    LLMAgent        base class (agents.llm_agent.agent)
    BlockSpec       a core block an agent creates on start (shareable)
    MemoryLog       an agent's memory kept in step with the log, with fenced block writes
    choose_model    Claude when ANTHROPIC_API_KEY is set, else the offline model
"""

from agents.llm_agent.agent import (
    BLOCK_CHANGED,
    BlockSpec,
    ConversationResult,
    LLMAgent,
)
from agents.llm_agent.logread import StoredEvent, read_range
from agents.llm_agent.memory_log import (
    MemoryLog,
    block_fence,
    block_token,
    memory_filter,
)
from agents.llm_agent.models import (
    DEFAULT_MODEL,
    ModelChoice,
    build_model,
    choose_model,
)

__all__ = [
    "BLOCK_CHANGED",
    "DEFAULT_MODEL",
    "BlockSpec",
    "ConversationResult",
    "LLMAgent",
    "MemoryLog",
    "ModelChoice",
    "StoredEvent",
    "block_fence",
    "block_token",
    "build_model",
    "choose_model",
    "memory_filter",
    "read_range",
]
