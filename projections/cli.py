"""`bus projections run|rebuild|status` and `bus query`.

    bus projections run [--db PATH] [--metrics-port P]      keep the views current, answer queries
                                                             (metrics on P, or a free port; see bus.scrape)
    bus projections rebuild [--view NAME ...]                rebuild from seq 1, then swap
    bus projections status [--format text|json]              checkpoints, lag, integrity
    bus query "SELECT ..." [--format table|json|csv] [--min-seq N] [--param V ...]

Only the running service opens the views file; the other commands ask it over the bus. When no
service runs, `rebuild` and `status` open the file themselves, and say so.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import io
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from bus.cli.common import (
    CliError,
    add_connection_options,
    add_metrics_option,
    metrics_endpoint,
    niceness,
    non_negative_float,
    open_bus,
    out,
    positive_int,
    write_out,
)
from bus.cli.progress_line import ProgressLine
from bus.errors import BusUnavailable
from bus.scrape import ScrapeTarget
from projections.archive.config import ArchiveSettings
from projections.config import (
    DEFAULT_BATCH_MAX,
    DEFAULT_DUCKDB_THREADS,
    DEFAULT_LINGER_S,
    DEFAULT_NICENESS,
    DEFAULT_QUERY_MEMORY_LIMIT,
    VIEWS_FILE,
    ProjectionSettings,
    QuerySettings,
    format_bytes,
    lower_cpu_priority,
    parse_bytes,
    quick_gil_handoff,
    tuned_gc,
)
from projections.errors import ProjectionError, RebuildError, StoreLocked, StoreMismatch
from projections.protocol import StatusReport
from projections.rebuild import rebuild_file, request_rebuild
from projections.service import ProjectionService
from projections.status import format_report, report_from_file, request_status, running_services
from schemas.query import QueryResult


def register(subparsers: Any) -> None:
    """Add `projections` (run, rebuild, status) and `query` to the `bus` command."""
    projections = subparsers.add_parser(
        "projections", help="fold the log into DuckDB views (run | rebuild | status)",
        description="The projection service folds the log into DuckDB views and answers queries on them.",
    )
    sub = projections.add_subparsers(dest="projections_command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="keep the views current and answer queries, until stopped")
    _common(run)
    add_metrics_option(run, always=True)
    run.add_argument("--batch-max", type=int, default=DEFAULT_BATCH_MAX,
                     help="events per transaction at most (default %(default)s)")
    run.add_argument("--name", default="", metavar="NAME",
                     help="this service's name, for `status`/`rebuild --service` (default: <host>-<views file name>)")
    run.add_argument("--query-workers", type=int, default=2, help="threads answering queries (default %(default)s)")
    run.add_argument("--memory-limit", default=None, help="DuckDB memory limit, e.g. 2GB (default: DuckDB's)")
    run.add_argument(
        "--query-memory-limit", type=_size, default=None, metavar="SIZE",
        help=f"how much one query may grow the service's memory, e.g. 512MB; over it the query is stopped "
             f"(default {format_bytes(DEFAULT_QUERY_MEMORY_LIMIT)}, or half of --memory-limit if less)",
    )
    run.add_argument(
        "--duckdb-threads", type=positive_int, default=DEFAULT_DUCKDB_THREADS, metavar="N",
        help="threads DuckDB may use for one statement (default %(default)s: the fold lanes and query "
             "workers already run at once; more helps a log that keeps one lane busy alone, but then "
             "queries are kept off the file system by the statement check alone, not by the kernel)",
    )
    run.add_argument(
        "--linger-ms", type=non_negative_float, default=DEFAULT_LINGER_S * 1000, metavar="MS",
        help="how long a fold lane may let live batches gather while no query waits for its views "
             "(default %(default)g; a min_seq query for them ends the wait; 0: fold every batch at once)",
    )
    run.add_argument(
        "--nice", type=niceness, default=DEFAULT_NICENESS, metavar="N",
        help="CPU niceness, 0-19 (default %(default)s): the views can catch up, the bus cannot wait, so "
             "on a busy machine the fold takes what the bus leaves; 0 folds at the bus's priority",
    )
    run.add_argument("--fsync", action="store_true",
                     help="fsync the views file at every commit (default: unsynced; after an OS crash "
                          "the views are folded again from the log)")
    run.set_defaults(func=_run)

    rebuild = sub.add_parser("rebuild", help="rebuild views from seq 1 while the current ones serve, then swap")
    _common(rebuild)
    rebuild.add_argument("--view", action="append", default=[], metavar="NAME",
                         help="a view to rebuild (repeatable; default: all)")
    rebuild.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the swap (default %(default)s)")
    _addressing(rebuild)
    rebuild.set_defaults(func=_rebuild)

    compact = sub.add_parser(
        "compact", help="rewrite the views file so no freed block keeps deleted rows (after `bus forget`)",
        description="Copy the views file's live rows into a fresh file and replace it (projections.compact): "
        "DuckDB never clears freed blocks, so after `bus forget` the forgotten text stays readable in the file "
        "until this runs. The projection service must be stopped (it holds the file).",
    )
    _common(compact)
    compact.set_defaults(func=_compact)

    status = sub.add_parser("status", help="each view's checkpoint and lag, and integrity problems")
    _common(status)
    status.add_argument("--format", choices=("text", "json"), default="text")
    _addressing(status)
    status.set_defaults(func=_status)

    query = subparsers.add_parser(
        "query", help="run read-only SQL on the views",
        description="Run one read-only SELECT on the views (events, messages, agents, dead_letters, "
                    "conversations, integrity, ...), answered by the projection service.",
    )
    add_connection_options(query)
    query.add_argument("sql", help='one SELECT statement, e.g. "SELECT * FROM messages LIMIT 5"')
    query.add_argument("--format", choices=("table", "json", "csv"), default="table")
    query.add_argument("--min-seq", type=int, default=None,
                       help="wait until the views have applied this stream sequence (read-your-writes)")
    query.add_argument("--param", action="append", default=[], metavar="VALUE",
                       help="a value for the next `?` (JSON if it parses, else text; repeatable)")
    query.add_argument("--max-rows", type=int, default=10_000)
    query.add_argument("--timeout", type=float, default=10.0, help="seconds (default %(default)s)")
    query.add_argument(
        "--as", dest="scope", default=None, metavar="AGENT",
        help="read only what AGENT may (its own conversations, steps and model calls; the team's facts); "
        "an agent's credential can query only this way, as itself",
    )
    query.set_defaults(func=_query)


def _size(text: str) -> int:
    """An argparse type: a size such as 512MB or 1GiB, in bytes (at least 1)."""
    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 byte")
    return size


def _addressing(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--service", default=None, metavar="NAME",
                       help="the projection service of this name (see `--all`; default: any one)")
    which.add_argument("--all", action="store_true", help="every running projection service, one after another")


def _common(parser: argparse.ArgumentParser) -> None:
    add_connection_options(parser)
    parser.add_argument("--db", type=Path, default=None, help=f"the views file (default: <home>/{VIEWS_FILE})")


def _settings(args: argparse.Namespace, **overrides: Any) -> ProjectionSettings:
    path = args.db if args.db is not None else Path(args.home) / VIEWS_FILE
    archive = ArchiveSettings.for_home(args.home, args.namespace).directory
    return ProjectionSettings(db_path=str(path), archive_dir=str(archive), **overrides)


async def _compact(args: argparse.Namespace) -> int:
    from projections.compact import rewrite_views_file

    path = _settings(args).db_path
    try:
        size = await asyncio.to_thread(rewrite_views_file, path)
    except (FileNotFoundError, StoreLocked) as exc:
        raise CliError(str(exc)) from exc
    out(f"rewrote {path}: {size} bytes, no freed blocks")
    return 0


# -- run ---------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    # First: every thread the service starts (DuckDB's, the query workers) takes it from here.
    lower_cpu_priority(args.nice)
    try:
        settings = _settings(
            args, batch_max=args.batch_max, read_ahead=2 * args.batch_max,
            memory_limit=args.memory_limit, threads=args.duckdb_threads, linger_s=args.linger_ms / 1000,
            query=QuerySettings(workers=args.query_workers, memory_limit_bytes=args.query_memory_limit),
            fsync=args.fsync, service_name=args.name,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    registry = CollectorRegistry()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        with tuned_gc(), quick_gil_handoff():
            async with open_bus(args, name="projections", metrics_registry=registry) as bus:
                target = ScrapeTarget.of("projections", namespace=args.namespace, service=settings.service)
                async with ProjectionService(bus, settings, registry=registry) as service:
                    # Registered once the views file is ours: a second service, refused it, must
                    # not replace (and on its way out remove) the running one's scrape target.
                    async with metrics_endpoint(registry, args.metrics_port, target, args.home.resolve()):
                        # What exists now lives as long as the process: keep the cycle
                        # collector from re-scanning it.
                        gc.freeze()
                        try:
                            out(f"projections {settings.service}: {bus.subjects.stream} -> {settings.db_path}, applied up to "
                                f"seq {service.applied_seq}; answering queries on {bus.subjects.query}")
                            await stop.wait()
                        finally:
                            gc.unfreeze()
    except (StoreLocked, StoreMismatch) as exc:
        raise CliError(str(exc)) from exc
    except BaseExceptionGroup as group:
        failures = [e for e in _leaves(group) if isinstance(e, ProjectionError)]
        if failures:
            # A failure while running (not a refusal to start): exit 1, which `bus up`'s keeper
            # answers with a restart (bus.cli.keeper); 2 is kept for "will not run like this".
            sys.stderr.write(f"error: the projection service stopped: {failures[0]}\n")
            return 1
        raise
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    out("projections: stopped")
    return 0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out_: list[BaseException] = []
    for exc in group.exceptions:
        out_.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out_


# -- rebuild / status ----------------------------------------------------------------------


async def _targets(bus: Any, args: argparse.Namespace) -> list[str | None]:
    """The services a status or rebuild goes to: [None] (any one), [--service], or every one
    answering a roll call (--all). Raises CliError when --all finds none."""
    if args.service is not None:
        return [args.service]
    if not args.all:
        return [None]
    names = [hello.service for hello in await running_services(bus)]
    if not names:
        raise CliError("no projection service answered the roll call: start `bus projections run` (or `bus up`)")
    return names


async def _rebuild(args: argparse.Namespace) -> int:
    settings = _settings(args)
    async with open_bus(args, name="cli") as bus:
        for service in await _targets(bus, args):
            report = await _rebuild_one(bus, args, settings, service)
            where = f"{report.source} {service}" if service else report.source
            archived = f" ({report.archived} from the archive)" if report.archived else ""
            out(f"rebuilt {', '.join(report.views)} ({where}): {report.events} events{archived} in {report.seconds:.2f}s; "
                f"swapped in at seq {report.applied_seq}")
    return 0


async def _rebuild_one(bus: Any, args: argparse.Namespace, settings: ProjectionSettings, service: str | None) -> Any:
    try:
        return await request_rebuild(bus, args.view, timeout_s=args.timeout, service=service,
                                     progress=ProgressLine("rebuild", unit="events"))
    except BusUnavailable as exc:
        if service is not None:
            raise CliError(f"{exc}: `bus projections status --all` lists the running ones") from exc
        out(f"no projection service is running: rebuilding {settings.db_path} directly")
        try:
            return await rebuild_file(bus, settings, args.view, progress=ProgressLine("rebuild", unit="events"))
        except (StoreLocked, StoreMismatch) as exc:
            raise CliError(str(exc)) from exc
    except RebuildError as exc:
        raise CliError(f"rebuild refused or failed: {exc}") from exc


async def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    reports: list[StatusReport] = []
    try:
        async with open_bus(args, name="cli") as bus:
            for service in await _targets(bus, args):
                try:
                    reports.append(await request_status(bus, service=service))
                except BusUnavailable as exc:
                    if service is not None:
                        raise CliError(f"{exc}: `bus projections status --all` lists the running ones") from exc
                    reports.append(await _status_from_file(settings, bus.subjects.stream, await bus.last_seq()))
    except CliError:
        if args.service is not None or args.all:
            raise
        # No NATS at all: the file still says how far the views got.
        from bus.subjects import Subjects

        reports = [await _status_from_file(settings, Subjects(args.namespace).stream, None)]
    if args.format == "json":
        out(msgspec.json.encode(reports if args.all else reports[0]).decode())
        return 0
    for index, report in enumerate(reports):
        if index:
            out("")
        for line in format_report(report):
            out(line)
    return 0


async def _status_from_file(settings: ProjectionSettings, stream: str, last_seq: int | None) -> StatusReport:
    if not Path(settings.db_path).exists():
        raise CliError(
            f"no projection service is running and there is no views file at {settings.db_path}: "
            "start `bus projections run` (or `bus up`)"
        )
    try:
        return await asyncio.to_thread(report_from_file, settings.db_path, stream=stream, log_last_seq=last_seq)
    except (StoreLocked, StoreMismatch) as exc:
        raise CliError(str(exc)) from exc


# -- query -------------------------------------------------------------------------------


async def _query(args: argparse.Namespace) -> int:
    params = [_param(value) for value in args.param]
    async with open_bus(args, name=args.scope or "cli") as bus:
        result = await bus.query(
            args.sql, params, min_seq=args.min_seq, max_rows=args.max_rows, timeout_s=args.timeout, scope=args.scope,
        )
    write_out(render(result, args.format))
    if result.truncated:
        sys.stderr.write(f"(truncated at {len(result.rows)} rows; raise --max-rows or add a LIMIT)\n")
    return 0


def _param(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def render(result: QueryResult, fmt: str) -> str:
    """A query result as `table` (aligned text), `json` (an array of row objects; JSON columns
    as JSON) or `csv` (with a header row)."""
    if fmt == "json":
        records = [
            {name: _json_cell(value, typ) for name, typ, value in zip(result.columns, result.types, row)}
            for row in result.rows
        ]
        return msgspec.json.encode(records).decode() + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([_text(value) for value in row] for row in result.rows)
        return buffer.getvalue()
    cells = [result.columns] + [[_text(value, limit=80) for value in row] for row in result.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(result.columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}; views at seq {result.applied_seq})")
    return "\n".join(lines) + "\n"


def _json_cell(value: Any, typ: str) -> Any:
    if typ == "JSON" and isinstance(value, str):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            return value
    return value


def _text(value: Any, limit: int | None = None) -> str:
    if value is None:
        text = "" if limit is None else "NULL"
    elif isinstance(value, str):
        text = value
    else:
        text = msgspec.json.encode(value).decode()
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text
