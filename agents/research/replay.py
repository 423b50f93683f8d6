"""Replay a recorded workflow: re-run the handlers against the recorded model responses and show
that the same events result, without calling any model.

    report = await replay_workflow(bus, correlation_id)
    report.same            # every handled message produced exactly what the log holds

For each message of the workflow that an LLM agent of the team handled, in log order:

1. its memory is rebuilt from the log as it stood when the handler started (the position the
   handler recorded in its `memory.position` step);
2. the handler runs again in this process with a `ReplayModel` over the `llm.call.completed`
   events the message caused (a request that differs from the recorded one is a ReplayMismatch:
   the decisions diverged), MCP tools answering from the recorded tool steps (no server is
   started; agents.mcp.recorded), a memory log that captures writes instead of publishing them,
   and a context that runs every step afresh and captures outbound messages;
3. the produced effects (memory events and outbound messages, in order) are hashed and compared
   with the recorded ones (the events and messages whose causation is that message).

Ids, timestamps of publication and latencies are not part of the hash: only what was decided.

A handling whose records were forgotten (`bus forget`: its agent's private records are sealed
under a key that no longer exists) is not run: its report's `error` says which records it cannot
reproduce (how many, of which kinds, under which key), instead of a replay that diverges or fails
on what it cannot read.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from agents.llm import ModelError, ReplayModel
from agents.llm_agent import LLMAgent, MemoryLog, StoredEvent, read_range
from agents.mcp.recorded import RecordedTools
from agents.memory import MEMORY_EVENT_TYPES
from agents.runtime.journal import inbound_key
from bus.client import Bus
from schemas import Envelope, derived_id
from schemas.payloads import LlmCallCompleted, Note, Notice, Sealed, StepRecorded

_canonical = msgspec.json.Encoder(order="deterministic")


class HandlingReplay(msgspec.Struct, frozen=True, kw_only=True):
    """One handled message: what the log holds and what the replay produced."""

    agent: str
    inbound_id: str
    inbound_seq: int
    llm_calls: int
    recorded: int
    replayed: int
    recorded_sha256: str
    replayed_sha256: str
    error: str = ""
    unused_responses: int = 0  # recorded responses the replay never asked for

    @property
    def same(self) -> bool:
        return not self.error and not self.unused_responses and self.recorded_sha256 == self.replayed_sha256


class WorkflowReplay(msgspec.Struct, frozen=True, kw_only=True):
    correlation_id: str
    handlings: list[HandlingReplay]

    @property
    def same(self) -> bool:
        return bool(self.handlings) and all(h.same for h in self.handlings)


class ReplayLog(MemoryLog):
    """A memory log over events already read, frozen at one position; writes are captured."""

    def __init__(self, bus: Bus, agent: str, memory_events: list[StoredEvent], position: int) -> None:
        super().__init__(bus, agent)
        for stored in memory_events:
            if stored.seq > position:
                break
            self.fold(stored.seq, stored.envelope.payload, cause=stored.envelope.causation_id)
        self.position = position
        self.captured: list[Any] = []

    async def catch_up(self, *, up_to: int | None = None) -> int:
        return self.position  # the recorded run saw nothing newer during the handling

    async def snapshot(self) -> int:
        return self.position  # a replay records nothing, memory snapshots neither

    async def record(self, event: Any, *, id: str, cause: Envelope[Any] | None = None) -> Any:
        self._check_limit(event)  # the size limit holds in a replay too
        if isinstance(event, MEMORY_EVENT_TYPES):
            self.captured.append(event)
        self.fold(0, event, cause=None if cause is None else cause.id)
        return event


class ReplayContext:
    """What a handler sees of its context during a replay: steps run afresh (results still round
    trip through JSON, as recorded ones do), outbound messages are captured."""

    def __init__(self, agent: str, envelope: Envelope[Any], captured: list[Any]) -> None:
        self.agent = agent
        self.envelope = envelope
        self.attempt = 1
        self.replied = False
        self._captured = captured
        self._key = inbound_key(envelope.id)
        self._index = 0
        self._current: str | None = None

    @property
    def payload(self) -> Any:
        return self.envelope.payload

    @property
    def step_id(self) -> str:
        if self._current is None:
            raise RuntimeError("step_id outside a step")
        return self._current

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, type: Any = Any) -> Any:
        index, self._index = self._index, self._index + 1
        self._current = derived_id(self._key, f"step/{index}/{name}")
        try:
            value = fn(*args)
            if inspect.isawaitable(value):
                value = await value
        finally:
            self._current = None
        return msgspec.json.decode(msgspec.json.encode(value), type=type)

    async def send(self, to: str, payload: Any, **_: Any) -> None:
        self._index += 1
        self._captured.append(_Outbound(to=to, payload=payload))

    async def broadcast(self, tag: str, payload: Any, **_: Any) -> None:
        self._index += 1
        self._captured.append(_Outbound(tag=tag, payload=payload))

    async def reply(self, payload: Any) -> None:
        self._index += 1
        self.replied = True
        self._captured.append(_Outbound(to=self.envelope.reply_to, payload=payload))


class _Outbound(msgspec.Struct, frozen=True, kw_only=True):
    payload: Any
    to: str | None = None
    tag: str | None = None


def effects_sha256(effects: list[Any]) -> str:
    """Content hash of effects in order: memory events and outbound messages (recipient + payload)."""
    digest = hashlib.sha256()
    for effect in effects:
        digest.update(_canonical.encode(effect))
        digest.update(b"\n")
    return digest.hexdigest()


async def replay_workflow(
    bus: Bus, correlation_id: str, agent_classes: Mapping[str, type[LLMAgent]] | None = None
) -> WorkflowReplay:
    """Replay every handling of the workflow `correlation_id` (see the module docstring).

    Raises BusUnavailable. A handling that cannot be replayed is reported with its error.
    """
    if agent_classes is None:
        from agents.research.team import AGENT_CLASSES

        agent_classes = AGENT_CLASSES
    ns = bus.subjects.ns
    log = [stored async for stored in read_range(bus, f"{ns}.>")]
    memory_events = [s for s in log if s.subject.startswith(f"{ns}.event.") and ".memory." in s.subject]
    sealed = [s for s in memory_events if isinstance(s.envelope.payload, Sealed)]
    memory_events = [s for s in memory_events if not isinstance(s.envelope.payload, Sealed)]
    handlings = []
    for stored in log:
        env = stored.envelope
        if (env.correlation_id != correlation_id or env.to not in agent_classes
                or bus.subjects.kind_of_subject(stored.subject) != "inbox" or not isinstance(env.payload, Note)):
            continue
        unreadable = _forgotten(stored, log, sealed)
        if unreadable is not None:
            handlings.append(unreadable)
            continue
        handlings.append(await _replay_one(bus, stored, log, memory_events, agent_classes[env.to]))
    return WorkflowReplay(correlation_id=correlation_id, handlings=handlings)


async def _replay_one(
    bus: Bus, inbound: StoredEvent, log: list[StoredEvent], memory_events: list[StoredEvent], cls: type[LLMAgent]
) -> HandlingReplay:
    env = inbound.envelope
    agent = env.to or ""
    caused = [s for s in log if s.envelope.causation_id == env.id and s.envelope.sender == agent]
    calls = [s.envelope.payload for s in caused if isinstance(s.envelope.payload, LlmCallCompleted)]
    position = next(
        (msgspec.json.decode(bytes(s.envelope.payload.result), type=int) for s in caused
         if isinstance(s.envelope.payload, StepRecorded) and s.envelope.payload.name == "memory.position"),
        inbound.seq,
    )
    recorded = [_effect(s) for s in caused if _effect(s) is not None]
    replay_log = ReplayLog(bus, agent, memory_events, position)
    captured = replay_log.captured
    model = ReplayModel(calls)
    agent_obj = cls(model=model)
    # MCP tools answer from the recorded steps: a replay never starts a server.
    steps = [s.envelope.payload for s in caused if isinstance(s.envelope.payload, StepRecorded)]
    mcp_tools = RecordedTools.from_log(specs, calls, steps) if (specs := agent_obj.mcp()) else None
    agent_obj.attach(
        replay_log, model, model_name=calls[0].request.model if calls else "offline", mcp_tools=mcp_tools
    )
    error = ""
    try:
        await agent_obj.on_note(env.payload, ReplayContext(agent, env, captured))  # type: ignore[arg-type]
    except ModelError as exc:
        error = f"{type(exc).__name__}: {exc}"
    replayed = list(captured)
    return HandlingReplay(
        agent=agent, inbound_id=env.id, inbound_seq=inbound.seq, llm_calls=len(calls),
        recorded=len(recorded), replayed=len(replayed),
        recorded_sha256=effects_sha256(recorded), replayed_sha256=effects_sha256(replayed), error=error,
        unused_responses=model.remaining,
    )


def _forgotten(inbound: StoredEvent, log: list[StoredEvent], sealed_memory: list[StoredEvent]) -> HandlingReplay | None:
    """The report of a handling that touched forgotten records (sealed ones this process cannot
    open: what it caused, or its agent's memory up to the handling), else None."""
    env = inbound.envelope
    agent = env.to or ""
    caused = [s for s in log if s.envelope.causation_id == env.id and s.envelope.sender == agent]
    unreadable = [s for s in caused if isinstance(s.envelope.payload, Sealed)]
    caused_ids = {s.envelope.id for s in unreadable}
    unreadable += [s for s in sealed_memory if s.envelope.sender == agent and s.envelope.id not in caused_ids
                   and s.seq <= max([inbound.seq, *(c.seq for c in caused)])]
    if not unreadable:
        return None
    kinds = sorted({s.envelope.payload.of for s in unreadable})
    keys = sorted({s.envelope.payload.key for s in unreadable})
    return HandlingReplay(
        agent=agent, inbound_id=env.id, inbound_seq=inbound.seq, llm_calls=0, recorded=0, replayed=0,
        recorded_sha256="", replayed_sha256="",
        error=(f"cannot reproduce: {len(unreadable)} records ({', '.join(kinds)}) are sealed under "
               f"{', '.join(keys)}, which was forgotten (or this credential may not read it)"),
    )


def _effect(stored: StoredEvent) -> Any:
    """The decided content of a recorded effect, or None for bookkeeping (steps, calls, reports)."""
    payload = stored.envelope.payload
    if isinstance(payload, MEMORY_EVENT_TYPES):
        return payload
    if isinstance(payload, (Note, Notice)) and (stored.envelope.to or stored.envelope.tag):
        return _Outbound(to=stored.envelope.to, tag=stored.envelope.tag, payload=payload)
    return None
