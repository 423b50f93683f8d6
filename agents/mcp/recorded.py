"""`RecordedTools`: an agent's MCP tools in a replay, answered from the log; no server starts.

A replay (agents.research.replay, `bus replay`) re-runs a handling on the recorded model
responses. Its MCP tools must look exactly as they did (the tools are part of every model
request, which the replay matches by fingerprint) and answer exactly as they did:

    offered   the MCP tools of the first recorded model request of the handling
    answers   the results recorded by its `tool:<round>.<i>:<server>__<tool>` steps, by
              tool_use id (the replayed model answers with the recorded ids)

A call that was never recorded means the replayed agent diverged: ReplayMismatch, as for a model
request that was never recorded. A server whose listing changed in the middle of a handling
(restarted with other tools) makes the later requests differ: the replay says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

from agents.llm.errors import ReplayMismatch
from agents.mcp.spec import McpServerSpec, owner
from agents.memory import ToolOutcome
from schemas.payloads.agents import StepRecorded
from schemas.payloads.llm import LlmCallCompleted, ToolResultBlock, ToolSpec, ToolUseBlock

# The prefix of the step an LLM agent runs each tool call in (agents.llm_agent.agent).
TOOL_STEP = "tool:"


class RecordedTools:
    """MountedTools answering from recorded results (see the module docstring)."""

    def __init__(
        self, specs: Sequence[McpServerSpec], offered: Sequence[ToolSpec], results: Mapping[str, ToolResultBlock]
    ) -> None:
        self._specs = tuple(specs)
        self._offered = list(offered)
        self._results = dict(results)

    @classmethod
    def from_log(
        cls, specs: Sequence[McpServerSpec], calls: Sequence[LlmCallCompleted], steps: Iterable[StepRecorded]
    ) -> RecordedTools:
        """The tools of one handling, from its recorded model calls and steps. Raises
        msgspec.ValidationError for a tool step whose result is not a tool outcome."""
        offered = [t for t in calls[0].request.tools if owner(specs, t.name) is not None] if calls else []
        results: dict[str, ToolResultBlock] = {}
        for step in steps:
            if not step.name.startswith(TOOL_STEP):
                continue
            tool = step.name[len(TOOL_STEP):].partition(":")[2]
            if owner(specs, tool) is None:
                continue
            outcome = msgspec.json.decode(step.result, type=ToolOutcome)
            results[outcome.result.tool_use_id] = outcome.result
        return cls(specs, offered, results)

    def specs(self) -> list[ToolSpec]:
        """The MCP tools the recorded requests offered."""
        return list(self._offered)

    def owns(self, name: str) -> bool:
        """Whether `name` belongs to one of the agent's MCP servers."""
        return owner(self._specs, name) is not None

    async def call(self, use: ToolUseBlock, *, key: str) -> ToolResultBlock:
        """The recorded result of this call. Raises ReplayMismatch when none was recorded."""
        result = self._results.get(use.id)
        if result is None:
            raise ReplayMismatch(
                f"no recorded result for MCP tool call {use.name} ({use.id}): the replayed agent diverged "
                "from the recording (a replay never calls an MCP server)"
            )
        return result
