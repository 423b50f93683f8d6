"""`bus bench`: measured figures, each section against a fresh server it starts itself.

A section is a module with `async def run(env: BenchEnv) -> dict[str, float]`; the figures of
every section are merged into one JSON object. Baselines are measured in the same run.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bus.server import ANY_PORT, EmbeddedServer, ServerSettings

SECTIONS = (
    "bus.bench.publish",      # durable_publish_per_s, baseline_publish_async_per_s
    "bus.bench.consume",      # consume_ack_per_s, baseline_fetch_ack_per_s, latency_p50_ms, latency_p99_ms
    "bus.bench.privacy",      # private_record_per_s sealed vs unsealed, private_seal_ratio, open_per_s
    "bus.bench.secured",      # auth_durable_publish_per_s, auth_consume_ack_per_s (authorization + TLS) vs plain, ratios
    "bus.bench.cluster",      # r1/r3 publish and consume rates and ratios, failover_resume_s
    "bus.bench.console",      # console_first_paint_ms, console_live_delay_p99_ms, console_publish/consume_ratio
    "projections.bench",      # fold_per_s, read_per_s, catchup_per_s, rebuild_1m_s, query_p50/p99_ms, lag_p50/p99_ms
    "projections.archive.bench",  # archive_per_s, rebuild_archive_1m_s, query_archive_p50/p99_ms (the log's archive)
    "agents.bench",           # agent_start_ms, agent_restart_ms, agent_rss_mb, step_overhead_us, ...
    "agents.memory.bench",    # context_compile_ms
    "agents.memory.bench_views",  # memory_write_p99_ms, recall_query_p95_ms (views over the bus)
    "agents.mcp.bench",       # mcp_tool_call_p50_ms (a memory search through `bus mcp` over stdio)
    "agents.mcp.bench_steps",  # mcp_step_overhead_ms (an agent's recorded MCP tool call vs the bare call)
)


@dataclass(frozen=True, kw_only=True)
class BenchEnv:
    """What a section gets: a scratch directory, a size scale, and a way to start servers."""

    workdir: Path
    # 1.0 = the sizes the targets are stated for; smaller for a quick smoke run.
    scale: float = 1.0
    repeats: int = 3

    @contextlib.asynccontextmanager
    async def server(self, name: str) -> AsyncIterator[EmbeddedServer]:
        """A fresh nats-server from the repo's nats.conf (fsync on every write)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        store_dir = Path(tempfile.mkdtemp(prefix=f"nats-{name}-", dir=self.workdir))
        settings = ServerSettings(store_dir=store_dir, port=ANY_PORT, monitor_port=ANY_PORT)
        async with EmbeddedServer(settings) as server:
            yield server

    def n(self, count: int) -> int:
        """`count` scaled, at least 100."""
        return max(100, int(count * self.scale))


def percentile(values: list[float], q: float) -> float:
    """The value at quantile `q` (0..1) of `values` (the nearest rank at or below); NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
