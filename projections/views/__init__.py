"""The views: one module per view, each holding its tables (DDL), its public relations and its
fold. `VIEWS` lists them; adding a view is writing a module like `events.py` and adding it here.

A view module defines:

    NAME       the view's name (its checkpoint and generation are kept under it)
    VERSION    bump it when the tables or the fold change: the view is then rebuilt from
               sequence 1 in the background while the old version keeps serving
    TABLES     DDL creating its tables in schema `{s}` (statements separated by ';'; `{s}` is
               replaced by `render`, never str.format)
    RELATIONS  public name -> SELECT over `{s}` (what queries see, as views in `main`)
    fold(tx, s, batch) -> int
               apply one batch: SQL over the relation `batch` (see projections.batch) into the
               tables of schema `s`; returns the rows it wrote. Synchronous and pure with respect
               to I/O: no awaiting, no network, no clock. It must give the same tables whatever
               the batch boundaries (the store checks rebuilt == incremental by content hash).

Folds run inside the store's transaction, which also advances the checkpoint. Folds of
different views may run at the same time on different connections: a fold reads `batch` and
writes only the tables of its own schema `s`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:
    from projections.batch import Batch


class Tx:
    """What a fold may do: run SQL on the store's writer connection, inside its transaction.
    Every result is consumed (DuckDB 2.0 requires it before the next statement).

    The transaction begins with the first statement, and the batch is registered as the relation
    `batch` with the first that names it: a batch that no view of a lane has a statement for
    costs that lane nothing (see `fold.Lane`)."""

    def __init__(self, con: Any) -> None:
        self._con = con
        self.begun = False
        self._table: Any = None
        self._registered: Any = None

    def use(self, table: Any) -> None:
        """Make `table` (Arrow) the relation `batch` for the statements that follow."""
        self._table = table

    def begin(self) -> None:
        """Open the transaction now, if it is not open yet."""
        if not self.begun:
            self._con.execute("BEGIN TRANSACTION").fetchall()
            self.begun = True

    def release(self) -> None:
        """Unregister `batch` (the transaction is the caller's to end). Never raises: it runs in
        a `finally`, where an error would replace the one that is being raised."""
        if self._registered is None:
            return
        self._registered = None
        try:
            self._con.unregister("batch")
        except duckdb.Error:
            # A transaction aborted by a failed statement (out of memory, say) refuses even this
            # until it is rolled back.
            with contextlib.suppress(duckdb.Error):
                self._con.execute("ROLLBACK")
            with contextlib.suppress(duckdb.Error):
                self._con.unregister("batch")

    def run(self, sql: str, params: list[Any] | None = None) -> int:
        """Execute one statement; return the row count it reports (0 for DDL)."""
        rows = self.rows(sql, params)
        return int(rows[0][0]) if rows and rows[0] and isinstance(rows[0][0], int) else 0

    def rows(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Execute a query and return its rows (avoid TIMESTAMPTZ columns: fetch epochs instead)."""
        self.begin()
        # Registering costs ~0.5 ms: only for a statement that may read the relation (a
        # statement with the record's fields bound as parameters does not).
        if self._table is not self._registered and "batch" in sql:
            self._con.register("batch", self._table)
            self._registered = self._table
        return self._con.execute(sql, params).fetchall() if params else self._con.execute(sql).fetchall()


Fold = Callable[[Tx, str, "Batch"], int]


@dataclass(frozen=True)
class ViewSpec:
    """One view, as read from its module."""

    name: str
    version: int
    tables: str
    relations: Mapping[str, str]
    fold: Fold
    doc: str = ""
    lane: str = "log"

    @classmethod
    def from_module(cls, module: ModuleType, *, lane: str = "log") -> ViewSpec:
        return cls(
            name=module.NAME,
            version=module.VERSION,
            tables=module.TABLES,
            relations=dict(module.RELATIONS),
            fold=module.fold,
            doc=(module.__doc__ or "").strip(),
            lane=lane,
        )

    def ddl(self, schema: str) -> list[str]:
        """The CREATE statements of this view's tables in `schema`."""
        return [stmt.strip() for stmt in render(self.tables, schema).split(";") if stmt.strip()]

    def public(self, schema: str) -> dict[str, str]:
        """Public relation name -> SELECT over `schema`."""
        return {name: render(select, schema) for name, select in self.relations.items()}


def render(template: str, schema: str) -> str:
    """`template` with `{s}` replaced by the (generated, trusted) schema name. Not str.format:
    SQL is full of braces (JSON, struct literals)."""
    return template.replace("{s}", schema)


from projections.views import (
    agents,
    blocks,
    contradictions,
    conversations,
    dead_letters,
    events,
    facts,
    integrity,
    llm_calls,
    messages,
    recall,
    steps,
)

# The fold lanes and their views, in fold order. Each lane is one DuckDB connection on its own
# thread; the lanes of a batch fold at once, and a query waiting for its own write (`min_seq`) is
# released when the lanes of the views it reads have committed. Views read together share a lane:
# the bus's own views, the agents' runtime views, and memory (so a memory write is visible after
# the memory lane's statements alone, not behind every view's). `conversations` folds with the
# runtime views: on a log of messages and agent events that evens the two busy lanes' work
# (measured per 25k events: log 194 ms and runtime 107 ms with it in `log`). `messages` folds
# in a lane of its own: with `events` (whose compressed columns make the biggest commit) it was
# the critical path of every bulk fold, 5.8 s of a 6.5 s rebuild of 1M archived events while
# the other lanes were busy 1.9 s and 1.4 s; split, the lanes even out over the two cores
# (rebuild 4.4-5.0 s, bulk fold 127k events/s from 76-90k).
LANES: dict[str, tuple[ModuleType, ...]] = {
    "log": (events, dead_letters),
    "runtime": (agents, integrity, steps, llm_calls, conversations),
    "memory": (facts, contradictions, blocks, recall),
    "delivery": (messages,),
}

VIEWS: tuple[ViewSpec, ...] = tuple(
    ViewSpec.from_module(module, lane=lane) for lane, modules in LANES.items() for module in modules
)

__all__ = ["LANES", "VIEWS", "Fold", "Tx", "ViewSpec", "render"]
