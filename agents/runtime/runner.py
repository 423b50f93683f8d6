"""`AgentRuntime`: runs one Agent instance on the bus, in the current process.

    runtime = AgentRuntime(Greeter(), BusConfig(url=...), replica=0)
    await runtime.run(stop_event, on_ready=...)

It registers the agent's payload types, connects a `Bus` under the agent's name, starts the
consumer engine over the agent's inbox and tags, records `agent.started` once it is pulling,
heartbeats at a bounded rate, and on `stop` drains in-flight work and records `agent.stopped`.
The supervisor runs one of these per OS process (agents/runtime/process.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from agents.runtime.agent import Agent, HandlerTable
from agents.runtime.context import Context
from bus.client import Bus
from bus.config import BusConfig, ConsumerSettings, check_name
from bus.errors import BusError, PermanentError
from schemas import Delivery, Envelope, Payload, PayloadRegistry
from schemas.payloads import AgentHeartbeat, AgentStarted, AgentStopped, RequestFailed
from schemas.payloads.messaging import NO_REPLY

log = logging.getLogger("continuum.agents.runtime")


class RuntimeStats:
    """Counters of one runtime, read by heartbeats and the supervisor's status channel."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.monotonic() if started is None else started
        self.in_flight = 0
        self.handled = 0
        self.failed = 0

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started


class AgentRuntime:
    """One agent instance connected to the bus. `run()` may be called once."""

    def __init__(
        self,
        agent: Agent,
        config: BusConfig,
        *,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        replica: int = 0,
        consumer: ConsumerSettings | None = None,
        heartbeat_s: float = 5.0,
        started: float | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        """`started` is the monotonic time the process began (default: now), from which
        `agent.started` reports its start time; the bus's metrics go on `metrics_registry` (default:
        one of its own). Raises AgentDefinitionError for a malformed agent class and
        ConfigurationError for an invalid name or tag."""
        self.agent = agent
        self.name = check_name(name or agent.default_name(), "agent name")
        self.tags = tuple(check_name(t, "tag") for t in (agent.tags if tags is None else tags))
        self.replica = replica
        self.handlers = HandlerTable.of(agent)
        self.registry = PayloadRegistry.with_builtins(*self.handlers.types())
        self.config = msgspec.structs.replace(config, name=self.name)
        self.consumer_settings = consumer or agent.consumer or config.consumer
        self.heartbeat_s = heartbeat_s
        self.stats = RuntimeStats(started)
        self.metrics_registry = metrics_registry
        self._bus: Bus | None = None

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("the agent runtime is not running")
        return self._bus

    async def run(self, stop: asyncio.Event, *, on_ready: Callable[[], None] | None = None) -> None:
        """Handle messages until `stop` is set, then drain and return.

        `on_ready` is called once the consumers are pulling. Raises BusUnavailable when the bus
        cannot be reached, and whatever `on_start` raises.
        """
        async with Bus(self.config, registry=self.registry, metrics_registry=self.metrics_registry) as bus:
            self._bus = bus
            await self.agent.on_start(bus)
            try:
                async with bus.consumer(self.name, self._dispatch, tags=self.tags, settings=self.consumer_settings):
                    await self._record(self._started())
                    if on_ready is not None:
                        on_ready()
                    async with asyncio.TaskGroup() as tasks:
                        beats = tasks.create_task(self._heartbeats())
                        work = tasks.create_task(self.agent.background(bus))
                        await stop.wait()
                        # Timed work stops before fetching does; a message it sent and nobody
                        # fetched yet stays in the log for the next start.
                        work.cancel()
                        beats.cancel()
                # Leaving the consumer block stopped fetching and let in-flight handlers finish.
            finally:
                await self.agent.on_stop()
            await self._record(
                AgentStopped(
                    agent=self.name, replica=self.replica, pid=os.getpid(), reason="stop requested",
                    handled=self.stats.handled, uptime_s=round(self.stats.uptime_s, 3),
                )
            )

    async def _dispatch(self, envelope: Envelope[Any], delivery: Delivery) -> None:
        # (The consumer engine already skipped our own broadcasts echoed back through a tag.)
        handle = self.handlers.get(type(envelope.payload))
        if handle is None:
            raise PermanentError(
                f"agent {self.name!r} has no handler for {envelope.kind!r} "
                f"(it handles {', '.join(self.handlers.kinds())})"
            )
        stats = self.stats
        stats.in_flight += 1
        try:
            ctx = Context(bus=self.bus, agent=self.name, envelope=envelope, delivery=delivery)
            result = await handle(envelope.payload, ctx)
            if result is not None and not isinstance(result, Payload):
                raise PermanentError(
                    f"handler of {envelope.kind!r} returned a {type(result).__name__}; "
                    "return a Payload (the reply to a request) or None"
                )
            if envelope.reply_to is not None and not ctx.replied:
                # A request always gets an answer: without one its requester would wait out its
                # timeout and be told the request "will still be handled" though it was.
                await ctx.reply(result if result is not None else _no_reply(self.name, envelope))
        except asyncio.CancelledError:
            raise
        except BaseException:
            stats.failed += 1
            raise
        else:
            stats.handled += 1
        finally:
            stats.in_flight -= 1

    def _started(self) -> AgentStarted:
        return AgentStarted(
            agent=self.name,
            replica=self.replica,
            pid=os.getpid(),
            host=socket.gethostname(),
            tags=list(self.tags),
            kinds=self.handlers.kinds(),
            start_ms=round(self.stats.uptime_s * 1e3, 1),
        )

    def heartbeat(self, state: str = "running") -> AgentHeartbeat:
        """A heartbeat event with the current counters."""
        stats = self.stats
        return AgentHeartbeat(
            agent=self.name, replica=self.replica, pid=os.getpid(), state=state,  # type: ignore[arg-type]
            in_flight=stats.in_flight, handled=stats.handled, failed=stats.failed,
            uptime_s=round(stats.uptime_s, 3), interval_s=self.heartbeat_s,
        )

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._record(self.heartbeat())

    async def _record(self, payload: Any) -> None:
        """Record a lifecycle event; a bus outage is logged, not fatal (the agent keeps working)."""
        try:
            await self.bus.record(self.name, payload)
        except BusError as exc:
            log.warning("could not record %s for %s: %s", type(payload).__name__, self.name, exc)


def _no_reply(agent: str, request: Envelope[Any]) -> RequestFailed:
    """The answer to a request whose handler returned None without replying."""
    return RequestFailed(
        reason=f"agent {agent!r} handled the {request.kind!r} request but gave no reply "
        "(its handler returned None; return a Payload, or call ctx.reply, to answer)",
        error_type=NO_REPLY,
    )
