"""Keep one child command running: restart it with backoff when it crashes.

`bus up` runs the projection service under this, in the foreground and detached alike:

    python -m bus.cli.keeper -- <command...>

The service folds the log into its views; if it dies (a fault, the OOM killer, a bug), queries
have nobody to answer them until it is back. A record that crashed it is recognised on the next
start (projections.crashes), so a restart is what lets it get past that record.

How the child ended decides what happens next:
    exit 0                      it was stopped (or finished): the keeper exits 0
    exit 2                      it refused to run (its configuration: another instance holds
                                the views file, the file folds another stream): no restart,
                                the keeper exits 2 (restarting would only repeat the refusal)
    anything else, or a signal  a crash: restarted after a backoff (0.5 s doubling to 30 s,
                                back to 0.5 s once a run lasted 60 s)
SIGTERM or SIGINT to the keeper is passed on to the child; the keeper waits for it and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

import msgspec

log = logging.getLogger("continuum.keeper")

EXIT_REFUSED = 2


class KeeperPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Restart backoff: `initial_s` doubling up to `max_s`; a run of `healthy_s` resets it."""

    initial_s: float = 0.5
    max_s: float = 30.0
    healthy_s: float = 60.0
    stop_grace_s: float = 10.0


def describe_exit(code: int) -> str:
    """'exit 1' or 'signal SIGSEGV' for a child's return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit {code}"


async def keep(command: Sequence[str], stop: asyncio.Event, policy: KeeperPolicy = KeeperPolicy()) -> int:
    """Run `command` until `stop` is set or it ends in a way not worth a restart; returns the
    keeper's exit code (0 stopped or finished, 2 refused). Raises OSError if it cannot start."""
    loop = asyncio.get_running_loop()
    delay = policy.initial_s
    while True:
        started = loop.time()
        child = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
        log.info("started %s (pid %d)", command[0], child.pid)
        waiting = asyncio.ensure_future(child.wait())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not waiting.done():
            await _stop(child, waiting, policy.stop_grace_s)
            return 0
        code = waiting.result()
        if code == 0:
            return 0
        if code == EXIT_REFUSED:
            log.error("the child refused to run (exit %d): not restarting it", code)
            return EXIT_REFUSED
        if loop.time() - started >= policy.healthy_s:
            delay = policy.initial_s
        log.error("the child ended with %s; restarting it in %.1fs", describe_exit(code), delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return 0
        except TimeoutError:
            pass
        delay = min(delay * 2, policy.max_s)


async def _stop(child: asyncio.subprocess.Process, waiting: asyncio.Future[int], grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        child.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(waiting), grace_s)
    except TimeoutError:
        log.warning("the child did not stop within %.1fs; killing it", grace_s)
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await waiting


async def _main(command: list[str]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return await keep(command, stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args:
        log.error("usage: python -m bus.cli.keeper -- <command...>")
        return EXIT_REFUSED
    try:
        return asyncio.run(_main(args))
    except OSError as exc:
        log.error("cannot start %s: %s", args[0], exc)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
