"""An agent whose own state is a counter, updated with fenced writes (replicas may compete)."""

from __future__ import annotations

from agents.runtime import Agent, Context, handler
from bus.config import ConsumerSettings
from schemas.payloads import Note


class Counter(Agent):
    """Adds one to its state for every Note."""

    name = "counter"
    consumer = ConsumerSettings(concurrency=4, prefetch=4, ack_wait_s=5.0)

    @handler
    async def on_note(self, note: Note, ctx: Context) -> None:
        await ctx.state.update(lambda n: n + 1, type=int, default=0, max_attempts=64)
