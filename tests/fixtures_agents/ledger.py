"""The exactly-once subject: a handler with several steps, each appending to a ledger file
outside the bus, then a send.

The ledger append is idempotent by key (the step id, stable across attempts): a step whose fn
ran but whose record was not stored before a kill runs again on redelivery, and finds its key
already in the ledger. Every call of the fn is also logged to `<ledger>.attempts`, so a test can
show how often that window was hit.

Environment: CONTINUUM_TEST_LEDGER (the ledger path), CONTINUUM_TEST_STEP_MS (work per step).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from agents.runtime import Agent, Context, handler
from bus.client import Bus
from bus.config import ConsumerSettings, RetryPolicy
from schemas.payloads import TaskCompleted, TaskRequested

STEPS = 3


class Ledger:
    """An append-only file of `<key> <text>` lines with an idempotent append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys = set()
        if path.exists():
            for line in path.read_text().splitlines():
                if line:
                    self.keys.add(line.split(" ", 1)[0])
        # O_APPEND and one write() per line: a kill leaves whole lines only.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._attempts = os.open(f"{path}.attempts", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append_once(self, key: str, text: str) -> str:
        os.write(self._attempts, f"{key} {text}\n".encode())
        if key not in self.keys:
            os.write(self._fd, f"{key} {text}\n".encode())
            self.keys.add(key)
        return key


class LedgerAgent(Agent):
    """For task n: STEPS ledger appends (each a step), then TaskCompleted to `sink`."""

    name = "ledger"
    consumer = ConsumerSettings(
        concurrency=2, prefetch=2, ack_wait_s=1.0,
        retry=RetryPolicy(backoff_s=(0.05,), max_deliver=1000), drain_timeout_s=2.0,
    )

    async def on_start(self, bus: Bus) -> None:
        self.ledger = Ledger(Path(os.environ["CONTINUUM_TEST_LEDGER"]))
        self.step_s = float(os.environ.get("CONTINUUM_TEST_STEP_MS", "2")) / 1000.0

    @handler
    async def on_task(self, task: TaskRequested, ctx: Context) -> None:
        for i in range(STEPS):
            await ctx.step(f"write-{i}", self._write, ctx, f"{ctx.envelope.id}:{i}")
        await ctx.send("sink", TaskCompleted(task_id=ctx.envelope.id, output={"n": task.input.get("n")}))

    async def _write(self, ctx: Context, text: str) -> str:
        await asyncio.sleep(self.step_s)  # the step's work, before its side effect
        return self.ledger.append_once(ctx.step_id, text)
