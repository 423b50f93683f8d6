"""A stdio MCP server for the tests of LLM agents' MCP tools (run as a script by the agent).

    python mcp_ledger_server.py --ledger PATH [--work-ms N] [--http PORT]

Over stdio by default; with `--http PORT`, streamable HTTP at http://127.0.0.1:PORT/mcp.

Tools:
    append(entry)      appends `<key> <entry>` to the ledger, once per idempotency key: the key
                       is looked up and the line written under an exclusive lock of the file, so
                       a repeated key (a call re-run after a crash, even by a second server
                       process while the first one finishes) answers with the line kept before;
                       every call, repeated or not, is logged to `<ledger>.attempts`
    echo(text, times)  the text, the idempotency key it got and this server's pid
    hang(seconds)      sleeps (a server that does not answer)
    crash()            exits at once, mid-call (a server that crashes)
    fail()             raises (a tool that fails: an isError result)

`--work-ms` is the work of an append between its attempt log and its effect, so a kill can land
in the middle of a call. The server exits when its parent (the agent) dies, as an orphan would
otherwise finish its call and wait on a stdin nobody closes.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import threading
import time

import anyio
from mcp.server.mcpserver import Context, MCPServer

# The request `_meta` key the agent sends (agents.mcp.spec.IDEMPOTENCY_KEY; the tests check
# they agree). This script runs outside the repo's import path, so it is spelled out here.
IDEMPOTENCY_KEY = "continuum/idempotency_key"


class Ledger:
    """An append-only file of `<key> <entry>` lines, appended once per key across processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._attempts = os.open(f"{path}.attempts", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def attempt(self, key: str, entry: str) -> None:
        os.write(self._attempts, f"{key} {entry}\n".encode())

    def append_once(self, key: str, entry: str) -> int:
        """Append the line unless `key` is in the ledger; the line number that holds the key."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # lookup and append are one step for every process
            with open(fd, "rb", closefd=False) as existing:
                lines = existing.read().splitlines()
            for number, line in enumerate(lines, start=1):
                if line.split(b" ", 1)[0] == key.encode():
                    return number
            os.write(fd, f"{key} {entry}\n".encode())  # one write: a kill leaves whole lines
            return len(lines) + 1
        finally:
            os.close(fd)  # releases the lock


def build(ledger: Ledger, work_s: float) -> MCPServer:
    server = MCPServer("continuum-test-ledger")

    @server.tool()
    async def append(entry: str, ctx: Context) -> str:
        """Append an entry to the ledger, once per idempotency key."""
        key = _key(ctx) or f"unkeyed-{time.time_ns()}"
        ledger.attempt(key, entry)
        await anyio.sleep(work_s)
        number = ledger.append_once(key, entry)
        return f"appended {entry} as line {number}"

    @server.tool()
    async def echo(text: str, ctx: Context, times: int = 1) -> str:
        """Say the text back, with the idempotency key received and this server's pid."""
        return f"{text * times} key={_key(ctx)} pid={os.getpid()}"

    @server.tool()
    async def hang(seconds: float = 3600.0) -> str:
        """Sleep, answering nothing meanwhile."""
        await anyio.sleep(seconds)
        return "woke up"

    @server.tool()
    async def crash() -> str:
        """Exit the server process in the middle of the call."""
        os._exit(3)

    @server.tool()
    async def fail() -> str:
        """A tool that always fails."""
        raise ValueError("the ledger is closed today")

    return server


def _key(ctx: Context) -> str | None:
    meta = ctx.request_context.meta or {}
    key = meta.get(IDEMPOTENCY_KEY)
    return key if isinstance(key, str) else None


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--work-ms", type=float, default=0.0)
    parser.add_argument("--http", type=int, default=None, metavar="PORT")
    options = parser.parse_args()
    _exit_with_parent()
    server = build(Ledger(options.ledger), options.work_ms / 1000)
    if options.http is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=options.http)
