"""`bus bench` section for agent processes and steps.

    agent_start_ms        launch of a replica process -> its consumers pull (ready to handle);
                          target <= 1,000
    agent_first_reply_ms  launch -> the first request answered by the new process
    agent_restart_ms      SIGKILL of a replica -> its replacement is ready and has answered a
                          request (default backoff 0.1 s included); target <= 2,000
    agent_rss_mb          resident memory of an idle replica after one request; target <= 80
    step_overhead_us      a recorded `ctx.step` minus a plain call of the same function (one
                          durable, fsynced publish per step)
    step_plain_us         the plain call itself, the baseline
    step_replay_load_us   a redelivery's one direct get loading 3 recorded steps

Medians over `env.repeats`. Replicas run under the real Supervisor with the default policy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from typing import TYPE_CHECKING, Any

from agents.runtime import Agent, Context, handler
from bus.client import Bus
from bus.config import BusConfig
from schemas import utcnow
from schemas.envelope import Delivery
from schemas.payloads import Note, Ping, Pong

if TYPE_CHECKING:
    from bus.bench import BenchEnv


class BenchAgent(Agent):
    """Answers pings: the smallest agent, so start time and memory are the runtime's own."""

    name = "bench"

    @handler
    async def on_ping(self, ping: Ping, ctx: Context) -> Pong:
        return Pong(text=ping.text, responder=str(os.getpid()))


async def run(env: "BenchEnv") -> dict[str, float]:
    """Measure agent start, restart, memory and step overhead against a fresh server."""
    async with env.server("agents") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench")
        async with Bus(config) as bus:
            processes = [await _process_figures(bus, config, f"bench{i}") for i in range(env.repeats)]
            steps = [await _step_figures(bus, env.n(2000)) for _ in range(env.repeats)]
    figures: dict[str, float] = {}
    for sample in (processes, steps):
        for key in sample[0]:
            figures[key] = round(statistics.median(s[key] for s in sample), 1)
    return figures


async def _process_figures(bus: Bus, config: BusConfig, name: str) -> dict[str, float]:
    from agents.supervisor import AgentSpec, Supervisor, SupervisorSettings

    spec = AgentSpec(target="agents.bench:BenchAgent", name=name, bus=config)
    supervisor = Supervisor(spec, SupervisorSettings())
    launched = time.monotonic()
    async with supervisor.running():
        status = await supervisor.wait_ready(30)
        await bus.request(name, Ping(text="first"), timeout_s=30)
        first_reply_ms = (time.monotonic() - launched) * 1e3
        pid = status.replicas[0].pid
        assert pid is not None
        rss_mb = _rss_mb(pid)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # A message published while the server has not yet noticed the dead connection can be
        # handed to its last pull request and comes back only after ack_wait; so the new request
        # goes out once the replacement reports ready.
        await supervisor.wait_until(lambda s: s.replicas[0].restarts == 1 and s.replicas[0].state == "running", 30)
        reply = await bus.request(name, Ping(text="after kill"), timeout_s=30)
        restart_ms = (time.monotonic() - killed) * 1e3
        if reply.payload.responder == str(pid):
            raise RuntimeError("the killed replica answered; the restart was not measured")
    return {
        "agent_start_ms": status.replicas[0].start_ms,
        "agent_first_reply_ms": first_reply_ms,
        "agent_restart_ms": restart_ms,
        "agent_rss_mb": rss_mb,
    }


async def _step_figures(bus: Bus, count: int) -> dict[str, float]:
    def work(x: int) -> int:
        return x * 2

    per_message = 500  # well under MAX_STEPS
    plain = _timed(lambda: [work(i) for i in range(count)])
    started = time.perf_counter()
    done = 0
    while done < count:
        ctx = _context(bus, attempt=1)
        for i in range(min(per_message, count - done)):
            await ctx.step("work", work, i)
        done += per_message
    stepped = time.perf_counter() - started

    loads = []
    for _ in range(20):
        first = _context(bus, attempt=1)
        for i in range(3):
            await first.step(f"s{i}", work, i)
        replay = Context(bus=bus, agent="bench-steps", envelope=first.envelope, delivery=_delivery(2))
        began = time.perf_counter()
        await replay.journal.recorded(0)
        loads.append(time.perf_counter() - began)
    return {
        "step_overhead_us": (stepped - plain) / count * 1e6,
        "step_plain_us": plain / count * 1e6,
        "step_replay_load_us": statistics.median(loads) * 1e6,
    }


def _context(bus: Bus, *, attempt: int) -> Context:
    envelope = bus.envelope(Note(text="bench"), to="bench-steps", sender="bench")
    return Context(bus=bus, agent="bench-steps", envelope=envelope, delivery=_delivery(attempt))


def _delivery(attempt: int) -> Delivery:
    return Delivery(
        stream="", consumer="bench-steps__inbox", subject="", stream_seq=0, consumer_seq=0,
        attempt=attempt, pending=0, published_at=utcnow(),
    )


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


if __name__ == "__main__":  # a quick run: python -m agents.bench
    import json
    import tempfile
    from pathlib import Path

    from bus.bench import BenchEnv

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run(BenchEnv(workdir=Path(tmp)))), indent=2))
