"""Entry point of a detached supervisor: `python -m agents.supervisor.main '<SupervisorLaunch>'`.

Started by `bus agent start` in its own session. It connects to the bus (to record lifecycle
events, and to hear an operator's stop request: bus.agent_control), serves its metrics (agents.supervisor.metrics, registered as a scrape target under
--home like each replica's: bus.scrape), runs the Supervisor until SIGTERM, SIGINT or a stop request, stops the
replicas gracefully, flushes its events and exits. Exit codes: 0 stopped, 1 crashed, 3 bus unreachable at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry

from agents.supervisor.control import SupervisorLaunch
from agents.supervisor.metrics import SupervisorCollector
from agents.supervisor.recorder import EventRecorder
from agents.supervisor.supervisor import Supervisor
from bus.agent_control import StopAnswer, StopRequest, listen_for_stop
from bus.client import Bus
from bus.errors import BusUnavailable
from bus.scrape import ScrapeTarget, add_process_metrics, serve_metrics, targets_dir

log = logging.getLogger("continuum.agents.supervisor")

EXIT_OK, EXIT_NO_BUS = 0, 3


async def serve(launch: SupervisorLaunch) -> None:
    """Supervise until SIGTERM/SIGINT. Raises BusUnavailable if the bus cannot be reached."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config = msgspec.structs.replace(launch.spec.bus, name="supervisor")
    registry = CollectorRegistry()
    add_process_metrics(registry)
    async with Bus(config, metrics_registry=registry) as bus:
        recorder = EventRecorder(bus)
        supervisor = Supervisor(launch.spec, launch.settings, recorder=recorder)
        registry.register(SupervisorCollector(supervisor.status, lambda: recorder.dropped))
        home = launch.settings.home
        target = ScrapeTarget.of("supervisor", namespace=config.namespace, agent=launch.spec.name)
        async with (
            serve_metrics(registry, target=target, targets_dir=targets_dir(Path(home)) if home else None),
            asyncio.TaskGroup() as tasks,
        ):
            recording = tasks.create_task(recorder.run())

            async def on_stop(request: StopRequest) -> StopAnswer:
                log.info("stopping %s: asked through the bus by %s (%s)", launch.spec.name, request.by,
                         request.reason or "no reason given")
                stop.set()
                return StopAnswer(agent=launch.spec.name, stopping=True, pid=os.getpid(),
                                  replicas=launch.spec.replicas, event_id=request.event_id)

            async with listen_for_stop(bus, launch.spec.name, on_stop):
                log.info("supervising %s (%s) with %d replica(s)", launch.spec.name, launch.spec.target,
                         launch.spec.replicas)
                await supervisor.run(stop)
            if not await recorder.flush(5.0):
                log.warning("stopped before every lifecycle event was recorded")
            recording.cancel()
    log.info("supervisor of %s stopped", launch.spec.name)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [supervisor {os.getpid()}] %(name)s %(message)s",
    )
    launch = msgspec.json.decode(args[0], type=SupervisorLaunch)
    try:
        asyncio.run(serve(launch))
    except Exception as exc:
        cause = exc
        while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        if isinstance(cause, BusUnavailable):
            log.error("cannot reach the bus: %s", cause)
            return EXIT_NO_BUS
        raise
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
