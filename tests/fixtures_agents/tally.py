"""The failover subject: one step per task that appends to a ledger file outside the bus.

Like the ledger agent (fixtures_agents/ledger.py) but lighter, for runs of many thousands of
messages: one idempotent ledger append per task, recorded as a step, and no outbound message.
Environment: CONTINUUM_TEST_LEDGER (the ledger path).
"""

from __future__ import annotations

import os
from pathlib import Path

from agents.runtime import Agent, Context, handler
from bus.client import Bus
from bus.config import ConsumerSettings, RetryPolicy
from fixtures_agents.ledger import Ledger
from schemas.payloads import TaskRequested


class TallyAgent(Agent):
    """For each task: one step appending `<step id> <envelope id>` to the ledger, once."""

    name = "tally"
    consumer = ConsumerSettings(
        concurrency=16, prefetch=64, ack_wait_s=3.0,
        retry=RetryPolicy(backoff_s=(0.1,), max_deliver=1000), drain_timeout_s=2.0,
    )

    async def on_start(self, bus: Bus) -> None:
        self.ledger = Ledger(Path(os.environ["CONTINUUM_TEST_LEDGER"]))

    @handler
    async def on_task(self, task: TaskRequested, ctx: Context) -> None:
        await ctx.step("tally", self._write, ctx, ctx.envelope.id)

    async def _write(self, ctx: Context, text: str) -> str:
        return self.ledger.append_once(ctx.step_id, text)
