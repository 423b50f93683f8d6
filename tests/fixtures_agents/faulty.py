"""Agents that misbehave on purpose: a poison message, slow work, a blocked event loop."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from agents.runtime import Agent, Context, handler
from bus.config import ConsumerSettings, RetryPolicy
from schemas.payloads import Note, TaskRequested

# Short timers so redeliveries after a crash come within a second.
FAST = ConsumerSettings(
    concurrency=1, prefetch=0, ack_wait_s=1.0, retry=RetryPolicy(backoff_s=(0.1,), max_deliver=3), drain_timeout_s=5.0
)


class Poison(Agent):
    """Kills its own process (SIGKILL) on a Note saying "poison"; forwards every other Note to
    `sink` as "handled:<text>"."""

    name = "poison"
    consumer = FAST

    @handler
    async def on_note(self, note: Note, ctx: Context) -> None:
        if note.text == "poison":
            os.kill(os.getpid(), signal.SIGKILL)
        await ctx.send("sink", Note(text=f"handled:{note.text}"))


class Slow(Agent):
    """Takes `task.input["seconds"]` to handle a task; tells `sink` when it starts and finishes."""

    name = "slow"
    consumer = ConsumerSettings(concurrency=2, prefetch=0, ack_wait_s=5.0, drain_timeout_s=20.0)

    @handler
    async def on_task(self, task: TaskRequested, ctx: Context) -> None:
        await ctx.send("sink", Note(text=f"started:{task.title}"))
        await asyncio.sleep(float(task.input.get("seconds", 1.0)))
        await ctx.send("sink", Note(text=f"finished:{task.title}"))


class Blocker(Agent):
    """Blocks its event loop (a bug) on every task, so it stops sending heartbeats."""

    name = "blocker"
    consumer = FAST

    @handler
    async def on_task(self, task: TaskRequested, ctx: Context) -> None:
        time.sleep(float(task.input.get("seconds", 60.0)))  # deliberately blocking
