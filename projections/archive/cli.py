"""`bus archive run|list|verify`: the log's archive of sealed Parquet segments.

    bus archive run [--all] [--segment-records N] [--dir PATH]   seal the log after the last segment
    bus archive list [--format text|json] [--dir PATH]          the segments, from their metadata
    bus archive verify [--dir PATH]                             read and check every segment and the chain
    bus archive trim [--dry-run] [--reason TEXT] [--by NAME]    purge the log below the verified archive, by policy
    bus archive restore [--to DIR]                              rebuild the directory from the object store

`--object-store` (or BUS_ARCHIVE_OBJECT_STORE=1) turns on the second target, the NATS Object
Store bucket `CONTINUUM_ARCHIVE_<NS>` (projections.archive.copies): `run` copies each segment
there, `trim` goes no further than the copies verified there, `list` shows each copy's state and
`verify` reads every copy back. Without it `list` and `verify` read the files only (no server
needed). `verify` exits 1 at the first broken segment, or at any missing or damaged copy, with
one line each saying which and what; nothing is changed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
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
from projections.archive.copies import CopyState, copy_states, restore_archive
from projections.archive.fenced import verify_all_fenced
from projections.archive.segment import SegmentMeta
from projections.archive.retention import DEFAULT_RETENTION, TrimSettings
from projections.archive.trim import run_trim
from projections.archive.verify import Segment, chain_of
from projections.config import quick_gil_handoff, tuned_gc
from projections.errors import ArchiveCorrupt, ArchiveError, TrimRefused


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
    run.set_defaults(func=_run_tuned)

    listing = sub.add_parser("list", help="the segments, from their metadata (no server needed)")
    _common(listing)
    listing.add_argument("--format", choices=("text", "json"), default="text")
    listing.set_defaults(func=_list)

    verify = sub.add_parser("verify", help="read every segment and check its hashes and the chain (exit 1 if broken)")
    _common(verify)
    verify.set_defaults(func=_verify)

    trim = sub.add_parser("trim", help="purge the log below the verified archive, class by class (retention policy)")
    _common(trim)
    _trim_options(trim)
    trim.add_argument("--dry-run", action="store_true", help="say what would be purged; purge nothing")
    trim.set_defaults(func=_trim)

    restore = sub.add_parser("restore", help="rebuild the archive directory from the object store bucket "
                                             "(after the disk was lost), verifying the chain")
    add_connection_options(restore)
    restore.add_argument("--to", type=Path, default=None, metavar="DIR",
                         help="where to restore (default: <home>/archive/<namespace>)")
    restore.set_defaults(func=_restore)
    run.add_argument("--trim", action="store_true",
                     help="with --every: trim the log by the retention policy after each run")
    _trim_options(run, with_defaults_only=True)


def _trim_options(parser: argparse.ArgumentParser, *, with_defaults_only: bool = False) -> None:
    if not with_defaults_only:
        parser.add_argument("--reason", default="operator", metavar="TEXT",
                            help="why (recorded in the archive.log.trimmed event; default %(default)s)")
    parser.add_argument("--by", default=None, metavar="NAME",
                        help="who trims (recorded; default: $USER, else the bus name)")
    parser.add_argument("--min-age", type=float, default=None, metavar="SECONDS",
                        help="trim nothing stored less than SECONDS ago (default: the policy's, 3600)")
    parser.add_argument("--views-wait", type=float, default=10.0, metavar="SECONDS",
                        help="wait up to SECONDS for the projection service's views to have applied what is "
                             "purged; refuse otherwise (0: do not ask; default %(default)s)")


def _common(parser: argparse.ArgumentParser) -> None:
    add_connection_options(parser)
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="the archive directory (default: <home>/archive/<namespace>)")
    parser.add_argument("--object-store", action="store_true",
                        default=os.environ.get("BUS_ARCHIVE_OBJECT_STORE", "").lower() in ("1", "true", "yes", "on"),
                        help="also the second target: the NATS Object Store bucket CONTINUUM_ARCHIVE_<NS> "
                             "(env BUS_ARCHIVE_OBJECT_STORE=1; default off)")


def _settings(args: argparse.Namespace, **overrides: Any) -> ArchiveSettings:
    overrides.setdefault("object_store", bool(getattr(args, "object_store", False)))
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


async def _run_tuned(args: argparse.Namespace) -> int:
    """`run` tuned as the projection service runs. The cycle collector (`tuned_gc`): sealing holds
    a segment's records and their decoded fields at once, and CPython's default threshold rescans
    them every few hundred allocations (measured: the decode 3.59 instead of 2.75 µs an event).
    The GIL switch interval (`quick_gil_handoff`): the thread writing and verifying a segment
    takes the GIL back between Arrow's calls while the reader and the decoder hold it; at 5 ms
    it waited 0.35-0.6 s more per 100k segment for it beside a decoding thread, at 0.5 ms 0.1-0.2 s."""
    with tuned_gc(), quick_gil_handoff():
        return await _run(args)


async def _run(args: argparse.Namespace) -> int:
    if args.every is not None and args.all:
        raise CliError("--all seals a partial segment once; it cannot be combined with --every")
    settings = _settings(args, segment_records=args.segment_records, seal_partial=args.all)
    if args.trim and args.every is None:
        raise CliError("--trim applies the retention policy on a schedule: use it with --every (or run `bus archive trim`)")
    if args.every is not None:
        trim = _trim_settings(args, reason="policy") if args.trim else None
        return await _keep(args, ArchivePolicy(settings=settings, interval_s=args.every, trim=trim))

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
    for name in run.copied:
        out(f"copied {name} to {Subjects(args.namespace).archive_bucket} (read back verified)")
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
        for name in run.copied:
            out(f"copied {name} to the object store")
        if run.trim is not None and run.trim.purged:
            out(f"trimmed {run.trim.purged:,} records (event at seq {run.trim.event_seq})")

    async def until_stopped() -> None:
        await stop.wait()
        raise _Stopped

    async with open_bus(args, name="archive") as bus:
        out(f"archiving {bus.subjects.stream} into {policy.settings.directory} every {policy.interval_s:g}s "
            f"({policy.settings.segment_records:,} records a segment"
            + (", then trimming by the retention policy)" if policy.trim is not None else ")"))
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
    copies = await _copy_states(args, settings, segments, whole=False) if settings.object_store else None
    if args.format == "json":
        rows = [_row(s) for s in segments]
        for row, state in zip(rows, copies or []):
            row["copy"] = {"state": state.state, "detail": state.detail}
        write_out(msgspec.json.encode(rows).decode() + "\n")
        return 0
    if not segments:
        out(f"no segments in {settings.directory}")
        return 0
    copy_head = "  COPY" if copies is not None else ""
    out(f"{'SEGMENT':<52} {'FIRST':>10} {'LAST':>10} {'RECORDS':>9} {'BYTES':>12}  {'STORED FROM .. TO':<41}{copy_head}")
    for at, s in enumerate(segments):
        m = s.meta
        copy = f"  {copies[at].state}" if copies is not None else ""
        out(f"{m.name:<52} {m.first_seq:>10} {m.last_seq:>10} {m.count:>9,} {s.file_bytes:>12,}  "
            f"{_when(m.first_stored_ns)} .. {_when(m.last_stored_ns)}{copy}")
    out(f"{len(segments)} segment(s), {sum(s.meta.count for s in segments):,} records, up to seq {segments[-1].meta.last_seq}")
    if copies is not None:
        counts: dict[str, int] = {}
        for state in copies:
            counts[state.state] = counts.get(state.state, 0) + 1
        out(f"copies in {Subjects(args.namespace).archive_bucket}: "
            + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


async def _copy_states(args: argparse.Namespace, settings: ArchiveSettings, segments: list[Segment], *,
                       whole: bool) -> list[CopyState]:
    async with open_bus(args, name="archive") as bus:
        try:
            return await copy_states(bus, settings, segments, whole=whole)
        except ArchiveError as exc:
            raise CliError(str(exc)) from exc


async def _verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    stream = _stream(args)

    def check() -> tuple[list[Segment], str | None]:
        good: list[Segment] = []
        try:
            # Each segment read in a child: a reader that aborts is a broken segment, not a dead command.
            for segment in verify_all_fenced(settings.directory, stream):
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
    copies = ""
    if settings.object_store:
        bucket = Subjects(args.namespace).archive_bucket
        states = await _copy_states(args, settings, good, whole=True)
        bad = [s for s in states if s.state not in ("copied", "pending")]
        for state in bad:
            out(f"BROKEN COPY: {state.name}: {state.state}: {state.detail}")
        for state in states:
            if state.state == "pending":
                out(f"pending: {state.name}: {state.detail}")
        if bad:
            out(f"{len(good)} segment(s) verified ({records:,} records); {len(bad)} of their copies in {bucket} "
                "are missing or damaged (`bus archive run --object-store` copies a missing one again)")
            return 1
        copies = f"; {len(states)} copies in {bucket} read back whole, each its file's bytes"
    if not good:
        out(f"ok: no segments in {settings.directory}")
        return 0
    out(f"ok: {len(good)} segment(s), {records:,} records up to seq {good[-1].meta.last_seq}: every hash and "
        f"the chain verified{copies}")
    return 0


async def _restore(args: argparse.Namespace) -> int:
    try:
        settings = (ArchiveSettings(directory=args.to) if args.to is not None
                    else ArchiveSettings.for_home(args.home, args.namespace))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    async with open_bus(args, name="archive") as bus:
        try:
            restored = await restore_archive(bus, settings, bus.subjects.stream)
        except ArchiveCorrupt as exc:
            raise CliError(f"{exc} (the restore stopped; the files written so far are in {settings.directory})") from exc
        except ArchiveError as exc:
            raise CliError(str(exc)) from exc
        bucket = bus.subjects.archive_bucket
    segments = restored.segments
    records = sum(s.meta.count for s in segments)
    out(f"restored {len(restored.written)} segment(s) from {bucket} into {settings.directory} "
        f"({len(restored.present)} present already)")
    if segments:
        out(f"ok: {len(segments)} segment(s), {records:,} records up to seq {segments[-1].meta.last_seq}: every hash "
            "and the chain verified")
    return 0


def _trim_settings(args: argparse.Namespace, *, reason: str | None = None) -> TrimSettings:
    policy = DEFAULT_RETENTION
    try:
        if args.min_age is not None:
            policy = dataclasses.replace(policy, min_age_s=args.min_age)
        if args.views_wait < 0:
            raise ValueError("--views-wait must be 0 or more")
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    by = args.by or os.environ.get("USER") or "operator"
    return TrimSettings(policy=policy, by=by, reason=reason or args.reason, views_wait_s=args.views_wait)


async def _trim(args: argparse.Namespace) -> int:
    settings = _settings(args)
    trim = _trim_settings(args)
    async with open_bus(args, name="archive") as bus:
        try:
            result = await run_trim(bus, settings, trim, dry_run=args.dry_run)
        except ArchiveCorrupt as exc:
            raise CliError(f"{exc} (run `bus archive verify`; nothing was purged)") from exc
        except (TrimRefused, ArchiveError) as exc:
            raise CliError(str(exc)) from exc
    plan = result.plan
    out(f"the verified archive ends at seq {plan.archive.last_seq} ({plan.archive.segments} segment(s)); "
        f"the log holds seq {plan.first_seq}..{plan.last_seq}; views: {plan.views}")
    for c in plan.classes:
        kept = f", the last record of {len(c.per_subject)} subject(s) kept" if c.per_subject is not None else ""
        count = "" if args.dry_run else f": {result.by_class.get(c.rule.name, 0):,} purged"
        out(f"  {c.rule.name:<18} below seq {c.below_seq}{kept} ({c.reason}){count}")
    count = "" if args.dry_run else f": {result.by_class.get(trim.policy.everything_else, 0):,} purged"
    out(f"  {trim.policy.everything_else:<18} below seq {plan.rest_below}{count}")
    if args.dry_run:
        out("dry run: nothing was purged")
    else:
        out(f"trimmed {result.purged:,} records; recorded as archive.log.trimmed at seq {result.event_seq}")
    return 0


def _row(segment: Segment) -> dict[str, Any]:
    return {**msgspec.structs.asdict(segment.meta), "name": segment.meta.name, "file_bytes": segment.file_bytes}


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
