"""Typed, frozen settings of the archive, built in entry points and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from projections.archive.retention import TrimSettings

ARCHIVE_DIR = "archive"
# Records per segment file at most: ~40-80 MB of memory while one is cut, a file of a few tens of
# MB, read whole by a rebuild in one pass.
DEFAULT_SEGMENT_RECORDS = 100_000
# Rows per Parquet row group: the unit a point lookup reads (min/max statistics on `seq`, `id`
# and `stored_at` let DuckDB skip the others).
DEFAULT_ROW_GROUP_RECORDS = 16_384
# zstd's fastest level: against level 3, measured on 300k synthetic events, sealing took 10-20% less
# CPU (2.2-2.5 s against 2.4-3.2 s) and the files came out smaller, not larger (31 MB against 34:
# the segments' repetitive columns gain nothing from the slower levels' longer matches).
DEFAULT_ZSTD_LEVEL = 1


@dataclass(frozen=True, kw_only=True)
class ArchiveSettings:
    """Where one namespace's archive lives and how its segments are cut.

    directory         `<BUS_HOME>/archive/<namespace>/` by default (see `for_home`)
    segment_records   records per segment at most (default 100,000)
    row_group_records rows per Parquet row group (default 16,384)
    zstd_level        the files' zstd level (default 1)
    seal_partial      also seal the records after the last full segment (default False: only
                      full segments are cut, so a scheduled run never leaves a trail of small
                      files; `bus archive run --all` sets it)
    object_store      also copy every segment to the NATS Object Store bucket
                      `CONTINUUM_ARCHIVE_<NS>` (replicated like the log) and trim the log only
                      below segments whose copy is verified there (default False: the local
                      directory only; `bus archive run --object-store`, BUS_ARCHIVE_OBJECT_STORE=1)
    """

    directory: Path
    segment_records: int = DEFAULT_SEGMENT_RECORDS
    row_group_records: int = DEFAULT_ROW_GROUP_RECORDS
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    seal_partial: bool = False
    object_store: bool = False

    def __post_init__(self) -> None:
        if self.segment_records < 1 or self.row_group_records < 1:
            raise ValueError("segment_records and row_group_records must be at least 1")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level must be 1..22 (got {self.zstd_level})")

    @classmethod
    def for_home(cls, home: str | Path, namespace: str, **overrides: object) -> ArchiveSettings:
        """The settings of `namespace`'s archive under the bus home `home`."""
        return cls(directory=Path(home) / ARCHIVE_DIR / namespace, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class ArchivePolicy:
    """When the projection service archives by itself (off unless given).

    interval_s   how often it looks for full segments to seal (default 300 s)
    settings     what to archive where (full segments only: `seal_partial` is ignored)
    trim         after each run, trim the log by this retention policy (None: never)
    """

    settings: ArchiveSettings
    interval_s: float = 300.0
    trim: TrimSettings | None = None

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("interval_s must be more than 0")
