"""`bus bench` archive section: sealing the log, rebuilding from the archive, querying it.

    archive_per_s          events/s `archive run` seals end to end: the log read (bus.log_reader),
                           decoded into the fold's columns, written to zstd Parquet, fsynced, read
                           back and verified (hashes), and announced
    archive_write_per_s    the same without reading the log (records already in memory): decode,
                           write, sync, verify
    archive_cpu_us_per_event         CPU time per event sealed by `archive run`: this process
    archive_server_cpu_us_per_event  (read, decode, write, verify, announce: every thread) and
                           the nats-server (serving the read). Rates swing with the machine's load;
                           these do far less, and two cores divided by their sum is the most
                           `archive_per_s` could be on this machine with the cores free
    archive_write_cpu_us_per_event   this process's CPU per event of `archive_write_per_s`
    rebuild_archive_1m_s   seconds to rebuild every view (`bus projections rebuild`, while the
                           service serves) from an archive of the whole log plus a live tail of 1%
                           read from the log, scaled to 1,000,000 archived events
    rebuild_log_1m_s       the same-run baseline: the same rebuild by a service with no archive
                           (every event read from the log and decoded), once
    query_archive_p50_ms   a point lookup by id in `archive_events` (the archive's Parquet files)
    query_archive_p99_ms   over the bus, 1,000,000 archived events
    archive_copy_cpu_ms_per_mb  CPU time of the archiving process per MB of segment files copied to
                           the object store (`archive run --object-store`'s copy step: each file
                           put in 128 KiB chunks, read back, digest checked, event recorded); the
                           server's own CPU is not counted. CPU, not wall time: on a loaded machine
                           it is the figure that holds still
    archive_copy_mb_per_s  the same copy step's wall rate, MB/s (fsync per chunk; noisy under load)
    trim_1m_s              seconds `archive trim` takes to purge the archived log by the default
                           policy (every segment still in the log verified wholly, the classes
                           bounded, the event recorded, the purges), scaled to 1,000,000 events

Setup (not measured): a synthetic log of `env.n(1_000_000)` events appended with atomic batches.
The projection services run as their own processes, as `bus up` starts them. Medians over
`env.repeats` where a figure is repeated.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bus.bench import percentile
from bus.client import Bus
from bus.config import BusConfig
from bus.log_reader import LogRecord
from projections.archive.archiver import Sealer, run_archive
from projections.archive.config import ArchiveSettings
from projections.archive.copies import copy_segments
from projections.archive.retention import DEFAULT_RETENTION, TrimSettings
from projections.archive.trim import run_trim
from projections.archive.segment import SegmentMeta
from projections.bench import _answering, _read_all, _service_process
from projections.config import quick_gil_handoff, tuned_gc
from projections.rebuild import request_rebuild
from projections.workload import append_batches, synthetic_log

if TYPE_CHECKING:
    from bus.bench import BenchEnv

_FULL_LOG = 1_000_000
_TAIL = 0.01
_LOOKUPS = 200
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _server_cpu_s(pid: int | None) -> float:
    """The CPU seconds (user + system) process `pid` has used: /proc/<pid>/stat's utime and
    stime. Raises RuntimeError without a pid or /proc."""
    if pid is None:
        raise RuntimeError("the bench's nats-server has no pid")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError as exc:
        raise RuntimeError(f"cannot read the nats-server's CPU time: {exc}") from exc
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


async def _write_rate(settings: ArchiveSettings, stream: str, records: list[LogRecord]) -> tuple[float, float]:
    """Events/s sealing `records` already in memory (decode, write, fsync, verify), in the
    archive's two stages, and this process's CPU µs per event meanwhile."""
    async def sealed(meta: SegmentMeta, file_bytes: int) -> None:
        pass

    started, cpu = time.perf_counter(), time.process_time()
    size = settings.segment_records
    async with Sealer(settings, stream, None, sealed) as sealer:
        for at in range(0, len(records), size):
            await sealer.seal(records[at:at + size])
        await sealer.finish()
    return len(records) / (time.perf_counter() - started), (time.process_time() - cpu) / len(records) * 1e6


async def _lookups(bus: Bus, ids: list[str]) -> list[float]:
    latencies = []
    for envelope_id in ids:
        started = time.perf_counter()
        result = await bus.query("SELECT seq, data FROM archive_events WHERE id = ?", [envelope_id])
        latencies.append(time.perf_counter() - started)
        if len(result.rows) != 1:
            raise RuntimeError(f"archive_events holds {len(result.rows)} rows of id {envelope_id}")
    return latencies


async def run(env: BenchEnv) -> dict[str, float]:
    """The archive figures (see the module docstring)."""
    count = env.n(_FULL_LOG)
    async with env.server("archive") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench")
        async with Bus(config) as bus:
            last = await append_batches(bus, list(synthetic_log(bus, count, seed=1)))
            stream = bus.subjects.stream
            home = env.workdir / "service"
            archive = ArchiveSettings.for_home(home, bus.subjects.ns, seal_partial=True)

            archives, writes, cpus, server_cpus, write_cpus = [], [], [], [], []
            for index in range(env.repeats):
                scratch = ArchiveSettings(directory=env.workdir / f"scratch-{index}", seal_partial=True)
                cpu, server_cpu = time.process_time(), _server_cpu_s(server.pid)
                with tuned_gc(), quick_gil_handoff():  # as `bus archive run` runs
                    run = await run_archive(bus, scratch)
                cpus.append((time.process_time() - cpu) / run.records * 1e6)
                server_cpus.append((_server_cpu_s(server.pid) - server_cpu) / run.records * 1e6)
                archives.append(run.records / run.seconds)
                shutil.rmtree(scratch.directory)
            records, _ = await _read_all(bus, last)
            for index in range(env.repeats):
                scratch = ArchiveSettings(directory=env.workdir / f"write-{index}")
                with tuned_gc(), quick_gil_handoff():  # as `bus archive run` runs
                    rate, cpu_us = await _write_rate(scratch, stream, records[:count])
                writes.append(rate)
                write_cpus.append(cpu_us)
                shutil.rmtree(scratch.directory)
            del records

            sealed = await run_archive(bus, archive)  # the archive the service rebuilds from
            copy_cpu_ms_per_mb, copy_mb_per_s = await _copy_cost(bus, archive)
            tail = max(1, int(count * _TAIL))
            end = await append_batches(bus, list(synthetic_log(bus, tail, seed=2, first_seq=await bus.last_seq() + 1)))

            async with _service_process(bus, home):
                await _answering(bus, end, timeout_s=3600)
                rebuilds = []
                for _ in range(env.repeats):
                    report = await request_rebuild(bus, (), timeout_s=3600)
                    if report.archived < sealed.records:
                        raise RuntimeError(f"the rebuild folded {report.archived} events from the archive, "
                                           f"{sealed.records} are archived")
                    rebuilds.append(report.seconds)
                sample = await bus.query("SELECT id FROM (SELECT id FROM events WHERE seq <= ? AND id IS NOT NULL) "
                                         "USING SAMPLE reservoir(400 ROWS) REPEATABLE (7)", [sealed.last_seq])
                ids = [row[0] for row in sample.rows]
                random.Random(7).shuffle(ids)
                await _lookups(bus, ids[:20])  # warm the connections and the footer cache
                latencies = await _lookups(bus, ids[:_LOOKUPS])

            baseline_home = env.workdir / "service-log-only"
            async with _service_process(bus, baseline_home):
                await _answering(bus, end, timeout_s=3600)
                baseline = await request_rebuild(bus, (), timeout_s=3600)

            policy = dataclasses.replace(DEFAULT_RETENTION, min_age_s=0)
            started = time.perf_counter()
            trimmed = await run_trim(bus, archive, TrimSettings(policy=policy, by="bench", reason="bench", views_wait_s=0))
            trim_s = time.perf_counter() - started
            if trimmed.purged < sealed.records // 2:
                raise RuntimeError(f"the trim purged {trimmed.purged} of {sealed.records} archived events")

    return {
        "archive_per_s": round(statistics.median(archives)),
        "archive_write_per_s": round(statistics.median(writes)),
        "archive_cpu_us_per_event": round(statistics.median(cpus), 2),
        "archive_server_cpu_us_per_event": round(statistics.median(server_cpus), 2),
        "archive_write_cpu_us_per_event": round(statistics.median(write_cpus), 2),
        "rebuild_archive_1m_s": round(statistics.median(rebuilds) * _FULL_LOG / count, 2),
        "rebuild_log_1m_s": round(baseline.seconds * _FULL_LOG / count, 2),
        "query_archive_p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "query_archive_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "trim_1m_s": round(trim_s * _FULL_LOG / count, 2),
        "archive_copy_cpu_ms_per_mb": copy_cpu_ms_per_mb,
        "archive_copy_mb_per_s": copy_mb_per_s,
    }


async def _copy_cost(bus: Bus, archive: ArchiveSettings) -> tuple[float, float]:
    """(CPU ms per MB, wall MB/s) of copying every segment of `archive` to the object store, as
    `archive run` does right after sealing them (no second local verification)."""
    names = {p.name for p in archive.directory.glob("seg-*.parquet")}
    size_mb = sum(p.stat().st_size for p in archive.directory.glob("seg-*.parquet")) / 1e6
    cpu, wall = time.process_time(), time.perf_counter()
    copied = await copy_segments(bus, dataclasses.replace(archive, object_store=True), fresh=names)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if len(copied) != len(names):
        raise RuntimeError(f"copied {len(copied)} of {len(names)} segments")
    return round(cpu * 1000 / size_mb, 2), round(size_mb / wall, 1)
