"""Running the research team on a bus: four supervised agent processes, one day at a time.

    async with ResearchDemo(bus, DemoSettings(home=...), say=print).team() as demo:
        result = await demo.run_day(1)       # prints the team's work as it happens
        print(result.report)

`team()` starts one `Supervisor` per agent in this process; each supervisor runs its agent as its
own OS process and restarts it when it dies. `run_day` sends the researcher the day (from
"coordinator"; the envelope id becomes the day's correlation id), tails the log, printing one
line per meaningful event, and returns when the writer's report to the coordinator is stored.

`night()` stands for the time between two days: the demo's clock moves on a day and each agent
is asked, in turn, to sweep retention as of then; every conversation idle past the team's TTL
is summarised and closed (one line each), so the next day starts a fresh context window. Turns
keep their real times; only the sweep's instant is moved on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta
from typing import Any

import msgspec

from agents.errors import AgentError
from agents.llm_agent.logread import StoredEvent, read_range
from agents.memory.retention import format_duration, sweep_notice
from agents.research.narrate import describe
from agents.research.team import COORDINATOR, RETENTION, TEAM, target
from agents.supervisor import (
    AgentSpec,
    EventRecorder,
    RestartPolicy,
    Supervisor,
    SupervisorSettings,
)
from bus.cli.progress_line import ProgressLine, polling
from bus.client import Bus
from bus.errors import RequestTimeout
from schemas import utcnow
from schemas.payloads import ConversationClosed, LlmCallCompleted, Note

POLL_S = 0.05
NIGHT = timedelta(days=1)


class DemoSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the demo runs its agents."""

    home: str | None = None  # supervisor state and replica logs (`bus agent ps/logs`)
    day_timeout_s: float = 120.0
    start_timeout_s: float = 30.0
    restart: RestartPolicy = RestartPolicy(backoff_initial_s=0.05, backoff_max_s=1.0)
    stop_grace_s: float = 10.0


class DayResult(msgspec.Struct, frozen=True, kw_only=True):
    """One day's run: its correlation id, the final report, and what it cost."""

    day: int
    correlation_id: str
    report: str
    new_findings: int
    contradictions: int
    corrections: int
    llm_calls: int
    seconds: float
    first_seq: int
    last_seq: int

    @property
    def nothing_new(self) -> bool:
        return self.new_findings == 0


class DemoError(AgentError):
    """The team did not finish a day in time, or could not start."""


class ResearchDemo:
    """The team on one bus. Use `team()` around `run_day` calls."""

    def __init__(
        self, bus: Bus, settings: DemoSettings | None = None, *, say: Callable[[str], None] = print, progress: ProgressLine | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        self.bus = bus
        # Drawn while the team starts (each agent reads its memory back from the log first).
        self.progress = progress or ProgressLine("team", is_tty=False)
        # Each agent's own credential file (authorization on); others connect as `bus` does.
        self.credentials = dict(credentials or {})
        self.settings = settings or DemoSettings()
        self.say = say
        self.supervisors: dict[str, Supervisor] = {}

    @contextlib.asynccontextmanager
    async def team(self) -> AsyncIterator[ResearchDemo]:
        """Start the four agents (each its own process, supervised); stop them at the end."""
        recorder = EventRecorder(self.bus)
        settings = SupervisorSettings(
            restart=self.settings.restart, stop_grace_s=self.settings.stop_grace_s, home=self.settings.home,
        )
        async with asyncio.TaskGroup() as tasks:
            recording = tasks.create_task(recorder.run())
            async with contextlib.AsyncExitStack() as stack:
                for name in TEAM:
                    config = msgspec.structs.replace(
                        self.bus.config, name=name, credentials=self.credentials.get(name, self.bus.config.credentials),
                    )
                    spec = AgentSpec(target=target(name), name=name, bus=config, heartbeat_s=5.0)
                    self.supervisors[name] = await stack.enter_async_context(
                        Supervisor(spec, settings, recorder=recorder).running()
                    )
                async with polling(self.progress, self._count_ready):
                    await asyncio.gather(*(s.wait_ready(self.settings.start_timeout_s) for s in self.supervisors.values()))
                yield self
            await recorder.flush(5.0)
            recording.cancel()

    async def _count_ready(self) -> None:
        ready = sum(all(r.state == "running" for r in s.status().replicas) for s in self.supervisors.values())
        self.progress.update(ready, total=len(TEAM))

    async def run_day(self, day: int, *, on_event: Callable[[StoredEvent], Any] | None = None) -> DayResult:
        """Give the team day `day` and wait for its report. Raises DemoError on timeout."""
        started = time.perf_counter()
        first_seq = await self.bus.last_seq()
        sent = await self.bus.send("researcher", Note(text=f"day {day}", data={"day": day}), sender=COORDINATOR)
        correlation = sent.envelope.id
        self.say(f"── day {day} ─ correlation {correlation}")
        position = first_seq
        calls = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.day_timeout_s
        while True:
            async for stored in read_range(self.bus, f"{self.bus.subjects.ns}.>", after=position):
                position = stored.seq
                env = stored.envelope
                if on_event is not None:
                    on_event(stored)
                mine = env.correlation_id == correlation
                if isinstance(env.payload, LlmCallCompleted) and mine:
                    calls += 1
                line = describe(stored)
                if line is not None and (mine or env.kind.startswith("agent.") or env.kind.startswith("delivery.")):
                    self.say(f"  {line}")
                if mine and env.to == COORDINATOR and isinstance(env.payload, Note):
                    data = env.payload.data
                    return DayResult(
                        day=day, correlation_id=correlation, report=env.payload.text,
                        new_findings=len(data.get("new", [])), contradictions=len(data.get("contradictions", [])),
                        corrections=int(data.get("corrections", 0)), llm_calls=calls,
                        seconds=round(time.perf_counter() - started, 3), first_seq=first_seq, last_seq=stored.seq,
                    )
            if loop.time() > deadline:
                raise DemoError(
                    f"day {day} did not finish within {self.settings.day_timeout_s}s; "
                    "see `bus agent logs <agent>` for the agents' logs"
                )
            await asyncio.sleep(POLL_S)

    async def night(self, *, length: timedelta = NIGHT) -> list[ConversationClosed]:
        """Move the demo's clock on by `length` and ask each agent in turn (a request) to sweep
        retention as of then; print each close as it is recorded and return them.
        Raises DemoError when an agent does not answer within the day timeout."""
        as_of = utcnow() + length
        ttl = format_duration(RETENTION.idle_ttl) if RETENTION.idle_ttl else "off"
        self.say(f"── night ─ the clock moves on {format_duration(length)}; retention closes conversations idle > {ttl}")
        position = await self.bus.last_seq()
        closed: list[ConversationClosed] = []
        for name in TEAM:
            try:
                await self.bus.request(name, sweep_notice(as_of), timeout_s=self.settings.day_timeout_s)
            except RequestTimeout as exc:
                raise DemoError(f"{name} did not answer the retention sweep: {exc}") from exc
            subject = self.bus.subjects.event(name, "memory.conversation.closed")
            async for stored in read_range(self.bus, subject, after=position):
                closed.append(stored.envelope.payload)
                self.say(f"  {describe(stored)}")
        return closed
