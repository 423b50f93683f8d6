"""Stopping an agent through the bus: an operator asks its supervisor, wherever it runs.

    answer = await request_stop(bus, "writer", by="console-ana", reason="runaway costs")
    async with listen_for_stop(bus, "writer", on_stop) as listening: ...   # in the supervisor

The request is recorded first, as an `agent.stop.requested` event on the agent's event subject
(who asked and why; sent as `by`), then sent to the agent's control subject
(`_continuum.<ns>.control.<agent>`, core NATS: not in the log). The agent's supervisor listens
there with the agent's credential (whose grant allows that subject and answering a request), checks
the request, answers at once with its pid and replica count, and stops the replicas gracefully,
as on SIGTERM: each replica finishes its in-flight work and records `agent.stopped`.

Errors (bus.errors): ConfigurationError (no supervisor of that agent listens: it runs without
one, or is already stopped), BusUnavailable (no answer in time), PermissionDenied (the caller may
not record the event or send the request: only the admin credential may).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

from bus.errors import BusUnavailable, ConfigurationError, NoResponders
from schemas.payloads import AgentStopRequested

if TYPE_CHECKING:
    from bus.client import Bus
    from bus.transport import Inbound

log = logging.getLogger("continuum.agent_control")

ANSWER_TIMEOUT_S = 5.0
MAX_REASON = 500


class StopRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What travels on the control subject."""

    action: str  # "stop"
    by: str
    reason: str = ""
    event_id: str  # the `agent.stop.requested` event that records it


class StopAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What the supervisor answered: it is stopping `replicas` replicas (pid of the supervisor),
    or `error` when it refused the request (then it stops nothing)."""

    agent: str
    stopping: bool
    pid: int = 0
    replicas: int = 0
    error: str | None = None
    event_id: str = ""


_decode_request = msgspec.json.Decoder(StopRequest)
_decode_answer = msgspec.json.Decoder(StopAnswer)


async def request_stop(bus: Bus, agent: str, *, by: str, reason: str = "") -> StopAnswer:
    """Record the request, then ask `agent`'s supervisor to stop it; its answer. Raises
    ConfigurationError (no supervisor listens, or it refused), BusUnavailable, PermissionDenied."""
    subject = bus.subjects.control(agent)  # checks the name before anything is recorded
    reason = reason[:MAX_REASON]
    sent = await bus.record(agent, AgentStopRequested(agent=agent, by=by, reason=reason), sender=by)
    request = StopRequest(action="stop", by=by, reason=reason, event_id=sent.envelope.id)
    try:
        answer = await bus.transport.request(subject, msgspec.json.encode(request), timeout_s=ANSWER_TIMEOUT_S)
    except NoResponders:
        raise ConfigurationError(
            f"no supervisor of {agent!r} is listening on {subject}: it is not running under `bus agent start`, "
            "or it has stopped already (the request is recorded all the same)"
        ) from None
    try:
        outcome = _decode_answer.decode(answer.data)
    except msgspec.DecodeError as exc:
        raise BusUnavailable(f"the supervisor of {agent!r} answered something unreadable: {exc}") from exc
    if outcome.error is not None:
        raise ConfigurationError(f"the supervisor of {agent!r} refused to stop: {outcome.error}")
    return outcome


@contextlib.asynccontextmanager
async def listen_for_stop(
    bus: Bus, agent: str, on_stop: Callable[[StopRequest], Awaitable[StopAnswer]]
) -> AsyncIterator[None]:
    """Answer stop requests for `agent` with `on_stop`'s answer for the duration of the block.
    A request that is not one (any bytes) is answered with an error and changes nothing.
    Raises BusUnavailable, PermissionDenied (on entering)."""

    async def handle(message: Inbound) -> None:
        try:
            request = _decode_request.decode(message.data)
            if request.action != "stop":
                raise ValueError(f"unknown action {request.action!r}: only 'stop'")
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("a control request for %s was refused: %s", agent, exc)
            refused = StopAnswer(agent=agent, stopping=False, error=f"not a stop request: {exc}"[:300])
            await bus.transport.respond(message, msgspec.json.encode(refused))
            return
        answer = await on_stop(request)
        await bus.transport.respond(message, msgspec.json.encode(answer))

    subscription = await bus.transport.subscribe(bus.subjects.control(agent), handle)
    try:
        yield
    finally:
        await subscription.close()
