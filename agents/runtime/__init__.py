"""The agent runtime: write an agent as a small class, run it as a process.

    from agents.runtime import Agent, Context, handler

    class Greeter(Agent):
        name = "greeter"

        @handler
        async def on_note(self, note: Note, ctx: Context) -> None:
            await ctx.send("archivist", Note(text=note.text.upper()))

`Context` gives a handler `step`, `send`, `broadcast`, `request`, `reply` (all recorded steps, so
a redelivered message does not repeat them) and `state` (fenced load/save).
"""

from agents.runtime.agent import Agent, HandlerTable, handler
from agents.runtime.context import Context, OutboundRef, SendOptions, StepInfo
from agents.runtime.journal import MAX_STEPS
from agents.runtime.loader import load_agent_class
from agents.runtime.runner import AgentRuntime, RuntimeStats
from agents.runtime.state import StateStore, Versioned

__all__ = [
    "MAX_STEPS",
    "Agent",
    "AgentRuntime",
    "Context",
    "HandlerTable",
    "OutboundRef",
    "RuntimeStats",
    "SendOptions",
    "StateStore",
    "StepInfo",
    "Versioned",
    "handler",
    "load_agent_class",
]
