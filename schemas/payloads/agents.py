"""Facts about agent processes: lifecycle, heartbeats, recorded steps and fenced state.

Lifecycle events are recorded at `<ns>.event.<agent>.<kind>`; a step result at
`<ns>.event.<agent>.step.<inbound-id>.<index>` so that every step of one inbound message can be
read back in a single direct get.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.envelope import Payload

ReplicaState = Literal["starting", "running", "backoff", "circuit_open", "stopping", "stopped", "exited"]


class AgentStarted(Payload, frozen=True, kw_only=True, tag="agent.started"):
    """A replica is connected and its consumers are pulling: it is ready to handle messages."""

    agent: str
    replica: int = 0
    pid: int
    host: str = ""
    tags: list[str] = []
    # The payload kinds it has handlers for.
    kinds: list[str] = []
    # Time from process start to ready, as measured inside the process.
    start_ms: float = 0.0


class AgentStopped(Payload, frozen=True, kw_only=True, tag="agent.stopped"):
    """A replica ended on request. `graceful` is False when it had to be killed after the grace
    period (its in-flight messages will be redelivered)."""

    agent: str
    replica: int = 0
    pid: int
    reason: str = ""
    graceful: bool = True
    handled: int = 0
    uptime_s: float = 0.0


class AgentStopRequested(Payload, frozen=True, kw_only=True, tag="agent.stop.requested"):
    """An operator asked an agent's supervisor, through the bus, to stop it (bus.agent_control):
    who asked and why. Each replica's `agent.stopped` follows once it has finished its work."""

    agent: str
    by: str  # the sender name of whoever asked
    reason: str = ""


class AgentCrashed(Payload, frozen=True, kw_only=True, tag="agent.crashed"):
    """A replica ended without being asked to. `signal` is set when a signal killed it."""

    agent: str
    replica: int = 0
    pid: int
    exit_code: int | None = None
    signal: str | None = None
    uptime_s: float = 0.0
    # Crashes of this replica inside the circuit breaker's window, this one included.
    recent_crashes: int = 1


class AgentRestarted(Payload, frozen=True, kw_only=True, tag="agent.restarted"):
    """The supervisor launched a replacement for a crashed replica after `delay_s` of backoff."""

    agent: str
    replica: int = 0
    pid: int
    previous_pid: int
    restarts: int
    delay_s: float = 0.0


class AgentCircuitOpened(Payload, frozen=True, kw_only=True, tag="agent.circuit_opened"):
    """A replica crashed `crashes` times within `window_s`: the supervisor stopped restarting it
    (a crash loop). `bus agent stop` then `bus agent start` resets the circuit."""

    agent: str
    replica: int = 0
    crashes: int
    window_s: float
    last_exit: str = ""


class AgentHeartbeat(Payload, frozen=True, kw_only=True, tag="agent.heartbeat"):
    """Liveness, at a bounded rate (`interval_s`): a replica without a heartbeat for a few
    intervals is presumed dead."""

    agent: str
    replica: int = 0
    pid: int
    state: ReplicaState = "running"
    in_flight: int = 0
    handled: int = 0
    failed: int = 0
    uptime_s: float = 0.0
    interval_s: float = 0.0


class StepRecorded(Payload, frozen=True, kw_only=True, tag="agent.step"):
    """The result of step `index` (`name`) of the handler run for inbound message `inbound_id`.

    A redelivered message that reaches the same step gets `result` back instead of running the
    step again. `result` is the step's value as JSON.
    """

    agent: str
    inbound_id: str
    index: int
    name: str
    result: msgspec.Raw
    inbound_kind: str = ""
    attempt: int = 1
    elapsed_ms: float = 0.0


class AgentStateSaved(Payload, frozen=True, kw_only=True, tag="agent.state"):
    """A new version of an agent's own state (`value`, as JSON). Written with an expected-last-
    sequence check, so two writers cannot interleave: the version is this event's sequence."""

    agent: str
    value: msgspec.Raw
    previous_version: int = 0


class MemorySnapshotted(Payload, frozen=True, kw_only=True, tag="agent.memory.snapshot"):
    """One part of a snapshot of `agent`'s memory: every memory event its memory was folded from
    up to log sequence `position`, as stored (`entries`: each the event's sequence and its
    envelope's bytes as JSON), so a restart folds the same memory from the snapshot plus the
    events after `position`, even after the early events were trimmed from the log. A snapshot
    too large for one message is several parts (`part` of `parts`) recorded one after another;
    `first_part_seq` is the log sequence of part 0 (0 in part 0 itself)."""

    agent: str
    snapshot_id: str
    position: int
    part: int
    parts: int
    entries: list[SnapshotEntry]
    first_part_seq: int = 0


class SnapshotEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A memory event in a snapshot: its log sequence and its envelope as stored (JSON)."""

    seq: int
    envelope: msgspec.Raw
