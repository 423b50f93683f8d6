"""The keeper that `bus up` runs the projection service under: a crash is restarted with
backoff, a refusal (exit 2) or a clean exit is not, and stopping the keeper stops its child.
Real child processes (small Python scripts), no mocks."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bus.cli.keeper import KeeperPolicy, KeeperStatus, describe_exit, keep
from conftest import wait_for

QUICK = KeeperPolicy(initial_s=0.05, max_s=0.2, healthy_s=60.0, stop_grace_s=5.0)


def script(tmp_path: Path, body: str) -> list[str]:
    """A child that appends one line to runs.txt per start, then does `body`."""
    path = tmp_path / "child.py"
    path.write_text(
        "import os, signal, sys, time\n"
        f"runs = open({str(tmp_path / 'runs.txt')!r}, 'a'); runs.write('run\\n'); runs.close()\n"
        "n = len(open(" + repr(str(tmp_path / "runs.txt")) + ").read().splitlines())\n" + body
    )
    return [sys.executable, str(path)]


def runs(tmp_path: Path) -> int:
    path = tmp_path / "runs.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_a_crashing_child_is_restarted_until_it_finishes(tmp_path: Path) -> None:
    """Exit 1, then a fatal signal, then a clean exit: restarted twice, then the keeper exits 0."""
    command = script(tmp_path, "if n == 1: sys.exit(1)\nif n == 2: os.kill(os.getpid(), signal.SIGSEGV)\nsys.exit(0)\n")
    status = KeeperStatus()
    code = await asyncio.wait_for(keep(command, asyncio.Event(), QUICK, status), 30)
    assert (code, runs(tmp_path)) == (0, 3)
    assert (status.restarts, status.running) == (2, False)


async def test_a_refusal_is_not_restarted(tmp_path: Path) -> None:
    """Exit 2 means the child will not run like this (another instance holds its file): the
    keeper does not repeat it, and exits 2 itself."""
    code = await asyncio.wait_for(keep(script(tmp_path, "sys.exit(2)\n"), asyncio.Event(), QUICK), 30)
    assert (code, runs(tmp_path)) == (2, 1)


async def test_stopping_the_keeper_stops_the_child(tmp_path: Path) -> None:
    """Stop set while the child runs: the child gets SIGTERM (it writes that it did) and the
    keeper exits 0 without starting another."""
    body = (
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(tmp_path / 'term.txt')!r}, 'w').write('t'), sys.exit(0)))\n"
        "while True: time.sleep(0.05)\n"
    )
    stop = asyncio.Event()
    kept = asyncio.create_task(keep(script(tmp_path, body), stop, QUICK))
    await wait_for(lambda: runs(tmp_path) == 1, timeout_s=20, what="the child to start")
    stop.set()
    assert await asyncio.wait_for(kept, 20) == 0
    assert (tmp_path / "term.txt").read_text() == "t" and runs(tmp_path) == 1


def test_exits_are_described_by_code_or_signal() -> None:
    """A return code reads as the exit code, or as the signal's name."""
    assert (describe_exit(1), describe_exit(-11), describe_exit(-200)) == ("exit 1", "signal SIGSEGV", "signal 200")
