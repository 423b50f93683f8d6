"""Which relations a query reads, from DuckDB's parser alone (nothing is bound or run).

A read-your-writes query waits only for the fold lanes of the views it reads; this tells the
service which those are. The SQL is parsed by `json_serialize_sql` on a private in-memory
connection; the parse tree's base tables, minus the names its CTEs define, are the relations.
"""

from __future__ import annotations

import threading
from typing import Any

import duckdb
import msgspec

from projections.recent import Recent

_tree = msgspec.json.Decoder()


class RelationReader:
    """Parses queries for their relation names, remembering the answers for the most recent
    distinct queries (clients repeat the same SQL with new parameters). Thread-safe; `close()`
    when done."""

    def __init__(self, *, remember: int = 1024) -> None:
        self._con = duckdb.connect(":memory:", config={"enable_external_access": False})
        self._lock = threading.Lock()
        self._known: Recent[str, frozenset[str] | None] = Recent(remember)

    def known(self, sql: str) -> tuple[bool, frozenset[str] | None]:
        """`(True, names)` if `sql` was parsed before (no parsing now: cheap enough for the event
        loop), else `(False, None)`."""
        with self._lock:
            return self._known.lookup(sql)

    def names(self, sql: str) -> frozenset[str] | None:
        """The lower-cased names of the tables and views `sql` reads (schema dropped); None if
        it does not parse. A CTE's own name is not a relation read."""
        hit, names = self.known(sql)
        if hit:
            return names
        with self._lock:
            serialized = self._con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
        tree = _tree.decode(serialized[0]) if serialized else None
        if not isinstance(tree, dict) or tree.get("error"):
            names = None
        else:
            tables: set[str] = set()
            ctes: set[str] = set()
            _walk(tree.get("statements"), tables, ctes)
            names = frozenset(tables - ctes)
        with self._lock:
            self._known.add(sql, names)
        return names

    def close(self) -> None:
        with self._lock:
            self._con.close()


def _walk(node: Any, tables: set[str], ctes: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, tables, ctes)
    elif isinstance(node, dict):
        if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
            tables.add(node["table_name"].lower())
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            for entry in cte_map.get("map") or ():
                if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                    ctes.add(entry["key"].lower())
        for value in node.values():
            if isinstance(value, (dict, list)):
                _walk(value, tables, ctes)
