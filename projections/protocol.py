"""Wire types and subjects of the projection service's control requests (status, rebuild).

Queries use `schemas.query` on `bus.subjects.query`; these two are for the operator's CLI and
live next to it, under `_continuum.<ns>.projections.*` (core NATS request/reply, not the log).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from bus.subjects import Subjects


def status_subject(subjects: Subjects, service: str | None = None) -> str:
    """Any one service answers (a queue group); with `service`, that service alone."""
    return f"_continuum.{subjects.ns}.projections.status" + (f".{service}" if service else "")


def rebuild_subject(subjects: Subjects, service: str | None = None) -> str:
    """Any one service answers (a queue group); with `service`, that service alone."""
    return f"_continuum.{subjects.ns}.projections.rebuild" + (f".{service}" if service else "")


def roll_call_subject(subjects: Subjects) -> str:
    """Every running service answers with a `ServiceHello`."""
    return f"_continuum.{subjects.ns}.projections.hello"


class ServiceHello(msgspec.Struct, frozen=True, kw_only=True):
    """A running projection service: its name (what `--service` addresses), its views file,
    how far it has folded the log, its process."""

    service: str
    db_path: str
    applied_seq: int
    pid: int
    host: str


class ViewStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One generation of one view: its checkpoint and how far it is behind the log."""

    view: str
    generation: int
    version: int
    state: str  # active | building
    applied_seq: int
    lag_events: int | None  # None when the log's end is unknown
    applied_event_at: datetime | None  # stream time of the last applied event
    relations: list[str] = []


class FoldRetry(msgspec.Struct, frozen=True, kw_only=True):
    """A fold the environment keeps failing (out of memory, disk full), being retried."""

    where: str  # "lane <name>" (live) or "rebuild"
    first_seq: int  # the records of the last attempt
    last_seq: int
    attempts: int
    since: datetime  # the first failure
    error: str  # the last failure


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `bus projections status` prints."""

    source: str  # "service" (asked the running service) | "file" (no service: read the file)
    db_path: str
    stream: str
    log_last_seq: int | None
    applied_seq: int
    lag_events: int | None
    lag_seconds: float | None
    views: list[ViewStatus]
    integrity: dict[str, int]  # problem -> count
    rebuilding: list[str] = []
    pid: int | None = None
    fold_errors: dict[str, int] = {}  # view -> events it could not fold
    retrying: list[FoldRetry] = []  # folds failing for a reason other than their events, retried
    service: str = ""  # the answering service's name (`--service`); "" when read from the file
    # view -> why it is not trusted (a commit DuckDB failed half-way): rebuilt from seq 1
    untrusted: dict[str, str] = {}


class RebuildRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Rebuild these views (all when empty) from sequence 1, then swap them in."""

    views: list[str] = []


class RebuildReport(msgspec.Struct, frozen=True, kw_only=True):
    """A finished rebuild: the views swapped in, at which checkpoint, and what it took."""

    views: list[str]
    applied_seq: int
    events: int
    seconds: float
    source: str = "service"
    # Of `events`, those folded straight from the archive's segments (projections.archive).
    archived: int = 0


class ControlFailure(msgspec.Struct, frozen=True, kw_only=True, tag="failure", tag_field="status"):
    """A control request that was refused or failed."""

    message: str


class StatusOk(msgspec.Struct, frozen=True, kw_only=True, tag="status", tag_field="status"):
    report: StatusReport


class RebuildOk(msgspec.Struct, frozen=True, kw_only=True, tag="rebuilt", tag_field="status"):
    report: RebuildReport


ControlResponse = StatusOk | RebuildOk | ControlFailure
