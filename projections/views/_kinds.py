"""`kinds_in(batch)`: the payload kinds a batch holds, so a view's fold can skip the statements
that have nothing to read (a fold of one event would otherwise plan and run every statement,
which dominates the latency from a write to its visibility)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow.compute as pc

if TYPE_CHECKING:
    from projections.batch import Batch


def kinds_in(batch: Batch) -> frozenset[str]:
    """The distinct non-null `kind`s of the batch's records."""
    return frozenset(k for k in pc.unique(batch.table.column("kind")).to_pylist() if k is not None)


def count_of(batch: Batch, kind: str) -> int:
    """How many of the batch's records have this `kind`."""
    return int(pc.sum(pc.equal(batch.table.column("kind"), kind)).as_py() or 0)
