"""`bus bench` section: a memory search through `bus mcp`, as an MCP client makes it.

Set-up: the memory-views section's log (`env.n(1_000_000)` memory events: 90% conversation
turns of 40 agents, 10% archival facts; agents/memory/bench_views.py builds it), the projection
service in its own process, and `bus mcp` started by the official SDK's stdio client, as Claude
Code or Claude Desktop starts it. Every call goes client -> stdio -> `bus mcp` -> the query
service over the bus -> back.

Figures (median over `env.repeats` rounds):
    mcp_tool_call_p50_ms / mcp_tool_call_p95_ms
        `search_memory` for facts on one subject matching a word, 10 rows (the question a client
        asks most: "what do we know about X"); target p50 <= 20 ms
    mcp_direct_query_p50_ms
        the same SQL through `Bus.query`, interleaved: the floor, so the MCP share is visible
    mcp_search_all_kinds_p50_ms
        `search_memory` over facts, recall and blocks at once, for a word (no subject)
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult

from agents.mcp.memory_queries import SearchSpec, facts_statement
from agents.memory.bench_views import (
    DOMAIN_WORDS,
    LOG_EVENTS,
    QUERY_WORDS,
    fill_memory_log,
    percentile,
    projection_service,
    timed_ms,
    wait_applied,
)
from bus import Bus, BusConfig

if TYPE_CHECKING:
    from bus.bench import BenchEnv

CALLS_PER_ROUND = 100
ALL_KINDS_CALLS = 20
async def run(env: BenchEnv) -> dict[str, float]:
    """Measure and return the figures in the module docstring."""
    events = env.n(LOG_EVENTS)
    async with env.server("mcp") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench")
        async with Bus(config) as bus:
            last = await fill_memory_log(bus, events)
            home = env.workdir / f"mcp-{server.settings.port}"
            async with projection_service(server.url, home):
                await wait_applied(bus, last, timeout_s=900.0)
                async with mcp_client(config, home) as session:
                    rounds = [await _round(session, bus, index) for index in range(max(1, env.repeats))]
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}


@asynccontextmanager
async def mcp_client(config: BusConfig, home: Path) -> AsyncIterator[ClientSession]:
    """`bus mcp` against `config`'s server, started over stdio by the SDK's client; its
    stderr goes to `home`/mcp.stderr."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "bus.cli.main", "mcp", "--url", config.url, "--name", "bench-mcp", "--home", str(home)],
        env={"BUS_MONITOR_URL": config.monitor_url or "", "PYTHONPATH": os.getcwd()},
        cwd=str(home),
    )
    with (home / "mcp.stderr").open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await asyncio.wait_for(session.initialize(), 60)
            yield session


async def _round(session: ClientSession, bus: Bus, index: int) -> dict[str, float]:
    rng = random.Random(index)
    via_mcp: list[float] = []
    direct: list[float] = []
    for _ in range(CALLS_PER_ROUND):
        word, subject = rng.choice(QUERY_WORDS), f"{rng.choice(DOMAIN_WORDS)}:{rng.choice(DOMAIN_WORDS)}"
        args = {"text": word, "kinds": ["facts"], "subject": subject, "limit": 10}
        via_mcp.append(await timed_ms(_tool(session, "search_memory", args)))
        sql, params = facts_statement(SearchSpec(text=word, kinds=("facts",), subject=subject, limit=10))
        direct.append(await timed_ms(bus.query(sql, [*params, 11], max_rows=11)))
    all_kinds = [
        await timed_ms(_tool(session, "search_memory", {"text": rng.choice(QUERY_WORDS), "limit": 10}))
        for _ in range(ALL_KINDS_CALLS)
    ]
    return {
        "mcp_tool_call_p50_ms": _pct(via_mcp, 50), "mcp_tool_call_p95_ms": _pct(via_mcp, 95),
        "mcp_direct_query_p50_ms": _pct(direct, 50), "mcp_search_all_kinds_p50_ms": _pct(all_kinds, 50),
    }


async def _tool(session: ClientSession, name: str, arguments: dict[str, Any]) -> None:
    result = await session.call_tool(name, arguments)
    if not isinstance(result, CallToolResult) or result.is_error:
        raise RuntimeError(f"{name} failed in the bench: {getattr(result, 'content', result)}")


def _pct(samples: list[float], p: int) -> float:
    return round(percentile(samples, p), 2)
