"""HTTP parameters, checked and converted; anything else is a `BadRequest` (HTTP 400) saying
what was wrong. Nothing from a request reaches SQL except through these, as a parameter."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from starlette.datastructures import QueryParams

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IDENT = re.compile(r"[A-Za-z0-9_-]{1,128}")
_KIND = re.compile(r"[A-Za-z0-9_.-]{1,128}\*?")
MAX_SEQ = 2**63 - 1


class BadRequest(Exception):
    """A parameter that cannot be used; the message says which and why (HTTP 400)."""


def name(value: str | None, what: str = "agent") -> str:
    """An agent name or tag: 1-64 letters, digits, '_' or '-'. Raises BadRequest."""
    if value is None or not _NAME.fullmatch(value):
        raise BadRequest(f"{what} must be 1-64 letters, digits, '_' or '-' (got {_shown(value)})")
    return value


def ident(value: str | None, what: str) -> str:
    """An id, or the end of one (a correlation id as `bus tail` prints it). Raises BadRequest."""
    if value is None or not _IDENT.fullmatch(value):
        raise BadRequest(f"{what} must be 1-128 letters, digits, '_' or '-' (got {_shown(value)})")
    return value


def seq(value: str | None, what: str = "seq") -> int:
    """A log sequence, 1 or more. Raises BadRequest."""
    if value is None or not value.isdigit() or not 1 <= int(value) <= MAX_SEQ:
        raise BadRequest(f"{what} must be a log sequence, a whole number of at least 1 (got {_shown(value)})")
    return int(value)


def limit(query: QueryParams, default: int, most: int) -> int:
    """`?limit=N`, 1..`most` (default `default`). Raises BadRequest."""
    value = query.get("limit")
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise BadRequest(f"limit must be a whole number from 1 to {most} (got {_shown(value)})")
    return int(value)


def optional_name(query: QueryParams, key: str) -> str | None:
    """`?key=<name>` or None when absent or empty. Raises BadRequest."""
    value = query.get(key)
    return None if value in (None, "") else name(value, key)


def optional_ident(query: QueryParams, key: str) -> str | None:
    """`?key=<id>` or None when absent or empty. Raises BadRequest."""
    value = query.get(key)
    return None if value in (None, "") else ident(value, key)


def optional_kind(query: QueryParams) -> str | None:
    """`?kind=note` or a prefix `?kind=memory.*`; None when absent. Raises BadRequest."""
    value = query.get("kind")
    if value in (None, ""):
        return None
    if not _KIND.fullmatch(value):
        raise BadRequest(f"kind must be a payload kind such as note or memory.* (got {_shown(value)})")
    return value


def as_of(query: QueryParams) -> int | datetime | None:
    """`?as_of=`: a log sequence, or an ISO 8601 time (UTC when it names no zone); None when
    absent. Raises BadRequest."""
    value = query.get("as_of")
    if value in (None, ""):
        return None
    if value.isdigit():
        return seq(value, "as_of")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(
            f"as_of must be a log sequence or an ISO 8601 time such as 2026-12-07T09:30 (got {_shown(value)})"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def unexpected(query: QueryParams, allowed: tuple[str, ...]) -> None:
    """Raise BadRequest naming a query parameter the endpoint does not take."""
    extra = sorted(set(query.keys()) - set(allowed))
    if extra:
        takes = ", ".join(allowed) if allowed else "none"
        raise BadRequest(f"unknown parameter {_shown(extra[0])}; this endpoint takes: {takes}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
