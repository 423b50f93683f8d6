"""Agent memory in three tiers, folded from events: core blocks (always in context, size-limited,
shareable), recall (the conversation, with a context window and summaries of what left it) and
archival (typed facts with sources; contradictions kept as data). Plus the context compiler that
turns memory into a model request, and the memory tools the model uses. See README.md.
"""

from agents.memory.anomaly import Anomaly
from agents.memory.archival import FactIndex, FactState, contradiction_id_for, fact_id_for
from agents.memory.blocks import Block, BlockStore
from agents.memory.context import CompiledContext, ContextCompiler, ContextConfig, ContextEstimate
from agents.memory.errors import (
    AgentMemoryError,
    BlockEditError,
    BlockExists,
    BlockLimitExceeded,
    BlockNotFound,
    BlockReadOnly,
    ContextOverflow,
    ContradictionExists,
    FactExists,
    FactNotFound,
    FactStateError,
)
from agents.memory.recall import RecallLog
from agents.memory.state import MEMORY_EVENT_TYPES, AgentMemory, MemoryStats
from agents.memory.summarise import ExtractiveSummariser, Summariser
from agents.memory.tools import TOOLS, MemoryTools, Outbound, ToolContext, ToolOutcome, apply_outcome

__all__ = [
    "MEMORY_EVENT_TYPES",
    "TOOLS",
    "AgentMemory",
    "AgentMemoryError",
    "Anomaly",
    "Block",
    "BlockEditError",
    "BlockExists",
    "BlockLimitExceeded",
    "BlockNotFound",
    "BlockReadOnly",
    "BlockStore",
    "CompiledContext",
    "ContextCompiler",
    "ContextConfig",
    "ContextEstimate",
    "ContextOverflow",
    "ContradictionExists",
    "ExtractiveSummariser",
    "FactExists",
    "FactIndex",
    "FactNotFound",
    "FactState",
    "FactStateError",
    "MemoryStats",
    "MemoryTools",
    "Outbound",
    "RecallLog",
    "Summariser",
    "ToolContext",
    "ToolOutcome",
    "apply_outcome",
    "contradiction_id_for",
    "fact_id_for",
]
