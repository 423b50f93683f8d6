"""The projections' error tree, split by what the caller should do.

    ProjectionError
    ├── StoreLocked       another process holds the views file: stop it, or use another --db
    ├── StoreMismatch     the file belongs to another namespace, or is ahead of the log: fix the
    │                     configuration, or move the file away and let it be rebuilt
    ├── FoldError         a batch could not be applied for a reason other than its data (disk full,
    │                     out of memory): nothing of it was committed; retry later
    ├── RebuildError      a rebuild could not start or finish (unknown view, one already running)
    └── ArchiveError      the archive could not be written or read (disk full, permissions): nothing
        │                 sealed was changed; fix the cause and run again
        ├── ArchiveCorrupt  a segment file fails verification (unreadable, truncated, a hash or the
        │                   chain broken, a segment missing): restore it from a copy; nothing is
        │                   archived after it, nor the log trimmed, until then
        └── TrimRefused     a trim was refused before anything was purged (the views are behind
                            what it would purge, the archive is not this log's): see the message

Query failures are not exceptions on the service side: they are `schemas.query.QueryFailure`
answers, raised on the client as `bus.errors.QueryError`. Foreign errors (duckdb, nats, OS) are
translated here with `raise ... from`.
"""

from __future__ import annotations


class ProjectionError(Exception):
    """Base of every error the projections raise."""


class StoreLocked(ProjectionError):
    """The DuckDB file is open in another process (DuckDB's lock is exclusive, even read-only)."""


class StoreMismatch(ProjectionError):
    """The views file does not fit this log: another namespace, or a checkpoint past its end."""


class FoldError(ProjectionError):
    """A batch was not applied (rolled back) for a reason that does not lie in its events."""


class RebuildError(ProjectionError):
    """A rebuild was refused or failed; the views being served are unchanged."""


class ArchiveError(ProjectionError):
    """The archive could not be written or read; segments already sealed are unchanged."""


class ArchiveCorrupt(ArchiveError):
    """A segment file fails verification: unreadable or truncated, its records not what its
    metadata says, or the hash chain broken (a segment missing, replaced or reordered)."""


class TrimRefused(ArchiveError):
    """A trim was refused before anything was purged: the views have not applied what it would
    purge, or the archive does not hold this log's records."""
