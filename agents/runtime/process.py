"""Entry point of one agent replica process: `python -m agents.runtime.process '<spec json>'`.

The supervisor launches it with a `ProcessSpec` (JSON, first argument) and the write end of a
status pipe (file descriptor in CONTINUUM_STATUS_FD). Over the pipe the process reports, one
JSON object per line: `ready` once its consumers pull, then a `beat` every status interval with
its counters; both name the address of its metrics (bus.scrape: 127.0.0.1, a port of the kernel's
choosing, registered as a scrape target in `metrics_dir` when the spec gives one). When the pipe breaks (the supervisor is gone) the process stops gracefully, so an
orphaned replica does not go on unsupervised.

SIGTERM or SIGINT: stop fetching, finish in-flight handlers, record `agent.stopped`, exit 0.
Exit codes: 0 stopped on request, 1 crashed, 2 bad agent spec or class, 3 bus unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry

from agents.errors import AgentDefinitionError, AgentLoadError
from agents.runtime.loader import load_agent_class
from agents.runtime.output_log import DEFAULT_KEEP, DEFAULT_MAX_BYTES, keep_rotating
from agents.runtime.runner import AgentRuntime
from bus.config import BusConfig, ConsumerSettings
from bus.errors import BusUnavailable, ConfigurationError
from bus.scrape import ScrapeTarget, add_process_metrics, serve_metrics

log = logging.getLogger("continuum.agents.process")

STATUS_FD_ENV = "CONTINUUM_STATUS_FD"
EXIT_OK, EXIT_CRASH, EXIT_BAD_SPEC, EXIT_NO_BUS = 0, 1, 2, 3


class ProcessSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one replica process needs, handed over as JSON by the supervisor."""

    target: str
    name: str
    bus: BusConfig
    tags: list[str] = []
    replica: int = 0
    consumer: ConsumerSettings | None = None
    heartbeat_s: float = 5.0
    status_interval_s: float = 1.0
    # Put first on sys.path, so `module:Class` resolves like it did where `bus agent start` ran.
    workdir: str | None = None
    # The log file the supervisor made this process's stdout and stderr: rotated past
    # `log_max_bytes`, `log_keep` old files kept (agents.runtime.output_log).
    log_path: str | None = None
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_keep: int = DEFAULT_KEEP
    # Where to register this replica's metrics endpoint as a Prometheus file_sd target
    # (<home>/metrics-targets); None: serve the metrics, register nothing.
    metrics_dir: str | None = None


class StatusChannel:
    """The write end of the status pipe. Non-blocking: a stalled reader loses lines rather
    than stalling the agent's event loop."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    @classmethod
    def from_env(cls) -> "StatusChannel":
        raw = os.environ.get(STATUS_FD_ENV)
        return cls(int(raw) if raw else None)

    def send(self, **fields: object) -> bool:
        """Write one status line; False when the reader is gone (the pipe broke)."""
        if self._fd is None:
            return True
        try:
            os.write(self._fd, msgspec.json.encode(fields) + b"\n")
        except BlockingIOError:
            return True  # reader is slow; this line is dropped, the next one will do
        except (BrokenPipeError, OSError):
            return False
        return True


async def serve(spec: ProcessSpec, status: StatusChannel, started: float) -> None:
    """Run the replica until SIGTERM/SIGINT or until the supervisor goes away."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent_cls = load_agent_class(spec.target, spec.workdir)
    registry = CollectorRegistry()
    add_process_metrics(registry)
    runtime = AgentRuntime(
        agent_cls(), spec.bus, name=spec.name, tags=spec.tags, replica=spec.replica,
        consumer=spec.consumer, heartbeat_s=spec.heartbeat_s, started=started, metrics_registry=registry,
    )
    target = ScrapeTarget.of("agent", namespace=spec.bus.namespace, agent=runtime.name, replica=str(spec.replica))
    metrics_dir = Path(spec.metrics_dir) if spec.metrics_dir is not None else None
    async with serve_metrics(registry, target=target, targets_dir=metrics_dir) as endpoint:
        await _serve(spec, runtime, status, started, stop, endpoint.address)


async def _serve(
    spec: ProcessSpec, runtime: AgentRuntime, status: StatusChannel, started: float, stop: asyncio.Event, metrics: str
) -> None:
    done = asyncio.Event()
    is_ready = False

    def ready() -> None:
        nonlocal is_ready
        is_ready = True
        status.send(
            type="ready", pid=os.getpid(), start_ms=round((time.monotonic() - started) * 1e3, 1), metrics=metrics
        )

    async def run() -> None:
        try:
            await runtime.run(stop, on_ready=ready)
        finally:
            done.set()

    async def report() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), spec.status_interval_s)
            stats = runtime.stats
            state = "stopping" if stop.is_set() else "running"
            if not status.send(
                type="beat", state=state, ready=is_ready,
                in_flight=stats.in_flight, handled=stats.handled, failed=stats.failed, metrics=metrics,
            ) and not stop.is_set():
                log.warning("supervisor is gone (status pipe closed): stopping")
                stop.set()

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(run())
        tasks.create_task(report())
        if spec.log_path is not None:
            tasks.create_task(keep_rotating(
                Path(spec.log_path), max_bytes=spec.log_max_bytes, keep=spec.log_keep, stop=done,
            ))


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s %(message)s",
    )
    if len(args) != 1:
        log.error("usage: python -m agents.runtime.process '<ProcessSpec JSON>'")
        return EXIT_BAD_SPEC
    try:
        spec = msgspec.json.decode(args[0], type=ProcessSpec)
    except msgspec.DecodeError as exc:
        log.error("invalid process spec: %s", exc)
        return EXIT_BAD_SPEC
    try:
        asyncio.run(serve(spec, StatusChannel.from_env(), started))
    except Exception as exc:
        cause = _first_leaf(exc)
        if isinstance(cause, (AgentLoadError, AgentDefinitionError, ConfigurationError)):
            log.error("cannot run agent %s: %s", spec.target, cause)
            return EXIT_BAD_SPEC
        if isinstance(cause, BusUnavailable):
            log.error("agent %s cannot reach the bus: %s", spec.name, cause)
            return EXIT_NO_BUS
        raise  # a crash: the traceback goes to the replica's log, the exit code is 1
    return EXIT_OK


def _first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (task groups wrap what their tasks raise)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
