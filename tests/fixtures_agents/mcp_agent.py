"""LLM agents on the offline model whose only tools are the MCP ledger server's
(fixtures_agents/mcp_ledger_server.py), started as processes by the tests.

A task reads `call <tool> <json input> ; call <tool> <json input> ...`: `CallPolicy` makes the
calls of the ledger server's tools (`ledger__<tool>`) in order, one per round, then ends its turn
with one line per result. The agent sends
`<task> => <final text>` to `sink` when done.

Environment (read in `mcp()`, in the agent's process): CONTINUUM_TEST_LEDGER (the ledger path),
CONTINUUM_TEST_STEP_MS (an append's work), CONTINUUM_TEST_MCP_TIMEOUT_S (a call's timeout).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from agents.llm import OfflineModel
from agents.llm.offline import Decision, RequestView, ToolCall
from agents.llm_agent import LLMAgent
from agents.mcp.spec import McpServerSpec
from agents.runtime import Context
from bus.config import ConsumerSettings, RetryPolicy
from schemas.payloads import Note

SERVER = Path(__file__).with_name("mcp_ledger_server.py")
TOOLS = ("append", "echo", "hang", "crash", "fail")
_CALL = re.compile(r"call (?P<name>[\w-]+) (?P<input>\{.*\})")


def plan(task: str) -> list[tuple[str, dict[str, Any]]]:
    """The calls a task asks for, in order (empty when it is not a `call ...` task)."""
    calls = []
    for part in task.split(" ; "):
        m = _CALL.fullmatch(part.strip())
        if m is None:
            return []
        calls.append((m["name"], json.loads(m["input"])))
    return calls


class CallPolicy:
    """Makes the calls the task asks for, one per round, then reports their results."""

    def decide(self, view: RequestView) -> Decision | None:
        calls = plan(re.sub(r"^\[from [\w-]+\] ", "", view.task_text).strip())
        if not calls:
            return None
        made = view.calls
        if len(made) < len(calls):
            name, arguments = calls[len(made)]
            return Decision(calls=[ToolCall(f"ledger__{name}", arguments)])
        lines = []
        for use in made:
            result = view.results.get(use.id)
            status = "no result" if result is None else ("error: " if result.is_error else "") + result.content
            lines.append(f"{use.name}: {status}")
        return Decision(text="\n".join(lines))


def ledger_server() -> McpServerSpec:
    """The ledger server as this process's environment configures it."""
    return McpServerSpec(
        name="ledger",
        command=sys.executable,
        args=(
            str(SERVER),
            "--ledger", os.environ.get("CONTINUUM_TEST_LEDGER", "ledger.txt"),
            "--work-ms", os.environ.get("CONTINUUM_TEST_STEP_MS", "0"),
        ),
        allowed_tools=TOOLS,
        call_timeout_s=float(os.environ.get("CONTINUUM_TEST_MCP_TIMEOUT_S", "10")),
    )


class McpClerk(LLMAgent):
    """Does what its tasks ask with the ledger server's tools; reports to `sink`."""

    name = "clerk"
    role = "clerk"
    # A short ack_wait brings a killed process's message back before its replacement is ready
    # (~1.5 s: the SDK's import and the server's start), so no later message overtakes it and
    # lands its turn in the middle of its tool loop. The budget is large: the kill test
    # redelivers a message as often as it kills the agent.
    consumer = ConsumerSettings(
        concurrency=1, prefetch=0, ack_wait_s=0.5,
        retry=RetryPolicy(backoff_s=(0.05,), max_deliver=1000), drain_timeout_s=5.0,
    )

    def __init__(self, model: Any = None, **kwargs: Any) -> None:
        super().__init__(model or OfflineModel([CallPolicy()]), model_name="offline", **kwargs)

    def mcp(self) -> tuple[McpServerSpec, ...]:
        return (ledger_server(),)

    async def respond(self, note: Note, ctx: Context) -> None:
        result = await self.converse(ctx, note.text)
        await ctx.send("sink", Note(text=f"{note.text} => {result.text}"))


class McpFragileClerk(McpClerk):
    """The clerk trying an unavailable server twice before telling the model, with a retry
    budget that would dead-letter a message at its second failed delivery."""

    name = "fragile"
    mcp_attempts = 2
    consumer = ConsumerSettings(
        concurrency=1, prefetch=0, ack_wait_s=2.0,
        retry=RetryPolicy(backoff_s=(0.05,), max_deliver=2), drain_timeout_s=5.0,
    )
