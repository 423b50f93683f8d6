"""Which SQL the query service runs: exactly one SELECT, reading only the relations of the views
file and a few value-generating table functions.

This is the statement-level wall beside the thread sandbox (projections.sandbox): it needs no
kernel support and covers DuckDB worker threads too. DuckDB reads files through two doors a
SELECT can name, and both are checked here as a whole, on DuckDB's own parse tree
(`json_serialize_sql`), before anything is bound or run:

- table functions: only those in `TABLE_FUNCTIONS` (none of them touches a file); any other
  (read_csv, read_blob, glob, query, parquet_metadata, a future reader...) is refused.
- relation names: DuckDB falls back to a "replacement scan" (reading `name` as a file path)
  when a name is not in its catalog. An unqualified plain identifier cannot name a file (the
  file readers need an extension); any other name (quoted paths, `schema.table`, which DuckDB
  also tries as a path like `secret.csv`) must name a table or view that exists.

Every other statement kind (COPY, ATTACH, SET, PRAGMA, INSTALL, ...) is refused outright.
"""

from __future__ import annotations

import re
from typing import Any

import duckdb
import msgspec

from projections.scopes import AGENT_ROWS, readable
from schemas.query import QueryFailure, failure

__all__ = ["TABLE_FUNCTIONS", "check"]

TABLE_FUNCTIONS = frozenset({
    # rows from values
    "range", "generate_series", "unnest", "json_each", "json_tree",
    # the catalog (what DESCRIBE, SHOW and information_schema read too)
    "duckdb_tables", "duckdb_views", "duckdb_columns", "duckdb_schemas", "duckdb_types",
    "duckdb_constraints", "duckdb_indexes", "duckdb_functions", "duckdb_keywords",
})

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_tree = msgspec.json.Decoder()
_RELATIONS = (
    "SELECT database_name, schema_name, table_name FROM duckdb_tables() "
    "UNION ALL SELECT database_name, schema_name, view_name FROM duckdb_views()"
)


def check(cursor: duckdb.DuckDBPyConnection, sql: str, scope: str | None = None) -> QueryFailure | None:
    """Why `sql` is not run (a `bad_sql` or `not_allowed` failure), or None when it may be.
    With a `scope` (an agent's name), it may also name only the views that scope reads,
    unqualified, and WITH names of its own that are no view's name (projections.scopes).
    Parses on `cursor` (outside any transaction; nothing is bound or run). Never raises for
    anything in `sql`."""
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        return failure("bad_sql", str(exc))
    if len(statements) != 1:
        return failure("not_allowed", f"send exactly one statement per query (got {len(statements)})")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        name = str(kind).rsplit(".", 1)[-1]
        return failure("not_allowed", f"only SELECT queries are answered (this is {name}); the views are read-only")
    try:
        serialized = cursor.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
        tree = _tree.decode(serialized[0]) if serialized else None
    except RecursionError:
        return failure("bad_sql", "the query is nested too deeply to be checked")
    except (duckdb.Error, msgspec.DecodeError) as exc:
        return failure("bad_sql", f"the query could not be checked: {exc}")
    if not isinstance(tree, dict) or tree.get("error"):
        why = tree.get("error_message") if isinstance(tree, dict) else "no parse tree"
        return failure("not_allowed", f"this SELECT form cannot be checked, so it is not answered: {why}")
    try:
        return _references(cursor, tree, scope)
    except duckdb.Error as exc:  # (reading the catalog)
        return failure("internal", f"the query could not be checked: {type(exc).__name__}: {exc}")


def _references(cursor: duckdb.DuckDBPyConnection, tree: dict[str, Any], scope: str | None) -> QueryFailure | None:
    """Walks the parse tree without recursion (its depth follows the SQL's nesting)."""
    named: list[list[str]] = []
    with_names: set[str] = set()
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if kind == "TABLE_FUNCTION":
            refusal = _table_function(node.get("function"))
            if refusal is not None:
                return refusal
        elif kind == "BASE_TABLE" or (kind == "SHOW_REF" and node.get("show_type") == "SHOW"):
            named.append(_path(node))
        ctes = node.get("cte_map")
        if isinstance(ctes, dict) and isinstance(ctes.get("map"), list):
            with_names.update(str(e.get("key", "")).lower() for e in ctes["map"] if isinstance(e, dict))
        stack.extend(value for value in node.values() if isinstance(value, (dict, list)))
    if scope is not None:
        refusal = _out_of_scope(cursor, named, with_names, scope)
        if refusal is not None:
            return refusal
    unknown = [path for path in named if not (len(path) == 1 and _PLAIN.match(path[0]))]
    if not unknown:
        return None
    existing = {tuple(part.lower() for part in row) for row in cursor.execute(_RELATIONS).fetchall()}
    for path in unknown:
        if not _exists([part.lower() for part in path], existing):
            name = ".".join(path)
            if all(_PLAIN.match(part) for part in path):
                return failure("bad_sql", f"there is no view or table {name}")
            return failure(
                "not_allowed",
                f"{name!r} is not a view or table of the views file; the query service reads no files",
            )
    return None


def _out_of_scope(
    cursor: duckdb.DuckDBPyConnection, named: list[list[str]], with_names: set[str], scope: str
) -> QueryFailure | None:
    relations = {row[2].lower() for row in cursor.execute(_RELATIONS).fetchall()}
    shadowing = sorted(name for name in with_names if name in relations or readable(name))
    if shadowing:
        return failure("not_allowed", f"a WITH name may not be a view's name in an agent's query ({', '.join(shadowing)})")
    for path in named:
        if len(path) != 1:
            return failure(
                "not_allowed",
                f"{'.'.join(path)}: an agent's query names views unqualified (it reads them in its own scope)",
            )
        name = path[0].lower()
        if name not in with_names and not readable(name):
            return failure(
                "not_allowed",
                f"{path[0]} is not readable by agent {scope!r} (an agent reads: {', '.join(sorted(AGENT_ROWS))})",
            )
    return None


def _table_function(function: Any) -> QueryFailure | None:
    name = function.get("function_name") if isinstance(function, dict) else None
    qualifiers = [function.get(key) for key in ("catalog", "schema")] if isinstance(function, dict) else []
    allowed = isinstance(name, str) and name.lower() in TABLE_FUNCTIONS
    if allowed and all(q in ("", None, "main", "system") for q in qualifiers):
        return None
    return failure(
        "not_allowed",
        f"table function {name}() is not available: queries read the views only "
        f"(table functions allowed: {', '.join(sorted(TABLE_FUNCTIONS))})",
    )


def _path(node: dict[str, Any]) -> list[str]:
    qualified = node.get("qualified_name")
    path = qualified.get("path") if isinstance(qualified, dict) else None
    if isinstance(path, list) and path and all(isinstance(part, str) for part in path):
        return path
    parts = [node.get("catalog_name"), node.get("schema_name"), node.get("table_name")]
    return [part for part in parts if isinstance(part, str) and part] or [""]


def _exists(path: list[str], existing: set[tuple[str, ...]]) -> bool:
    if len(path) == 1:
        return any(table == path[0] for _, _, table in existing)
    if len(path) == 2:
        first, table = path
        return any(t == table and (schema == first or (db == first and schema == "main")) for db, schema, t in existing)
    if len(path) == 3:
        return tuple(path) in existing
    return False
