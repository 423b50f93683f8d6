"""Plain messages between agents: notes, broadcast notices, ping/pong, request failures."""

from __future__ import annotations

from typing import Any

from schemas.envelope import Payload


class Note(Payload, frozen=True, kw_only=True, tag="note"):
    """Free text with optional structured data; the simplest thing to send to an agent."""

    text: str
    data: dict[str, Any] = {}


class Notice(Payload, frozen=True, kw_only=True, tag="notice"):
    """An announcement, usually broadcast to a tag."""

    text: str
    topic: str | None = None


class Ping(Payload, frozen=True, kw_only=True, tag="ping"):
    """A liveness probe; an agent answers with `Pong` when asked as a request."""

    text: str = ""


class Pong(Payload, frozen=True, kw_only=True, tag="pong"):
    """The answer to `Ping`."""

    text: str = ""
    responder: str = ""


class RequestFailed(Payload, frozen=True, kw_only=True, tag="request.failed"):
    """Sent as the reply when the handler of a request failed permanently, or returned without an
    answer (`error_type` NO_REPLY), so the requester learns it at once instead of waiting for its
    timeout."""

    reason: str
    error_type: str = ""


# `RequestFailed.error_type` of a request whose handler returned None without replying.
NO_REPLY = "no_reply"
