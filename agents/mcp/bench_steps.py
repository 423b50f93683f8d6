"""`bus bench` section: what recording an LLM agent's MCP tool call as a step costs.

    mcp_step_overhead_ms   an agent's MCP tool call run as its `tool:` step (the toolbox call
                           with the step id as idempotency key, the ToolOutcome recorded by one
                           durable, fsynced publish) minus the bare call on the same session;
                           target <= 2
    mcp_call_bare_ms       the bare call itself: `echo` over stdio to a local server, the
                           baseline

Medians over `env.repeats` runs of interleaved bare and recorded calls (so drift in the server
or the machine touches both alike).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import TYPE_CHECKING

from agents.mcp.spec import McpServerSpec
from agents.mcp.toolbox import McpToolbox
from agents.memory import ToolOutcome
from agents.runtime import Context
from bus.client import Bus
from bus.config import BusConfig
from schemas import utcnow
from schemas.envelope import Delivery
from schemas.payloads import Note
from schemas.payloads.llm import ToolUseBlock

if TYPE_CHECKING:
    from bus.bench import BenchEnv

ECHO = McpServerSpec(name="bench", command=sys.executable, args=("-m", "agents.mcp.bench_echo_server"))
STEPS_PER_MESSAGE = 200  # well under MAX_STEPS
WARMUP = 20


async def run(env: "BenchEnv") -> dict[str, float]:
    """Measure the recorded MCP step against the bare call, on a fresh server."""
    async with env.server("mcp-steps") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench-mcp")
        async with Bus(config) as bus, McpToolbox([ECHO]) as toolbox:
            samples = [await _figures(bus, toolbox, env.n(500)) for _ in range(env.repeats)]
    return {key: round(statistics.median(s[key] for s in samples), 3) for key in samples[0]}


async def _figures(bus: Bus, toolbox: McpToolbox, count: int) -> dict[str, float]:
    connection = toolbox.connection(ECHO.name)
    if connection is None:
        raise RuntimeError("the bench MCP server is not connected")
    use = ToolUseBlock(id="toolu_bench", name=ECHO.tool_name("echo"), input={"text": "bench"})

    async def recorded_call(ctx: Context) -> ToolOutcome:
        # What LLMAgent._execute does for an MCP tool, inside the step.
        return ToolOutcome(result=await toolbox.call(use, key=ctx.step_id))

    bare: list[float] = []
    recorded: list[float] = []
    ctx = _context(bus)
    for i in range(WARMUP + count):
        if i % STEPS_PER_MESSAGE == 0:
            ctx = _context(bus)
        began = time.perf_counter()
        await connection.call("echo", dict(use.input), key=f"bench-bare-{i}")
        between = time.perf_counter()
        await ctx.step(f"tool:{i}.0:{use.name}", recorded_call, ctx, type=ToolOutcome)
        ended = time.perf_counter()
        if i >= WARMUP:
            bare.append(between - began)
            recorded.append(ended - between)
    bare_ms = statistics.median(bare) * 1e3
    return {
        "mcp_step_overhead_ms": statistics.median(recorded) * 1e3 - bare_ms,
        "mcp_call_bare_ms": bare_ms,
    }


def _context(bus: Bus) -> Context:
    envelope = bus.envelope(Note(text="bench"), to="bench-mcp", sender="bench")
    delivery = Delivery(
        stream="", consumer="bench-mcp__inbox", subject="", stream_seq=0, consumer_seq=0,
        attempt=1, pending=0, published_at=utcnow(),
    )
    return Context(bus=bus, agent="bench-mcp", envelope=envelope, delivery=delivery)


if __name__ == "__main__":  # a quick run: python -m agents.mcp.bench_steps
    import json
    import tempfile
    from pathlib import Path

    from bus.bench import BenchEnv

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run(BenchEnv(workdir=Path(tmp)))), indent=2))
