"""`bus bench` section: the consumer engine's throughput and latency, against nats-py's fetch().

    consume_ack_per_s         N envelopes pre-published to one agent's inbox, then delivered by a
                              ConsumerEngine (default ConsumerSettings) to a no-op handler and
                              acked, delivery reports included; timed from entering the engine
                              until the server shows every message acked
    baseline_fetch_ack_per_s  the same N messages through nats-py pull_subscribe + fetch(1000) +
                              ack(), timed the same way
    consume_cpu_us_per_msg    this process's CPU time (user + system) per message during the
                              engine run (the server's share not included)
    baseline_fetch_cpu_us_per_msg  the same, during the fetch run
    latency_p50_ms/_p99_ms    publish call -> handler start, at a steady 1,000 msg/s for a few
                              seconds (after a short warm-up), one process, monotonic clock

Targets: consume_ack_per_s >= 40,000 and latency_p99_ms <= 5. Every figure is the median over
`env.repeats`; the baseline runs against the same server in the same run.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable
from typing import Any

from nats.js import api as js_api
from nats.js.errors import NotFoundError

from bus.bench import BenchEnv, percentile
from bus.client import Bus
from bus.config import BusConfig
from schemas import Delivery, Envelope
from schemas.payloads import Note

AGENT = "bench"
_AGENT = AGENT
_LATENCY_AGENT = "latency"
_RATE_PER_S = 1000
_WARMUP = 200


async def run(env: BenchEnv) -> dict[str, float]:
    """Measure the section's figures on a fresh server; medians over `env.repeats`."""
    count = env.n(100_000)
    figures: dict[str, list[float]] = {
        "consume_ack_per_s": [], "baseline_fetch_ack_per_s": [], "latency_p50_ms": [], "latency_p99_ms": [],
        "consume_cpu_us_per_msg": [], "baseline_fetch_cpu_us_per_msg": [],
    }
    async with env.server("consume") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bencher")
        async with Bus(config) as bus:
            await prepublish(bus, count)
            for repeat in range(env.repeats):
                rate, cpu_s = await _with_cpu(engine_rate(bus, count))
                figures["consume_ack_per_s"].append(rate)
                figures["consume_cpu_us_per_msg"].append(cpu_s / count * 1e6)
                rate, cpu_s = await _with_cpu(_fetch_rate(bus, count))
                figures["baseline_fetch_ack_per_s"].append(rate)
                figures["baseline_fetch_cpu_us_per_msg"].append(cpu_s / count * 1e6)
                p50, p99 = await _latency(bus, env.n(3000), agent=f"{_LATENCY_AGENT}{repeat}")
                figures["latency_p50_ms"].append(p50)
                figures["latency_p99_ms"].append(p99)
    return {name: round(statistics.median(values), 3) for name, values in figures.items()}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _with_cpu(run: Awaitable[float]) -> tuple[float, float]:
    """(what `run` returns, this process's CPU seconds while it ran)."""
    started = _cpu_s()
    result = await run
    return result, _cpu_s() - started


async def prepublish(bus: Bus, count: int) -> None:
    note = Note(text="x" * 64)
    for start in range(0, count, 1000):
        await asyncio.gather(*(bus.send(_AGENT, note) for _ in range(min(1000, count - start))))


async def _delete_consumer(bus: Bus, name: str) -> None:
    try:
        await bus.js.delete_consumer(bus.subjects.stream, name)
    except NotFoundError:
        pass


async def _all_acked(bus: Bus, consumer: str, count: int) -> bool:
    info = await bus.js.consumer_info(bus.subjects.stream, consumer)
    return info.delivered.consumer_seq >= count and info.num_ack_pending == 0 and info.num_pending == 0


async def engine_rate(bus: Bus, count: int, *, admin: Bus | None = None) -> float:
    """`count` envelopes consumed and acked by `bus`'s consumer engine, from a fresh consumer
    (`admin` makes it when `bus` is an agent that may not); returns msgs/s."""
    consumer = bus.subjects.inbox_consumer(_AGENT)
    await _delete_consumer(admin or bus, consumer)  # a fresh deliver-all consumer replays all `count`
    if admin is not None:
        await admin.prepare_agent(_AGENT)
    handled = 0
    done = asyncio.Event()

    async def noop(envelope: Envelope[Any], delivery: Delivery) -> None:
        nonlocal handled
        handled += 1
        if handled >= count:
            done.set()

    started = time.perf_counter()
    async with bus.consumer(_AGENT, noop):
        await done.wait()
        while not await _all_acked(bus, consumer, count):
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - started
    return count / elapsed


async def _fetch_rate(bus: Bus, count: int) -> float:
    durable = "bench_fetch_baseline"
    await _delete_consumer(bus, durable)
    sub = await bus.js.pull_subscribe(
        bus.subjects.inbox_filter(_AGENT),
        durable=durable,
        stream=bus.subjects.stream,
        config=js_api.ConsumerConfig(ack_wait=60, max_ack_pending=20_000),
    )
    try:
        started = time.perf_counter()
        acked = 0
        while acked < count:
            for msg in await sub.fetch(batch=1000, timeout=5):
                await msg.ack()
                acked += 1
        while not await _all_acked(bus, durable, count):
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - started
    finally:
        await sub.unsubscribe()
        await _delete_consumer(bus, durable)
    return count / elapsed


async def _latency(bus: Bus, count: int, *, agent: str) -> tuple[float, float]:
    """Publish `_WARMUP + count` envelopes to `agent` (a fresh name, so no earlier backlog is
    replayed) at a steady rate; return (p50, p99) of publish call -> handler start, in ms."""
    total = _WARMUP + count
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    async def record(envelope: Envelope[Any], delivery: Delivery) -> None:
        latencies.append(time.perf_counter() - sent_at[envelope.id])
        if len(latencies) >= total:
            done.set()

    async def publish(envelope: Envelope[Any]) -> None:
        sent_at[envelope.id] = time.perf_counter()
        await bus.publish(envelope)

    async with bus.consumer(agent, record):
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i in range(total):
                delay = start + i / _RATE_PER_S - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tg.create_task(publish(bus.envelope(Note(text=str(i)), to=agent)))
        await asyncio.wait_for(done.wait(), timeout=30)
    measured = sorted(latencies[_WARMUP:])
    p50 = statistics.median(measured)
    p99 = percentile(measured, 0.99)
    return p50 * 1000.0, p99 * 1000.0
