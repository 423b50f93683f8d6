"""`bus bench` publish section: durable publishing through the bus vs plain nats-py.

    durable_publish_per_s         typed envelopes (Bus.envelope + codec, ~250-byte payload) sent
                                  through `Bus.publish` from many concurrent tasks, every one
                                  acked (group commit into atomic batches)
    baseline_publish_async_per_s  nats-py `js.publish_async` of the same bytes with the same
                                  `Nats-Msg-Id` header, same server config (fsync always)
    durable_publish_mean_batch    messages per commit during the durable runs

Both run against one fresh server from the repo's nats.conf, in the same run; figures are
medians over `env.repeats`.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import nats
from prometheus_client import CollectorRegistry

from bus.bench import BenchEnv
from bus.client import Bus
from bus.config import BusConfig
from schemas.payloads import Note

# Two full batches of callers: one batch commits while the next is staged at the server and a
# third forms from the callers just answered. More callers only add garbage-collector work
# (measured here: 1000 callers ~29k/s, 2000 ~45k/s, 3000-4000 ~31-34k/s, medians of 6).
_TASKS = 2000
_PAYLOAD_TEXT = "a durable event on its way into the log; " * 6  # ~250 bytes of payload JSON


def _payload() -> Note:
    return Note(text=_PAYLOAD_TEXT[:230], data={"step": 1})


async def durable_rate(bus: Bus, count: int, *, to: str = "bench") -> float:
    """Envelopes to `to` built, encoded and published by `_TASKS` concurrent tasks; returns msgs/s."""
    tasks = min(_TASKS, count)
    per_task, extra = divmod(count, tasks)
    payload = _payload()

    async def sender(n: int) -> None:
        for _ in range(n):
            await bus.publish(bus.envelope(payload, to=to))

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for i in range(tasks):
            group.create_task(sender(per_task + (1 if i < extra else 0)))
    return count / (time.perf_counter() - started)


async def _baseline(bus: Bus, url: str, count: int) -> float:
    """The same bytes through nats-py's own pipelined publish (`js.publish_async`)."""
    envelopes = [bus.envelope(_payload(), to="bench") for _ in range(count)]
    encoded = [(e.id, bus.codec.encode(e)) for e in envelopes]
    subject = bus.subject_for(envelopes[0])
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        started = time.perf_counter()
        futures = [
            await js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id}) for msg_id, data in encoded
        ]
        await js.publish_async_completed()
        elapsed = time.perf_counter() - started
        failed = [f for f in futures if f.exception() is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} baseline publishes failed: {failed[0].exception()!r}")
        return count / elapsed
    finally:
        await nc.close()


async def run(env: BenchEnv) -> dict[str, float]:
    """Durable group-commit publishing vs `publish_async`, on one fsync-always server."""
    durable: list[float] = []
    baseline: list[float] = []
    batches: list[float] = []
    async with env.server("publish") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench")
        async with Bus(config, metrics_registry=CollectorRegistry()) as bus:
            await durable_rate(bus, min(env.n(5_000), 5_000))  # warm-up: connection, stream, caches
            for _ in range(env.repeats):
                before = _batch_totals(bus)
                durable.append(await durable_rate(bus, env.n(100_000)))
                after = _batch_totals(bus)
                batches.append((after[0] - before[0]) / max(1.0, after[1] - before[1]))
                baseline.append(await _baseline(bus, server.url, env.n(10_000)))
    return {
        "durable_publish_per_s": statistics.median(durable),
        "baseline_publish_async_per_s": statistics.median(baseline),
        "durable_publish_mean_batch": statistics.median(batches),
    }


def _batch_totals(bus: Bus) -> tuple[float, float]:
    """(messages, commits) so far, from the publish_batch_size histogram."""
    total = count = 0.0
    for metric in bus.metrics.publish_batch_size.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count
