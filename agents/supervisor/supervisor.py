"""`Supervisor`: keeps K replica processes of one agent running.

    sup = Supervisor(spec, settings, recorder=recorder)
    async with sup.running():          # or: await sup.run(stop_event)
        await sup.wait_ready(5)
        ...

Per replica: launch, read its status pipe (ready, heartbeats), and when it ends without being
asked to, record `agent.crashed`, wait the policy's backoff and launch a replacement
(`agent.restarted`). A replica that crashes `max_crashes` times within `window_s` is left down
(`agent.circuit_opened`, state `circuit_open`). A replica whose status pipe stays silent for
`liveness_timeout_s` is presumed hung and killed (then restarted like any crash); until its first
status line (interpreter start, imports) the bound is `start_timeout_s` instead.

Stop: SIGTERM to every replica (it stops fetching, finishes in-flight work and exits), then
SIGKILL to those still running after `stop_grace_s` (`agent.stopped`, graceful=False).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from agents.errors import SupervisorError
from agents.runtime.process import EXIT_BAD_SPEC, ProcessSpec
from agents.supervisor.launcher import LaunchedReplica, launch
from agents.supervisor.policy import CrashHistory, RestartPolicy
from agents.supervisor.recorder import EventRecorder
from agents.supervisor.state import AgentPaths, ReplicaStatus, SupervisorStatus, process_start, write_status
from bus.config import BusConfig, ConsumerSettings
from bus.scrape import targets_dir
from schemas.payloads import AgentCircuitOpened, AgentCrashed, AgentRestarted, AgentStopped

log = logging.getLogger("continuum.agents.supervisor")


class AgentSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to run: `target` (module:Class) as agent `name`, `replicas` processes."""

    target: str
    name: str
    bus: BusConfig
    tags: list[str] = []
    replicas: int = 1
    consumer: ConsumerSettings | None = None
    heartbeat_s: float = 5.0
    workdir: str | None = None


class SupervisorSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How to supervise. `home` enables the state file and log files (AgentPaths)."""

    restart: RestartPolicy = RestartPolicy()
    stop_grace_s: float = 10.0
    liveness_timeout_s: float = 15.0
    # Launch to first status line (interpreter start and imports, which take seconds on a busy
    # host): a tight liveness timeout must not kill a replica that is still starting.
    start_timeout_s: float = 60.0
    status_interval_s: float = 1.0
    home: str | None = None


class Supervisor:
    """Runs and restarts the replicas of one agent. `run()` may be called once."""

    def __init__(
        self, spec: AgentSpec, settings: SupervisorSettings | None = None, *, recorder: EventRecorder | None = None
    ) -> None:
        self.spec = spec
        self.settings = settings or SupervisorSettings()
        self._recorder = recorder
        self._paths = (
            AgentPaths(Path(self.settings.home), spec.bus.namespace, spec.name) if self.settings.home else None
        )
        self._status = SupervisorStatus(
            agent=spec.name, namespace=spec.bus.namespace, target=spec.target, tags=list(spec.tags),
            url=spec.bus.url, supervisor_pid=os.getpid(), supervisor_start=process_start(os.getpid()),
            started_at=time.time(),
            replicas=[ReplicaStatus(replica=i) for i in range(spec.replicas)],
        )
        self._launched: dict[int, LaunchedReplica] = {}
        self._change = asyncio.Event()
        self._dirty = asyncio.Event()
        self._writing = asyncio.Lock()

    # -- observing ------------------------------------------------------------------------

    def status(self) -> SupervisorStatus:
        """A snapshot of the supervisor and its replicas."""
        return msgspec.json.decode(msgspec.json.encode(self._status), type=SupervisorStatus)

    def pid_of(self, replica: int) -> int | None:
        """The pid of the running process of `replica`, if any."""
        launched = self._launched.get(replica)
        return launched.pid if launched is not None and launched.proc.returncode is None else None

    async def wait_until(self, predicate: Callable[[SupervisorStatus], bool], timeout_s: float) -> SupervisorStatus:
        """Wait until `predicate(status)` holds; raise TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while True:
                change = self._change
                status = self.status()
                if predicate(status):
                    return status
                await change.wait()

    async def wait_ready(self, timeout_s: float) -> SupervisorStatus:
        """Wait until every replica is running. Raises SupervisorError if one's circuit opened
        (or the wait timed out)."""

        def settled(status: SupervisorStatus) -> bool:
            return all(r.state in ("running", "circuit_open") for r in status.replicas)

        try:
            status = await self.wait_until(settled, timeout_s)
        except TimeoutError:
            states = ", ".join(f"{r.replica}:{r.state}" for r in self._status.replicas)
            raise SupervisorError(f"{self.spec.name} not ready within {timeout_s}s (replicas {states})") from None
        broken = [r for r in status.replicas if r.state == "circuit_open"]
        if broken:
            raise SupervisorError(
                f"{self.spec.name} replica {broken[0].replica} keeps crashing ({broken[0].last_exit}); "
                "see its log (bus agent logs)"
            )
        return status

    def _changed(self) -> None:
        change, self._change = self._change, asyncio.Event()
        change.set()
        self._dirty.set()

    # -- running --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["Supervisor"]:
        """Run for the duration of the block; stop gracefully at its end."""
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.run(stop))
            try:
                yield self
            finally:
                stop.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise until `stop` is set, then stop every replica (bounded by the grace period)."""
        async with asyncio.TaskGroup() as tasks:
            writer = tasks.create_task(self._write_state()) if self._paths else None
            replicas = [tasks.create_task(self._supervise(i, stop)) for i in range(self.spec.replicas)]
            await stop.wait()
            self._status.state = "stopping"
            self._changed()
            await asyncio.gather(*replicas)
            self._status.state = "stopped"
            self._changed()
            if writer is not None:
                await self._flush_state()
                writer.cancel()

    async def _supervise(self, index: int, stop: asyncio.Event) -> None:
        replica = self._status.replicas[index]
        history = CrashHistory(self.settings.restart)
        previous_pid: int | None = None
        delay = 0.0
        while not stop.is_set():
            launched = await self._launch(index)
            self._launched[index] = launched
            replica.state, replica.pid = "starting", launched.pid
            replica.launched_at, replica.ready_at, replica.in_flight, replica.metrics = time.time(), 0.0, 0, ""
            if previous_pid is not None:
                replica.restarts += 1
                self._record(AgentRestarted(
                    agent=self.spec.name, replica=index, pid=launched.pid, previous_pid=previous_pid,
                    restarts=replica.restarts, delay_s=round(delay, 3),
                ))
            self._changed()
            try:
                exit_text, code = await self._watch(replica, launched, stop)
            finally:
                launched.close()
                if launched.proc.returncode is None:  # cancelled: leave no orphan behind
                    launched.proc.kill()
            previous_pid = launched.pid
            replica.last_exit, replica.in_flight = exit_text, 0
            if stop.is_set():
                replica.state = "stopped"
                self._changed()
                return
            verdict = history.crashed(now=time.monotonic(), uptime_s=time.monotonic() - launched.started)
            log.warning("%s replica %d (pid %d) %s", self.spec.name, index, launched.pid, exit_text)
            self._record(AgentCrashed(
                agent=self.spec.name, replica=index, pid=launched.pid,
                exit_code=code if code is not None and code >= 0 else None,
                signal=_signal_name(code), uptime_s=round(time.monotonic() - launched.started, 3),
                recent_crashes=verdict.recent_crashes,
            ))
            if verdict.circuit_open or code == EXIT_BAD_SPEC:
                replica.state = "circuit_open"
                self._record(AgentCircuitOpened(
                    agent=self.spec.name, replica=index, crashes=verdict.recent_crashes,
                    window_s=self.settings.restart.window_s, last_exit=exit_text,
                ))
                self._changed()
                return
            replica.state, delay = "backoff", verdict.delay_s
            self._changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        replica.state = "stopped"
        self._changed()

    async def _launch(self, index: int) -> LaunchedReplica:
        spec = self.spec
        process_spec = ProcessSpec(
            target=spec.target, name=spec.name, bus=spec.bus, tags=list(spec.tags), replica=index,
            consumer=spec.consumer, heartbeat_s=spec.heartbeat_s,
            status_interval_s=self.settings.status_interval_s, workdir=spec.workdir,
            log_path=str(self._paths.replica_log(index)) if self._paths else None,
            metrics_dir=str(targets_dir(Path(self.settings.home))) if self.settings.home else None,
        )
        log_path = self._paths.replica_log(index) if self._paths else None
        return await launch(process_spec, log_path=log_path)

    async def _watch(
        self, replica: ReplicaStatus, launched: LaunchedReplica, stop: asyncio.Event
    ) -> tuple[str, int | None]:
        """Follow one launch until its process exits; returns (how it ended, exit code)."""
        async with asyncio.TaskGroup() as tasks:
            reader = tasks.create_task(self._read_status(replica, launched))
            exited = tasks.create_task(launched.proc.wait())
            stopping = tasks.create_task(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._terminate(replica, launched, exited)
            stopping.cancel()
            code = await exited
            await reader
        if replica.last_exit == "unresponsive":
            return "was killed: no heartbeat", code
        if replica.last_exit == "silent since launch":
            return f"was killed: no status within {self.settings.start_timeout_s}s of its launch", code
        return _describe_exit(code), code

    async def _read_status(self, replica: ReplicaStatus, launched: LaunchedReplica) -> None:
        timeout_s, silence = self.settings.start_timeout_s, "silent since launch"
        while True:
            try:
                line = await launched.next_status(timeout_s)
            except TimeoutError:
                if launched.proc.returncode is None:
                    log.warning("%s replica %d sent no status for %.1fs (%s): killing it",
                                self.spec.name, replica.replica, timeout_s, silence)
                    replica.last_exit = silence
                    launched.proc.kill()
                return
            if line is None:
                return
            timeout_s, silence = self.settings.liveness_timeout_s, "unresponsive"
            now = time.time()
            replica.last_heartbeat = now
            replica.metrics = line.metrics or replica.metrics
            if line.type == "ready" or (line.ready and replica.state == "starting"):
                replica.state, replica.ready_at = "running", now
                replica.start_ms = round((time.monotonic() - launched.started) * 1e3, 1)
            if line.type == "beat":
                replica.in_flight, replica.handled, replica.failed = line.in_flight, line.handled, line.failed
                if line.state == "stopping":
                    replica.state = "stopping"
            self._changed()

    async def _terminate(self, replica: ReplicaStatus, launched: LaunchedReplica, exited: asyncio.Task[Any]) -> None:
        replica.state = "stopping"
        self._changed()
        with contextlib.suppress(ProcessLookupError):
            launched.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), self.settings.stop_grace_s)
            return
        except TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError):
            launched.proc.kill()
        self._record(AgentStopped(
            agent=self.spec.name, replica=replica.replica, pid=launched.pid, graceful=False,
            reason=f"killed after the {self.settings.stop_grace_s}s stop grace period",
            handled=replica.handled, uptime_s=round(time.monotonic() - launched.started, 3),
        ))

    def _record(self, payload: Any) -> None:
        if self._recorder is not None:
            self._recorder.record(self.spec.name, payload)

    # -- state file -----------------------------------------------------------------------

    async def _write_state(self) -> None:
        # Coalesced: at most ~10 writes a second, whatever the heartbeat rate.
        while True:
            await self._dirty.wait()
            await self._flush_state()
            await asyncio.sleep(0.1)

    async def _flush_state(self) -> None:
        assert self._paths is not None
        async with self._writing:
            self._dirty.clear()
            await asyncio.to_thread(write_status, self._paths.state, self.status())


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        return f"was killed by {_signal_name(code)}"
    return f"exited with code {code}"


def _signal_name(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
