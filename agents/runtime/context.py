"""`Context`: what a handler gets besides its payload: steps, messaging and fenced state.

Everything a handler does through its context that has an effect is a *step*: its result is
recorded in the log the first time, and a redelivered message that reaches the same step gets
the recorded result back instead of doing it again.

    count = await ctx.step("count words", count_words, text)      # run once, recorded
    await ctx.send("archivist", Note(text=text))                   # a step too
    reply = await ctx.request("search", Query(q=text))             # a step: reply recorded

Determinism rule: on every attempt, a handler must call its steps in the same order with the
same names (steps are numbered by call order). Compute anything nondeterministic (time,
randomness, I/O, LLM calls) inside a step. Steps run one at a time: a second step started
while one is running raises StepError. A redelivered message whose handler calls a step under
a different name than the recorded run raises NondeterminismError and is dead-lettered.

A step's fn runs at least once: if the process dies after fn finished and before its record was
stored, fn runs again on the redelivery. Make an external side effect idempotent with
`ctx.step_id` (stable across attempts) as its key. Outbound messages (send, broadcast, request,
reply) use ids derived from the inbound message and the step, so JetStream's duplicate window
(600 s by default) stores a re-sent one once.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from agents.errors import NondeterminismError, StepError
from agents.runtime.journal import MAX_STEPS, StepJournal
from agents.runtime.reads import last_by_subject
from agents.runtime.state import StateStore
from bus.client import Bus, answer_from
from bus.config import check_name
from bus.errors import RemoteError, RequestTimeout
from schemas import PRIORITY_DEFAULT, Delivery, Envelope
from schemas.payloads import RequestFailed

T = TypeVar("T")

_encode_json = msgspec.json.Encoder().encode


class StepInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The step running now: its number in the handler run, its name, its stable id."""

    index: int
    name: str
    id: str
    attempt: int


class OutboundRef(msgspec.Struct, frozen=True, kw_only=True):
    """An envelope a step published: its id and the stream sequence it is stored at."""

    id: str
    seq: int


class SendOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Optional envelope fields of an outbound message (the id, sender, correlation and
    causation are set by the step)."""

    priority: int = PRIORITY_DEFAULT
    expires_in_s: float | None = None
    headers: dict[str, str] = {}


def _fields(options: "SendOptions | None") -> dict[str, Any]:
    if options is None:
        return {}
    return {"priority": options.priority, "expires_in_s": options.expires_in_s, "headers": dict(options.headers)}


class Context:
    """The context of one handler run for one inbound envelope."""

    def __init__(self, *, bus: Bus, agent: str, envelope: Envelope[Any], delivery: Delivery) -> None:
        self.bus = bus
        self.agent = agent
        self.envelope = envelope
        self.delivery = delivery
        self.log = logging.getLogger(f"continuum.agent.{agent}")
        self.replied = False
        self.state = StateStore(bus, agent, context=self)
        self.journal = StepJournal(bus, agent, envelope, delivery)
        self._next_index = 0
        self._current: StepInfo | None = None

    @property
    def payload(self) -> Any:
        return self.envelope.payload

    @property
    def attempt(self) -> int:
        """The delivery attempt (1 for the first)."""
        return self.delivery.attempt

    @property
    def step_id(self) -> str:
        """The id of the step running now: the same on every attempt, so use it as the
        idempotency key of the step's external side effect. Raises StepError outside a step."""
        if self._current is None:
            raise StepError("ctx.step_id is only defined while a step's function runs")
        return self._current.id

    @property
    def current_step(self) -> StepInfo | None:
        return self._current

    # -- steps ----------------------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, type: Any = None) -> Any:
        """Run `fn(*args)` (sync or async) once for this inbound message and return its result.

        The result must be msgspec-encodable; it comes back decoded as `type` (default: fn's
        return annotation, else plain JSON types), identically on the first run and on replay.
        Raises StepError (misuse, unencodable result), NondeterminismError, BusUnavailable, and
        whatever fn raises (nothing is recorded then; the next attempt runs fn again).
        """
        result_type = type if type is not None else _return_type(fn)
        data = await self.run_step(name, lambda _info: fn(*args))
        return _decode(data, result_type, name)

    async def run_step(
        self, name: str, run: Callable[[StepInfo], Any], encode: Callable[[Any], bytes] = _encode_json
    ) -> bytes:
        """The step protocol, for step kinds built on it (messaging, state): return the
        recorded result of the next step as JSON, or call `run(info)`, record its result encoded
        with `encode`, and return that. Raises StepError, NondeterminismError, BusUnavailable."""
        if self._current is not None:
            raise StepError(
                f"step {name!r} started while step {self._current.name!r} is running: "
                "await steps one at a time (and do not nest them), so they replay in order"
            )
        index = self._next_index
        if index >= MAX_STEPS:
            raise StepError(f"a handler may run at most {MAX_STEPS} steps per message")
        self._next_index += 1
        info = StepInfo(index=index, name=name, id=self.journal.step_id(index, name), attempt=self.attempt)
        self._current = info
        try:
            recorded = await self.journal.recorded(index)
            if recorded is None:
                started = time.perf_counter()
                value = run(info)
                if inspect.isawaitable(value):
                    value = await value
                try:
                    data = encode(value)
                except (TypeError, msgspec.EncodeError) as exc:
                    raise StepError(f"step {name!r} returned a value msgspec cannot encode: {exc}") from exc
                recorded = await self.journal.record(index, name, data, (time.perf_counter() - started) * 1e3)
            if recorded.name != name:
                raise NondeterminismError(
                    f"step {index} of message {self.envelope.id} was recorded as {recorded.name!r} but "
                    f"this run called {name!r}: handlers must call their steps in the same order",
                    index=index, recorded=recorded.name, called=name,
                )
            return bytes(recorded.result)
        finally:
            self._current = None

    # -- messaging ------------------------------------------------------------------------

    async def send(self, to: str, payload: Any, *, options: "SendOptions | None" = None) -> OutboundRef:
        """Send `payload` to agent `to`, once per inbound message (a step named `send:<to>`).
        Raises BusUnavailable, ConfigurationError."""
        check_name(to, "agent name")
        return await self._publish_step(f"send:{to}", {"to": to, **_fields(options)}, payload)

    async def broadcast(self, tag: str, payload: Any, *, options: "SendOptions | None" = None) -> OutboundRef:
        """Send `payload` to every agent carrying `tag`, once per inbound message (a step)."""
        check_name(tag, "tag")
        return await self._publish_step(f"broadcast:{tag}", {"tag": tag, **_fields(options)}, payload)

    async def reply(self, payload: Any) -> OutboundRef:
        """Answer the inbound request (a step). Raises ConfigurationError if it is not a request."""

        async def run(_info: StepInfo) -> OutboundRef:
            sent = await self.bus.reply(self.envelope, payload, sender=self.agent)
            return OutboundRef(id=sent.envelope.id, seq=sent.ack.seq)

        data = await self.run_step("reply", run)
        self.replied = True
        return msgspec.json.decode(data, type=OutboundRef)

    async def request(
        self, to: str, payload: Any, *, timeout_s: float = 30.0, options: "SendOptions | None" = None
    ) -> Envelope[Any]:
        """Ask agent `to` and return its reply envelope (a step: the reply is recorded, so a
        redelivered message gets the same reply without asking again).

        Raises RequestTimeout (nothing recorded: the next attempt asks again with the same
        request id, so it is stored once), RemoteError (the other side failed; recorded).
        """
        check_name(to, "agent name")
        data = await self.run_step(
            f"request:{to}", lambda info: self._ask(info, to, payload, timeout_s, _fields(options)),
            encode=self.bus.codec.encode,
        )
        reply = self.bus.codec.decode(data)
        if isinstance(reply.payload, RequestFailed):
            raise RemoteError(reply.payload.reason, error_type=reply.payload.error_type)
        return reply

    async def _publish_step(self, name: str, fields: dict[str, Any], payload: Any) -> OutboundRef:
        async def run(info: StepInfo) -> OutboundRef:
            envelope = self.bus.envelope(
                payload,
                sender=self.agent,
                id=self.journal.outbound_id(info.index, name),
                correlation_id=self.envelope.correlation_id,
                causation_id=self.envelope.id,
                hops=self.envelope.hops + 1,
                **fields,
            )
            sent = await self.bus.publish(envelope)
            return OutboundRef(id=envelope.id, seq=sent.ack.seq)

        return msgspec.json.decode(await self.run_step(name, run), type=OutboundRef)

    async def _ask(
        self, info: StepInfo, to: str, payload: Any, timeout_s: float, fields: dict[str, Any]
    ) -> Envelope[Any]:
        bus = self.bus
        envelope = bus.envelope(
            payload,
            to=to,
            sender=self.agent,
            reply_to=self.agent,
            id=self.journal.outbound_id(info.index, f"request:{to}"),
            correlation_id=self.envelope.correlation_id,
            causation_id=self.envelope.id,
            hops=self.envelope.hops + 1,
            **fields,
        )
        reply_subject = bus.subjects.reply(self.agent, envelope.id, to)
        async with bus.transport.expect(reply_subject, timeout_s=timeout_s) as waiter:
            sent = await bus.publish(envelope)
            # A re-sent request (an earlier attempt sent it) may have been answered already.
            stored = await last_by_subject(bus, reply_subject) if sent.ack.duplicate else None
            if stored is not None:
                return answer_from(bus.codec, stored.data, to, envelope.id)
            answer = await waiter.next(timeout_s)
            if answer is not None:
                return answer_from(bus.codec, answer.data, to, envelope.id)
            stored = await last_by_subject(bus, reply_subject)
            if stored is not None:
                return answer_from(bus.codec, stored.data, to, envelope.id)
            raise RequestTimeout(
                f"no reply from {to!r} within {timeout_s}s to request {envelope.id}", request_id=envelope.id
            )


def _return_type(fn: Callable[..., Any]) -> Any:
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    try:
        hints = typing.get_type_hints(target)
    except (TypeError, NameError, AttributeError):
        return Any
    return hints.get("return", Any)


def _decode(data: bytes, result_type: Any, name: str) -> Any:
    try:
        return msgspec.json.decode(data, type=result_type)
    except msgspec.ValidationError as exc:
        raise StepError(f"recorded result of step {name!r} does not decode as {result_type!r}: {exc}") from exc
