"""The step journal of one inbound message: recorded step results, read back on redelivery.

Step `i` of the handler run for inbound message `m` is recorded once, at

    <ns>.event.<agent>.step.<m>.<i>

with an expected-last-subject-sequence of 0 on that exact subject: the first record wins, and a
later attempt that tries to record the same step (because it did not see the first record) gets
a conflict and adopts the recorded result instead. On a redelivery (attempt > 1) every recorded
step of `m` is loaded with one multi-subject direct get, before the first step runs.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import msgspec

from agents.errors import UnreadableRecord
from agents.runtime.reads import MULTI_LAST_LIMIT, multi_last
from bus.client import Bus
from bus.errors import ConcurrencyConflict
from schemas import DecodeError, Delivery, Envelope, derived_id, stable_id
from schemas.payloads import Sealed, StepRecorded

# One multi-subject direct get reads at most this many subjects, so a handler may run at most
# this many steps per message.
MAX_STEPS = MULTI_LAST_LIMIT

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def inbound_key(envelope_id: str) -> str:
    """A UUID usable as a subject token and as the parent of derived ids: the envelope id when
    it is a UUID (the bus makes UUIDv7 ids), else a stable hash of it."""
    if _TOKEN.match(envelope_id):
        try:
            uuid.UUID(envelope_id)
            return envelope_id
        except ValueError:
            pass
    return stable_id("inbound", envelope_id)


class StepJournal:
    """Recorded steps of one inbound message, for one handler run."""

    def __init__(self, bus: Bus, agent: str, inbound: Envelope[Any], delivery: Delivery) -> None:
        self._bus = bus
        self._agent = agent
        self._inbound = inbound
        self.key = inbound_key(inbound.id)
        self._prefix = f"{bus.subjects.event(agent, 'step')}.{self.key}"
        # None until loaded; a first delivery has nothing recorded, so it skips the read.
        self._recorded: dict[int, StepRecorded] | None = None if delivery.attempt > 1 else {}
        self._attempt = delivery.attempt

    def subject(self, index: int) -> str:
        return f"{self._prefix}.{index}"

    def step_id(self, index: int, name: str) -> str:
        """The id of step `index`'s record: stable across attempts (use it as an idempotency key)."""
        return derived_id(self.key, f"step/{index}/{name}")

    def outbound_id(self, index: int, name: str) -> str:
        """The id of the envelope a send/broadcast/request step publishes."""
        return derived_id(self.key, f"out/{index}/{name}")

    async def recorded(self, index: int) -> StepRecorded | None:
        """The recorded result of step `index`, or None. Raises BusUnavailable, UnreadableRecord (a PermanentError)."""
        if self._recorded is None:
            await self._load()
        assert self._recorded is not None
        return self._recorded.get(index)

    async def record(self, index: int, name: str, result: bytes, elapsed_ms: float) -> StepRecorded:
        """Record step `index`'s result (JSON bytes) and return the record that stands: this one,
        or the one an earlier attempt stored first. Raises BusUnavailable."""
        payload = StepRecorded(
            agent=self._agent,
            inbound_id=self._inbound.id,
            index=index,
            name=name,
            result=msgspec.Raw(result),
            inbound_kind=self._inbound.kind,
            attempt=self._attempt,
            elapsed_ms=round(elapsed_ms, 3),
        )
        envelope = self._bus.envelope(
            payload,
            sender=self._agent,
            id=self.step_id(index, name),
            correlation_id=self._inbound.correlation_id,
            causation_id=self._inbound.id,
        )
        subject = self.subject(index)
        try:
            sent = await self._bus.publish(
                envelope, subject, expected_last_subject_seq=0, expected_last_subject=subject
            )
            if not sent.ack.duplicate:
                if self._recorded is not None:
                    self._recorded[index] = payload
                return payload
        except ConcurrencyConflict:
            pass
        # Another attempt recorded this step first (the server answered with a conflict, or with
        # a duplicate of the same record id): its result is the one that counts.
        await self._load()
        assert self._recorded is not None
        stored = self._recorded.get(index)
        if stored is None:
            raise ConcurrencyConflict(
                f"step {index} of {self._inbound.id} conflicted but no record is readable", expected=0, actual=None
            )
        return stored

    async def _load(self) -> None:
        msgs = await multi_last(self._bus, [f"{self._prefix}.*"])
        recorded: dict[int, StepRecorded] = {}
        for msg in msgs:
            try:
                payload = (await self._bus.open_record(msg.data)).payload
            except DecodeError as exc:
                raise UnreadableRecord(f"step record at seq {msg.seq} ({msg.subject}) is unreadable: {exc}") from exc
            if isinstance(payload, Sealed):
                # Never run a recorded step again because its record cannot be read (a forgotten
                # agent's journal): its effect happened once already.
                raise UnreadableRecord(f"step record at seq {msg.seq} ({msg.subject}) is sealed under {payload.key}, "
                                       "which was forgotten (or this credential may not read it): its result "
                                       "cannot be reproduced")
            if isinstance(payload, StepRecorded):
                recorded[payload.index] = payload
        self._recorded = recorded
