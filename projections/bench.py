"""`bus bench` projections section: folding, rebuilding, querying, and read-your-writes lag.

    fold_per_s       events/s the runner applies (decode thread + DuckDB writer thread, all
                     built-in views, checkpoint per batch) over a log already read into memory
    read_per_s       events/s the log reader alone delivers from the server (for comparison)
    catchup_per_s    events/s of a cold start of `bus projections run` (its own process): read
                     from the server and fold, end to end
    rebuild_1m_s     seconds to rebuild every view from seq 1 (read + fold + swap) while the
                     service runs and serves, scaled to a 1,000,000-event log
    query_p50_ms     point lookup on `messages` by id over the bus (request/reply), with the
    query_p99_ms     whole log folded
    lag_p50_ms       publish ack -> the message visible in `messages` to a `min_seq` query, while
    lag_p99_ms       events are published at a steady rate (target 5,000/s; `lag_rate_per_s` says
                     what was reached). The query waits for the lane folding `messages` only.
                     Every 250th publish is followed this way (20 queries/s, 400 samples over
                     20 s): a query costs the service a few milliseconds of CPU, so following
                     every 25th (200/s, as this benchmark first did) measured the queue of
                     queries on two cores, not the lag.

    fold_publish_ratio   `fold_per_s` / `durable_publish_per_s` of a fresh server of the same
                     config in the same run (target >= 1.2: the fold has room to spare over the
                     fastest the bus takes writes)
    live_publish_per_s   durable publishing (as the publish section does it) with the service
                     running and folding it as it comes, `live_drain_s` the seconds from the last
                     ack until a query over a view of every lane answers at that sequence, and
                     `live_fold_per_s` = events / (publishing + draining): what the live fold
                     sustained beside the publisher on the same two cores

The service runs as its own process, as `bus up` starts it; the benchmark is its client.

Setup (not measured): a synthetic log of `env.n(1_000_000)` events appended with atomic
batches. Medians over `env.repeats` where a figure is repeated.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from bus.bench import percentile
from bus.bench.processes import bus_process
from bus.bench.publish import durable_rate
from bus.client import Bus
from bus.config import BusConfig
from bus.errors import BusUnavailable, QueryError
from bus.log_reader import LogReader, LogRecord
from projections.config import ProjectionSettings, tuned_gc
from projections.metrics import ProjectionMetrics
from projections.progress import Watermark
from projections.rebuild import request_rebuild
from projections.runner import Runner, Writer
from projections.store import Store
from projections.workload import append_batches, synthetic_log
from schemas.payloads import Note

if TYPE_CHECKING:
    from bus.bench import BenchEnv

_FULL_LOG = 1_000_000
_LAG_RATE = 5_000
_LAG_SAMPLE_EVERY = 250
_LIVE_PUBLISHES = 100_000


class _Replay:
    """A log already in memory, served the way a LogReader serves it."""

    restarts = 0

    def __init__(self, records: list[LogRecord]) -> None:
        self._records = records
        self._at = 0

    @property
    def head_seq(self) -> int:
        return self._records[-1].seq

    async def read(self, max_records: int) -> list[LogRecord]:
        if self._at >= len(self._records):
            await asyncio.Event().wait()  # the end of this log: nothing more will come
        chunk = self._records[self._at:self._at + max_records]
        self._at += len(chunk)
        await asyncio.sleep(0)
        return chunk


async def _read_all(bus: Bus, last: int) -> tuple[list[LogRecord], float]:
    records: list[LogRecord] = []
    started = time.perf_counter()
    async with LogReader(bus, start_seq=1) as reader:
        while not records or records[-1].seq < last:
            records += await reader.read(20_000)
    return records, len(records) / (time.perf_counter() - started)


async def _fold_rate(bus: Bus, env: BenchEnv, records: list[LogRecord], run: int) -> float:
    settings = ProjectionSettings(db_path=str(env.workdir / f"fold-{run}.duckdb"))
    store = Store(settings.db_path, stream=bus.subjects.stream, lanes=settings.lanes, threads=settings.threads)
    writer = Writer(store)
    try:
        await writer.call(store.open)
        runner = Runner(bus, writer, settings, ProjectionMetrics(CollectorRegistry()), Watermark())
        try:
            started = time.perf_counter()
            await runner.fold_from(_Replay(records), records[-1].seq)
            return len(records) / (time.perf_counter() - started)
        finally:
            runner.close()
            await writer.call(store.close)
    finally:
        writer.close()


async def _query_latencies(bus: Bus, ids: list[str]) -> list[float]:
    latencies = []
    for envelope_id in ids:
        started = time.perf_counter()
        result = await bus.query("SELECT * FROM messages WHERE id = ?", [envelope_id])
        latencies.append(time.perf_counter() - started)
        assert len(result.rows) == 1
    return latencies


async def _lag(bus: Bus, seconds: float) -> tuple[list[float], float]:
    """Publish at `_LAG_RATE`/s for `seconds`; every `_LAG_SAMPLE_EVERY`th publish measures ack ->
    answered by a min_seq query. Returns the samples and the rate reached."""
    samples: list[float] = []
    in_flight = asyncio.Semaphore(2_000)
    payload = Note(text="steady traffic", data={"n": 1})

    async def one(index: int) -> None:
        try:
            sent = await bus.send("lagbench", payload)
            if index % _LAG_SAMPLE_EVERY == 0:
                acked = time.perf_counter()
                seen = await bus.query(
                    "SELECT status FROM messages WHERE id = ?", [sent.envelope.id], min_seq=sent.ack.seq, timeout_s=10
                )
                samples.append(time.perf_counter() - acked)
                if not seen.rows:
                    raise RuntimeError(f"message at seq {sent.ack.seq} not visible at its own min_seq")
        finally:
            in_flight.release()

    total = int(_LAG_RATE * seconds)
    tick = 0.01
    per_tick = int(_LAG_RATE * tick)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.TaskGroup() as tasks:
        for index in range(total):
            if index % per_tick == 0:
                # Pace the publishes: wait for this tick's slot in the schedule.
                delay = started + (index // per_tick) * tick - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await in_flight.acquire()
            tasks.create_task(one(index))
    return samples, total / (loop.time() - started)


def _service_process(bus: Bus, home: Path) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """`bus projections run` in its own process, as `bus up` starts it (so the publishers and
    clients of the benchmark do not share its event loop)."""
    return bus_process(
        home / "projections.log", "projections", "run", "--url", bus.config.url,
        "--namespace", bus.subjects.ns, "--home", str(home), grace_s=60,
    )


async def _answering(bus: Bus, min_seq: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await bus.query("SELECT 1", min_seq=min_seq, timeout_s=30)
            return
        except BusUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # the service is still starting: ask again shortly
        except QueryError as exc:
            if exc.kind != "lag" or time.monotonic() > deadline:
                raise


async def run(env: BenchEnv) -> dict[str, float]:
    """The projections figures (see the module docstring)."""
    count = env.n(_FULL_LOG)
    publish_rates = await _publish_baseline(env)
    async with env.server("projections") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench")
        async with Bus(config) as bus:
            last = await append_batches(bus, list(synthetic_log(bus, count, seed=1)))

            reads, folds = [], []
            records: list[LogRecord] = []
            for run_index in range(env.repeats):
                records, read_rate = await _read_all(bus, last)
                reads.append(read_rate)
                with tuned_gc():
                    folds.append(await _fold_rate(bus, env, records, run_index))
            del records

            async with _service_process(bus, env.workdir / "service"):
                started = time.perf_counter()
                await _answering(bus, last, timeout_s=3600)
                catchup = count / (time.perf_counter() - started)

                rebuilds = []
                for _ in range(env.repeats):
                    report = await request_rebuild(bus, (), timeout_s=3600)
                    rebuilds.append(report.seconds)

                sample = await bus.query("SELECT id FROM messages USING SAMPLE reservoir(400 ROWS) REPEATABLE (7)")
                ids = [row[0] for row in sample.rows]
                random.Random(7).shuffle(ids)
                await _query_latencies(bus, ids[:20])  # warm the connections
                latencies = await _query_latencies(bus, ids)

                lag, lag_rate = await _lag(bus, seconds=max(2.0, 20.0 * min(1.0, env.scale)))
                live_publish, live_drain, live_fold = await _live_fold(bus, env.n(_LIVE_PUBLISHES))

    return {
        "fold_per_s": round(statistics.median(folds)),
        "read_per_s": round(statistics.median(reads)),
        "catchup_per_s": round(catchup),
        "rebuild_1m_s": round(statistics.median(rebuilds) * _FULL_LOG / count, 2),
        "query_p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "query_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "lag_p50_ms": round(percentile(lag, 0.50) * 1000, 2),
        "lag_p99_ms": round(percentile(lag, 0.99) * 1000, 2),
        "lag_rate_per_s": round(lag_rate),
        "fold_publish_baseline_per_s": round(statistics.median(publish_rates)),
        "fold_publish_ratio": round(statistics.median(folds) / statistics.median(publish_rates), 2),
        "live_publish_per_s": round(live_publish),
        "live_drain_s": round(live_drain, 2),
        "live_fold_per_s": round(live_fold),
    }


async def _publish_baseline(env: BenchEnv) -> list[float]:
    """Durable publishing rates on a fresh server of the same config, as the publish section
    measures them (a warm-up, then `env.repeats` runs)."""
    async with env.server("projections-publish") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench")
        async with Bus(config, metrics_registry=CollectorRegistry()) as bus:
            await durable_rate(bus, min(env.n(5_000), 5_000))
            return [await durable_rate(bus, env.n(_LIVE_PUBLISHES)) for _ in range(env.repeats)]


async def _live_fold(bus: Bus, count: int) -> tuple[float, float, float]:
    """Publish `count` messages as fast as durable publishing goes while the service folds them;
    returns (publish rate, seconds from the last ack until every lane has folded it, the rate
    the fold sustained over publishing and draining)."""
    started = time.perf_counter()
    rate = await durable_rate(bus, count, to="sink")
    acked = time.perf_counter()
    # A Bus's query waits for the highest sequence it wrote; these views sit in three of the four lanes.
    await bus.query(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM agents), (SELECT count(*) FROM facts)",
        timeout_s=600,
    )
    drained = time.perf_counter()
    return rate, drained - acked, count / (drained - started)
