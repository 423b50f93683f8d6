"""Read side: the log folded into DuckDB views, kept current, queried over the bus.

    batch.py     records (read in order by bus.log_reader.LogReader) decoded once per batch into
                 the Arrow relation every fold reads
    views/       one module per view: its tables, public relations and fold
    store.py     the views file: generations, checkpoints, rebuild swap, lanes
    fold.py      a lane: one connection folding its views' share of a batch, exactly once
    runner.py    read -> decode -> fold pipeline, live and rebuild; progress.py: the watermark
    query.py     one read-only query on one connection, sandboxed
    service.py   the process that owns the file: folds, answers queries/status/rebuild
    rebuild.py, status.py, protocol.py   the operator's requests and their answers
    cli.py       `bus projections run|rebuild|status`, `bus query`
    bench.py     `bus bench` section; workload.py: a synthetic log for tests and benchmarks
"""

from projections.config import ProjectionSettings, QuerySettings
from projections.errors import (
    FoldError,
    ProjectionError,
    RebuildError,
    StoreLocked,
    StoreMismatch,
)
from projections.service import ProjectionService

__all__ = [
    "FoldError",
    "ProjectionError",
    "ProjectionService",
    "ProjectionSettings",
    "QuerySettings",
    "RebuildError",
    "StoreLocked",
    "StoreMismatch",
]
