"""The `bus` command with its output piped into a reader that stops early (`bus tail | head -2`):
it ends quietly and soon, exit 0, with no traceback and no "Broken pipe" on stderr. Run for real:
the installed entry point under bash, piped into `head`, against a real nats-server."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

from bus import Bus
from schemas.payloads import Note
from test_cli import BUS, cli_env, server_env  # noqa: F401  (fixtures)

_PIPE = 'set +e; "$@" 2>"$ERR_FILE" | head -n "$LINES"; echo "${PIPESTATUS[0]}" >"$CODE_FILE"'


class _Piped:
    """`bus ARGS 2>err | head -n LINES`, started; `code` and `stderr` once it ended."""

    def __init__(self, proc: asyncio.subprocess.Process, err: Path, code: Path) -> None:
        self.proc, self.err, self.code_file = proc, err, code

    @property
    def ended(self) -> bool:
        return self.proc.returncode is not None

    @property
    def code(self) -> int:
        return int(self.code_file.read_text())

    @property
    def stderr(self) -> str:
        return self.err.read_text()


async def _pipe_into_head(tmp_path: Path, env: dict[str, str], lines: int, *args: str) -> _Piped:
    err, code = tmp_path / "stderr.txt", tmp_path / "code.txt"
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", _PIPE, "piped", *BUS, *args,
        env={**env, "ERR_FILE": str(err), "CODE_FILE": str(code), "LINES": str(lines)},
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    return _Piped(proc, err, code)


def _quiet(stderr: str) -> bool:
    return "Traceback" not in stderr and "Broken pipe" not in stderr and "BrokenPipeError" not in stderr


async def test_tail_ends_quietly_when_its_reader_goes_away(tmp_path, server_env, bus: Bus) -> None:
    """`bus tail --all | head -2` ends once head has gone and tail has something more to print."""
    for i in range(3):
        await bus.send("alice", Note(text=f"before {i}"))
    piped = await _pipe_into_head(tmp_path, server_env, 2, "tail", "--all")
    assert piped.proc.stdout is not None
    first = [await asyncio.wait_for(piped.proc.stdout.readline(), 30) for _ in range(2)]
    assert all(b"alice" in line for line in first)
    # tail may have written everything it had into the pipe before head left; what it prints
    # next meets the closed pipe. Keep giving it something until the pipeline ends.
    async with asyncio.timeout(30):
        sent = 0
        while not piped.ended:
            await bus.send("alice", Note(text=f"after {sent}"))
            sent += 1
            try:
                await asyncio.wait_for(piped.proc.wait(), 0.2)
            except TimeoutError:
                pass
    assert piped.code == 0, piped.stderr
    assert _quiet(piped.stderr), piped.stderr


async def test_a_tail_with_more_than_a_pipe_buffer_to_print_ends_quietly(tmp_path, server_env, bus: Bus) -> None:
    """`bus tail --all --limit 400 | head -1`: more lines than the pipe holds are already stored,
    so tail meets the closed pipe on its own."""
    await asyncio.gather(*(bus.send("alice", Note(text="x" * 200)) for _ in range(400)))
    command = ("tail", "--all", "--limit", "400")
    piped = await _pipe_into_head(tmp_path, server_env, 1, *command)
    assert piped.proc.stdout is not None
    head = await asyncio.wait_for(piped.proc.stdout.read(), 60)
    await asyncio.wait_for(piped.proc.wait(), 60)
    assert len(head.decode().splitlines()) == 1
    assert piped.code == 0, f"{shlex.join(command)}: {piped.stderr}"
    assert _quiet(piped.stderr), piped.stderr
