"""Rewriting the views file into a fresh one, so no freed block keeps what was deleted.

DuckDB reuses freed blocks but never clears them: after a forget deleted an agent's rows
(projections.views._forget) and a checkpoint, their text can still be read from the file's free
blocks (measured: a deleted 400-character string stayed in the file through DELETE, CHECKPOINT
and an UPDATE of every other row). `rewrite_views_file` copies the live database into a new file
(`COPY FROM DATABASE`: tables, views, schemas, only live rows), syncs it and renames it over the
old one, then removes the WAL. The file must not be open elsewhere (the service stopped): DuckDB's
lock is exclusive, and a StoreLocked says who holds it. The running service does it itself after a
forget, between closing its file and opening it again (Store.reopen with `rewrite`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb

from projections.errors import StoreLocked
from projections.unsynced import wal_of


def rewrite_views_file(path: str | Path, *, wait_s: float = 0.0) -> int:
    """Rewrite the views file at `path` (see the module docstring); returns its new size in
    bytes. `wait_s`: how long to wait for this process's own last connection to it to close.
    Raises StoreLocked (another process has it open, or a connection of this one still does),
    FileNotFoundError, duckdb.Error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no views file at {path}")
    fresh = path.with_name(path.name + ".rewrite")
    fresh.unlink(missing_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # Not the store's configuration: while any connection of this process still holds
            # the database, DuckDB refuses this one instead of handing out that instance (whose
            # file is about to be replaced).
            con = duckdb.connect(str(path))
            break
        except duckdb.IOException as exc:
            raise StoreLocked(f"{path} is open in another process (stop the projection service first): {exc}") from exc
        except duckdb.ConnectionException as exc:
            if time.monotonic() >= deadline:
                raise StoreLocked(f"{path} is still open in this process: {exc}") from exc
            time.sleep(0.02)
    try:
        con.execute("CHECKPOINT").fetchall()
        con.execute(f"ATTACH '{_sql(fresh)}' AS fresh").fetchall()
        con.execute(f"COPY FROM DATABASE \"{_database_name(con)}\" TO fresh").fetchall()
        con.execute("DETACH fresh").fetchall()
    finally:
        con.close()
    with open(fresh, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(fresh, path)
    wal_of(path).unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path.stat().st_size


def _database_name(con: duckdb.DuckDBPyConnection) -> str:
    row = con.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def _sql(path: Path) -> str:
    return str(path).replace("'", "''")
