"""`bus archive run|list|verify`: the log's archive of sealed Parquet segments.

    bus archive run [--all] [--segment-records N] [--dir PATH]   seal the log after the last segment
    bus archive list [--format text|json] [--dir PATH]          the segments, from their metadata
    bus archive verify [--dir PATH]                             read and check every segment and the chain

`list` and `verify` read the files only (no server needed). `verify` exits 1 at the first
broken segment, with one line saying which and what; nothing is changed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from bus.cli.common import (
    CliError,
    add_connection_options,
    open_bus,
    out,
    positive_float,
    positive_int,
    write_out,
)
from bus.subjects import Subjects
from projections.archive.archiver import ArchiveRun, keep_archiving, run_archive
from projections.archive.config import DEFAULT_SEGMENT_RECORDS, ArchivePolicy, ArchiveSettings
from projections.archive.segment import SegmentMeta
from projections.archive.verify import Segment, chain_of, verify_all
from projections.errors import ArchiveCorrupt, ArchiveError


def register(subparsers: Any) -> None:
    """Add `archive` (run, list, verify) to the `bus` command."""
    archive = subparsers.add_parser(
        "archive", help="the log's archive of sealed Parquet segments (run | list | verify)",
        description="Seal ranges of the log into verified, hash-chained Parquet segments under "
                    "<home>/archive/<namespace>/, and show or check them.",
    )
    sub = archive.add_subparsers(dest="archive_command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="seal the log after the last segment, a segment at a time")
    _common(run)
    run.add_argument("--all", action="store_true",
                     help="also seal the records after the last full segment (default: full segments only)")
    run.add_argument("--segment-records", type=positive_int, default=DEFAULT_SEGMENT_RECORDS, metavar="N",
                     help="records per segment at most (default %(default)s)")
    run.add_argument("--every", type=positive_float, default=None, metavar="SECONDS",
                     help="keep running: seal the full segments the log has grown by every SECONDS, until "
                          "stopped (SIGINT/SIGTERM); --all is not allowed with it")
    run.set_defaults(func=_run)

    listing = sub.add_parser("list", help="the segments, from their metadata (no server needed)")
    _common(listing)
    listing.add_argument("--format", choices=("text", "json"), default="text")
    listing.set_defaults(func=_list)

    verify = sub.add_parser("verify", help="read every segment and check its hashes and the chain (exit 1 if broken)")
    _common(verify)
    verify.set_defaults(func=_verify)


def _common(parser: argparse.ArgumentParser) -> None:
    add_connection_options(parser)
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="the archive directory (default: <home>/archive/<namespace>)")


def _settings(args: argparse.Namespace, **overrides: Any) -> ArchiveSettings:
    try:
        if args.dir is not None:
            return ArchiveSettings(directory=args.dir, **overrides)
        return ArchiveSettings.for_home(args.home, args.namespace, **overrides)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _stream(args: argparse.Namespace) -> str:
    try:
        return Subjects(args.namespace).stream
    except Exception as exc:  # noqa: BLE001 - a bad namespace name, said in one line
        raise CliError(str(exc)) from exc


async def _run(args: argparse.Namespace) -> int:
    if args.every is not None and args.all:
        raise CliError("--all seals a partial segment once; it cannot be combined with --every")
    settings = _settings(args, segment_records=args.segment_records, seal_partial=args.all)
    if args.every is not None:
        return await _keep(args, ArchivePolicy(settings=settings, interval_s=args.every))

    def sealed(meta: SegmentMeta) -> None:
        out(f"sealed {meta.name}: seq {meta.first_seq}..{meta.last_seq}, {meta.count:,} records")

    async with open_bus(args, name="archive") as bus:
        try:
            run = await run_archive(bus, settings, on_sealed=sealed)
        except ArchiveCorrupt as exc:
            raise CliError(f"{exc} (run `bus archive verify`; nothing was archived)") from exc
        except ArchiveError as exc:
            raise CliError(str(exc)) from exc
    for name in run.announced:
        out(f"recorded the sealed event of {name} (sealed by an earlier run)")
    if run.sealed:
        rate = run.records / run.seconds if run.seconds > 0 else 0.0
        out(f"archived {run.records:,} records in {len(run.sealed)} segment(s) in {run.seconds:.2f}s "
            f"({rate:,.0f}/s); the archive ends at seq {run.last_seq}")
    else:
        out(f"nothing to seal: the archive ends at seq {run.last_seq}"
            + ("" if settings.seal_partial else f" (a segment is cut every {settings.segment_records:,} records; "
               "--all seals the rest)"))
    return 0


async def _keep(args: argparse.Namespace, policy: ArchivePolicy) -> int:
    """`run --every`: apply the policy until SIGINT or SIGTERM (exit 0), or a damaged archive
    (exit 2, one line)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def ran(run: ArchiveRun) -> None:
        for meta, _ in run.sealed:
            out(f"sealed {meta.name}: seq {meta.first_seq}..{meta.last_seq}, {meta.count:,} records")

    async def until_stopped() -> None:
        await stop.wait()
        raise _Stopped

    async with open_bus(args, name="archive") as bus:
        out(f"archiving {bus.subjects.stream} into {policy.settings.directory} every {policy.interval_s:g}s "
            f"({policy.settings.segment_records:,} records a segment)")
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(keep_archiving(bus, policy, on_run=ran), name="archive-policy")
                tasks.create_task(until_stopped(), name="archive-stop")
        except* _Stopped:
            pass  # asked to stop
        except* ArchiveCorrupt as group:
            exc = group.exceptions[0]
            raise CliError(f"{exc} (run `bus archive verify`; archiving stopped)") from exc
    return 0


class _Stopped(Exception):
    """SIGINT or SIGTERM: the policy ends (the run in progress is cancelled between segments)."""


async def _list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        segments = await asyncio.to_thread(chain_of, settings.directory, _stream(args))
    except ArchiveError as exc:
        raise CliError(str(exc)) from exc
    if args.format == "json":
        write_out(msgspec.json.encode([_row(s) for s in segments]).decode() + "\n")
        return 0
    if not segments:
        out(f"no segments in {settings.directory}")
        return 0
    out(f"{'SEGMENT':<52} {'FIRST':>10} {'LAST':>10} {'RECORDS':>9} {'BYTES':>12}  STORED FROM .. TO")
    for s in segments:
        m = s.meta
        out(f"{m.name:<52} {m.first_seq:>10} {m.last_seq:>10} {m.count:>9,} {s.file_bytes:>12,}  "
            f"{_when(m.first_stored_ns)} .. {_when(m.last_stored_ns)}")
    out(f"{len(segments)} segment(s), {sum(s.meta.count for s in segments):,} records, up to seq {segments[-1].meta.last_seq}")
    return 0


async def _verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    stream = _stream(args)

    def check() -> tuple[list[Segment], str | None]:
        good: list[Segment] = []
        try:
            for segment in verify_all(settings.directory, stream):
                good.append(segment)
        except ArchiveCorrupt as exc:
            return good, str(exc)
        return good, None

    try:
        good, problem = await asyncio.to_thread(check)
    except ArchiveError as exc:
        raise CliError(str(exc)) from exc
    records = sum(s.meta.count for s in good)
    if problem is not None:
        out(f"BROKEN: {problem}")
        out(f"{len(good)} segment(s) before it verified ({records:,} records)")
        return 1
    if not good:
        out(f"ok: no segments in {settings.directory}")
        return 0
    out(f"ok: {len(good)} segment(s), {records:,} records up to seq {good[-1].meta.last_seq}: every hash and "
        "the chain verified")
    return 0


def _row(segment: Segment) -> dict[str, Any]:
    return {**msgspec.structs.asdict(segment.meta), "name": segment.meta.name, "file_bytes": segment.file_bytes}


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
