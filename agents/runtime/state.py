"""An agent's own state, fenced: a second writer gets a ConcurrencyConflict, never an interleaving.

    current = await ctx.state.load(type=Counter, default=Counter())
    await ctx.state.save(Counter(n=current.value.n + 1), version=current.version)
    # or, re-reading and retrying on conflict:
    await ctx.state.update(lambda c: Counter(n=c.n + 1), type=Counter, default=Counter())

Each save is an `agent.state` event at `<ns>.event.<agent>.agent.state`, appended with an
expected-last-subject-sequence on that subject alone; the version is the stream sequence of the
last save (0: never saved). Inside a handler, load and save are steps, so a redelivered message
sees the same versions and does not apply its update twice; a conflict is recorded too, so the
replay takes the same retry path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from agents.errors import UnreadableRecord
from agents.runtime.reads import StoredMsg, by_seq, last_by_subject
from bus.client import Bus
from bus.errors import ConcurrencyConflict
from schemas import DecodeError, derived_id, new_id
from schemas.payloads import AgentStateSaved, Sealed

if TYPE_CHECKING:
    from agents.runtime.context import Context, StepInfo

T = TypeVar("T")

STATE_KIND = "agent.state"


class Versioned(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """A state value and its version (0: never saved; `value` is then the default)."""

    value: T
    version: int


class _Loaded(msgspec.Struct, frozen=True):
    version: int


class _Saved(msgspec.Struct, frozen=True, kw_only=True):
    version: int = 0
    conflict_with: int | None = None


class StateStore:
    """Load and save one agent's state. Bound to a handler's context, every call is a step."""

    def __init__(self, bus: Bus, agent: str, *, context: "Context | None" = None) -> None:
        self._bus = bus
        self._agent = agent
        self._context = context
        self.subject = bus.subjects.event(agent, STATE_KIND)

    async def load(self, *, type: Any = Any, default: Any = None) -> Versioned[Any]:
        """The latest state, decoded as `type`. Raises BusUnavailable."""
        if self._context is None:
            return await self._decode(await last_by_subject(self._bus, self.subject), type, default)
        seen: list[StoredMsg | None] = []

        async def run(_info: "StepInfo") -> _Loaded:
            msg = await last_by_subject(self._bus, self.subject)
            seen.append(msg)
            return _Loaded(0 if msg is None else msg.seq)

        version = msgspec.json.decode(await self._context.run_step("state.load", run), type=_Loaded).version
        msg = seen[0] if seen else (await by_seq(self._bus, version) if version else None)
        return await self._decode(msg, type, default)

    async def save(self, value: Any, *, version: int) -> int:
        """Store `value` if the state is still at `version`; return the new version.

        Raises ConcurrencyConflict (`.actual` is the version another writer stored) and
        BusUnavailable.
        """
        if self._context is None:
            return await self._write(value, version, new_id())

        async def run(info: "StepInfo") -> _Saved:
            msg_id = derived_id(info.id, "state")
            try:
                return _Saved(version=await self._write(value, version, msg_id))
            except ConcurrencyConflict as conflict:
                last = await last_by_subject(self._bus, self.subject)
                if last is not None and last.headers.get("Nats-Msg-Id") == msg_id:
                    # Our own write from an attempt that died before recording the step.
                    return _Saved(version=last.seq)
                return _Saved(conflict_with=conflict.actual if conflict.actual is not None else -1)

        saved = msgspec.json.decode(await self._context.run_step("state.save", run), type=_Saved)
        if saved.conflict_with is not None:
            raise ConcurrencyConflict(
                f"state of {self._agent!r} is at version {saved.conflict_with}, not {version}",
                expected=version, actual=saved.conflict_with,
            )
        return saved.version

    async def update(
        self, fn: Callable[[Any], Any], *, type: Any = Any, default: Any = None, max_attempts: int = 16
    ) -> Versioned[Any]:
        """Load, apply `fn` (pure: no I/O), save; on a conflict, load again and retry, at most
        `max_attempts` times. Returns the saved state. Raises ConcurrencyConflict when every
        attempt lost, BusUnavailable."""
        conflict: ConcurrencyConflict | None = None
        for _ in range(max_attempts):
            current = await self.load(type=type, default=default)
            value = fn(current.value)
            try:
                return Versioned(value=value, version=await self.save(value, version=current.version))
            except ConcurrencyConflict as exc:
                conflict = exc
        assert conflict is not None
        raise conflict

    async def _write(self, value: Any, version: int, msg_id: str) -> int:
        payload = AgentStateSaved(
            agent=self._agent, value=msgspec.Raw(msgspec.json.encode(value)), previous_version=version
        )
        sent = await self._bus.record(self._agent, payload, expected_seq=version, fence=self.subject, id=msg_id)
        return sent.ack.seq

    async def _decode(self, msg: StoredMsg | None, value_type: Any, default: Any) -> Versioned[Any]:
        if msg is None:
            return Versioned(value=default, version=0)
        try:
            payload = (await self._bus.open_record(msg.data)).payload
        except DecodeError as exc:
            raise UnreadableRecord(f"{self.subject} at seq {msg.seq} is not agent state: {exc}") from exc
        if isinstance(payload, Sealed):
            raise UnreadableRecord(f"the state at {self.subject} seq {msg.seq} is sealed under {payload.key}, which was "
                                   "forgotten (or this credential may not read it)")
        if not isinstance(payload, AgentStateSaved):
            raise UnreadableRecord(f"{self.subject} holds a {payload.__class__.__name__} at seq {msg.seq}, not agent state")
        try:
            value = msgspec.json.decode(bytes(payload.value), type=value_type)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UnreadableRecord(f"the state at {self.subject} seq {msg.seq} does not decode as {value_type!r}: "
                                   f"{str(exc)[:500]}") from exc
        return Versioned(value=value, version=msg.seq)
