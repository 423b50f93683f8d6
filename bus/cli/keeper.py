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

With `--metrics-home H --child NAME --namespace NS`, the keeper is a scrape target of that home
itself (`keeper.<ns>.<name>.json`, bus.scrape): whether its child runs (`continuum_child_up`), how
often it restarted it (`continuum_keeper_restarts_total`) and its own `process_*` figures; with
`--monitor-url URL` too (a detached `bus up`, which exits at once), the server's own figures from
its /varz, as a foreground `bus up` serves them (bus.cli.up_metrics):

    python -m bus.cli.keeper --metrics-home .continuum --child projections --namespace default \
        [--monitor-url http://127.0.0.1:8222] -- <command...>
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("continuum.keeper")

EXIT_REFUSED = 2


class KeeperPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Restart backoff: `initial_s` doubling up to `max_s`; a run of `healthy_s` resets it."""

    initial_s: float = 0.5
    max_s: float = 30.0
    healthy_s: float = 60.0
    stop_grace_s: float = 10.0


class KeeperStatus:
    """What `keep` reports as it goes: whether the child runs now, and how often it was restarted."""

    def __init__(self) -> None:
        self.running = False
        self.restarts = 0

    def ended(self, _waiting: asyncio.Future[int]) -> None:
        self.running = False


def describe_exit(code: int) -> str:
    """'exit 1' or 'signal SIGSEGV' for a child's return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit {code}"


async def keep(
    command: Sequence[str], stop: asyncio.Event, policy: KeeperPolicy = KeeperPolicy(),
    status: KeeperStatus | None = None,
) -> int:
    """Run `command` until `stop` is set or it ends in a way not worth a restart; returns the
    keeper's exit code (0 stopped or finished, 2 refused); `status` follows it. Raises OSError
    if it cannot start."""
    loop = asyncio.get_running_loop()
    delay = policy.initial_s
    status = status or KeeperStatus()
    first = True
    while True:
        started = loop.time()
        child = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
        if not first:
            status.restarts += 1
        first = False
        status.running = True
        log.info("started %s (pid %d)", command[0], child.pid)
        waiting = asyncio.ensure_future(child.wait())
        waiting.add_done_callback(status.ended)
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


class _Options(msgspec.Struct, frozen=True, kw_only=True):
    """The keeper's own options (before `--`)."""

    metrics_home: Path | None = None
    child: str = "child"
    namespace: str = "default"
    monitor_url: str | None = None


class _RestartsCollector(Collector):
    """`continuum_keeper_restarts_total`, read from the status at scrape time."""

    def __init__(self, status: KeeperStatus, child: str) -> None:
        self._status = status
        self._child = child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("continuum_keeper_restarts", "Times the keeper started its child again "
                                     "after it crashed.", labels=["child"])
        family.add_metric([self._child], float(self._status.restarts))
        yield family


def _keeper_metrics(status: KeeperStatus, options: _Options) -> CollectorRegistry:
    from bus.cli.up_metrics import up_metrics  # (only a keeper serving metrics needs them)

    registry = up_metrics(lambda: [(options.child, status.running)], options.monitor_url)
    registry.register(_RestartsCollector(status, options.child))
    return registry


@contextlib.asynccontextmanager
async def _served(status: KeeperStatus, options: _Options) -> AsyncIterator[None]:
    """Serve the keeper's metrics while it runs, when asked to (see the module docstring)."""
    if options.metrics_home is None:
        yield
        return
    from bus.cli.common import metrics_endpoint  # (only a keeper serving metrics needs them)
    from bus.scrape import ScrapeTarget

    target = ScrapeTarget.of("keeper", namespace=options.namespace, child=options.child)
    async with metrics_endpoint(_keeper_metrics(status, options), None, target, options.metrics_home):
        yield


async def _main(command: list[str], options: _Options) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    status = KeeperStatus()
    async with _served(status, options):
        return await keep(command, stop, status=status)


def _parse(argv: list[str]) -> tuple[_Options, list[str]]:
    """(the keeper's options, the child's command). Raises SystemExit (usage) for bad options."""
    own, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    parser = argparse.ArgumentParser(prog="python -m bus.cli.keeper", description="Keep one command running.")
    parser.add_argument("--metrics-home", type=Path, default=None)
    parser.add_argument("--child", default="child")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--monitor-url", default=None)
    parsed = parser.parse_args(own)
    return _Options(metrics_home=parsed.metrics_home, child=parsed.child, namespace=parsed.namespace,
                    monitor_url=parsed.monitor_url), command


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        options, args = _parse(list(sys.argv[1:] if argv is None else argv))
    except SystemExit:
        return EXIT_REFUSED
    if not args:
        log.error("usage: python -m bus.cli.keeper [--metrics-home H --child NAME --namespace NS "
                  "[--monitor-url URL]] -- <command...>")
        return EXIT_REFUSED
    try:
        return asyncio.run(_main(args, options))
    except OSError as exc:
        log.error("cannot start %s: %s", args[0], exc)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
