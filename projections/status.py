"""The state of the views: each view's checkpoint and lag, integrity problems, rebuilds; from the
running service or, when none runs, from the file itself. And its text rendering."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import msgspec

from bus.errors import BusUnavailable, NoAnswer, NoResponders
from projections.errors import ProjectionError
from projections.protocol import (
    ControlFailure,
    ControlResponse,
    FoldRetry,
    StatusOk,
    StatusReport,
    ServiceHello,
    ViewStatus,
    roll_call_subject,
    status_subject,
)
from projections.store import Generation, Store, generations_in, open_read_only

if TYPE_CHECKING:
    from bus import Bus

_response = msgspec.json.Decoder(ControlResponse)
_hello = msgspec.json.Decoder(ServiceHello)


def collect(store: Store) -> tuple[list[Generation], dict[str, int], dict[str, int], dict[str, str]]:
    """Copies of the store's generations, the integrity counts, the fold errors of the active
    views and the views not trusted since a half-way commit (run on the writer thread)."""
    gens = [dataclasses.replace(g) for g in store.generations()]
    integrity = integrity_counts(store.con) if "integrity" in store.active else {}
    return gens, integrity, fold_error_counts(store.con), dict(store.untrusted)


def untrusted_views(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """view -> why a half-way commit left it untrusted (empty for a file from before the table)."""
    try:
        rows = con.execute("SELECT view, reason FROM _continuum.untrusted_views ORDER BY view").fetchall()
    except duckdb.CatalogException:
        return {}
    return {str(view): str(reason) for view, reason in rows}


def fold_error_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """view -> events its active generation could not fold."""
    rows = con.execute(
        "SELECT e.view, count(*) FROM _continuum.fold_errors e JOIN _continuum.generations g "
        "ON g.view = e.view AND g.generation = e.generation AND g.state = 'active' GROUP BY e.view ORDER BY 1"
    ).fetchall()
    return {str(view): int(count) for view, count in rows}


def integrity_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """problem -> count, from the `integrity` view (empty when it does not exist)."""
    try:
        rows = con.execute("SELECT problem, count(*) FROM main.integrity GROUP BY problem ORDER BY problem").fetchall()
    except duckdb.CatalogException:
        return {}
    return {str(problem): int(count) for problem, count in rows}


def build_report(
    *,
    source: str,
    db_path: str,
    stream: str,
    gens: list[Generation],
    integrity: dict[str, int],
    log_last_seq: int | None,
    lag_seconds: float | None = None,
    rebuilding: list[str] | None = None,
    pid: int | None = None,
    fold_errors: dict[str, int] | None = None,
    retrying: list[FoldRetry] | None = None,
    service: str = "",
    untrusted: dict[str, str] | None = None,
) -> StatusReport:
    """A StatusReport from the parts (lag is measured against `log_last_seq` when known)."""
    views = [
        ViewStatus(
            view=g.view, generation=g.generation, version=g.version, state=g.state,
            applied_seq=g.applied_seq,
            lag_events=None if log_last_seq is None else max(0, log_last_seq - g.applied_seq),
            applied_event_at=None if not g.applied_us else datetime.fromtimestamp(g.applied_us / 1e6, UTC),
            relations=list(g.relations),
        )
        for g in sorted(gens, key=lambda g: (g.state != "active", g.view))
    ]
    active = [g.applied_seq for g in gens if g.state == "active"]
    applied = min(active, default=0)
    return StatusReport(
        source=source, db_path=db_path, stream=stream, log_last_seq=log_last_seq, applied_seq=applied,
        lag_events=None if log_last_seq is None else max(0, log_last_seq - applied),
        lag_seconds=lag_seconds, views=views, integrity=integrity, rebuilding=rebuilding or [], pid=pid,
        fold_errors=fold_errors or {}, retrying=retrying or [], service=service, untrusted=untrusted or {},
    )


def report_from_file(path: str | Path, *, stream: str, log_last_seq: int | None) -> StatusReport:
    """Status read from a views file no service holds. Raises StoreLocked, StoreMismatch."""
    con = open_read_only(path)
    try:
        gens = generations_in(con, path)
        counts = integrity_counts(con)
        errors = fold_error_counts(con)
        untrusted = untrusted_views(con)
    finally:
        con.close()
    return build_report(
        source="file", db_path=str(path), stream=stream, gens=gens, integrity=counts, log_last_seq=log_last_seq,
        fold_errors=errors, untrusted=untrusted,
    )


def format_report(report: StatusReport) -> list[str]:
    """Lines for `bus projections status`."""
    where = (
        f"service {report.service or '?'}, pid {report.pid}" if report.source == "service"
        else "no projection service is running: read the file directly"
    )
    log_end = "unknown (NATS not reachable)" if report.log_last_seq is None else str(report.log_last_seq)
    lines = [
        f"views file: {report.db_path} ({where})",
        f"log: {report.stream}, last seq {log_end}",
        f"applied: seq {report.applied_seq}, lag {_or_dash(report.lag_events)} events"
        + ("" if report.lag_seconds is None else f", last event visible {report.lag_seconds * 1000:.1f} ms after it was stored"),
    ]
    if report.rebuilding:
        lines.append(f"rebuilding: {', '.join(report.rebuilding)}")
    header = ("VIEW", "GEN", "VER", "STATE", "CHECKPOINT", "LAG", "LAST EVENT AT")
    table = [header] + [
        (v.view, str(v.generation), str(v.version), v.state, str(v.applied_seq), _or_dash(v.lag_events),
         "-" if v.applied_event_at is None else v.applied_event_at.isoformat(timespec="milliseconds"))
        for v in report.views
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    if report.integrity:
        problems = ", ".join(f"{problem}: {count}" for problem, count in report.integrity.items())
        lines.append(f"INTEGRITY PROBLEMS: {problems} (SELECT * FROM integrity)")
    else:
        lines.append("integrity: no problems found")
    if report.fold_errors:
        errors = ", ".join(f"{view}: {count}" for view, count in report.fold_errors.items())
        lines.append(f"EVENTS NOT FOLDED: {errors} (SELECT * FROM _continuum.fold_errors)")
    if report.untrusted:
        lines.append(
            f"NOT TRUSTED: {', '.join(report.untrusted)} ({'; '.join(sorted(set(report.untrusted.values())))}): "
            "rebuilt from seq 1" + (" by the service" if report.source == "service" else " when the service starts")
        )
    for retry in report.retrying:
        lines.append(
            f"FOLD RETRYING: {retry.where}, seq {retry.first_seq}..{retry.last_seq}, {retry.attempts} attempts "
            f"since {retry.since.isoformat(timespec='seconds')}: {retry.error}"
        )
    return lines


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)



async def running_services(bus: Bus, *, wait_s: float = 0.5) -> list[ServiceHello]:
    """Every projection service that answers a roll call within `wait_s`, by name. Raises
    BusUnavailable."""
    found = []
    for answer in await bus.transport.gather(roll_call_subject(bus.subjects), wait_s=wait_s):
        try:
            found.append(_hello.decode(answer.data))
        except msgspec.DecodeError:
            continue  # anyone may answer on the roll call's inbox: not a service
    return sorted(found, key=lambda h: h.service)


async def request_status(bus: Bus, *, service: str | None = None, timeout_s: float = 5.0) -> StatusReport:
    """Ask a running service for its status: any one, or the one named `service`. Raises
    BusUnavailable when none (or not that one) answers."""
    try:
        msg = await bus.transport.request(status_subject(bus.subjects, service), b"", timeout_s=timeout_s)
    except NoResponders as exc:
        which = f"named {service!r}" if service else ""
        raise BusUnavailable(f"no projection service {which} is running".replace("  ", " ")) from exc
    except NoAnswer as exc:
        raise BusUnavailable(f"the projection service did not answer within {timeout_s:g}s") from exc
    response = _response.decode(msg.data)
    if isinstance(response, StatusOk):
        return response.report
    if isinstance(response, ControlFailure):
        raise ProjectionError(f"the projection service could not report its status: {response.message}")
    raise ProjectionError(f"unexpected answer to a status request: {type(response).__name__}")
