"""Permission refusals: the server's `-ERR 'Permissions Violation for Publish to "X"'` (or
`Subscription to`), read into what was refused, and matched to the calls waiting on it.

The server refuses asynchronously: it drops the message, sends `-ERR`, and keeps the connection.
A request to a refused subject would otherwise wait out its whole timeout; `RefusalWatch`
fails it as soon as the `-ERR` arrives (well under a millisecond on one machine).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec

from bus.errors import PermissionDenied

T = TypeVar("T")

_VIOLATION = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"'\s]+)\"?", re.IGNORECASE)


class Refusal(msgspec.Struct, frozen=True):
    """What the server refused: `action` is "publish" or "subscribe"."""

    action: str
    subject: str

    def error(self, who: str) -> PermissionDenied:
        """The PermissionDenied for it, naming the subject, the permission and the identity."""
        return PermissionDenied(
            f"permission denied: {who} may not {self.action} to {self.subject!r} "
            f"(the server refused it; its credential lacks {self.action} permission on that subject)"
        )


def acting_as(connection: str, credential: Any) -> str:
    """Who a connection acts as, for refusal messages: its name, and its credential file (a
    bus.identity Credential) when it has one."""
    path = getattr(credential, "path", "")
    return f"{connection} (credential {path})" if path else connection


def parse_refusal(text: str) -> Refusal | None:
    """The refusal in a server error text, or None when it is not a permissions violation.
    (nats-py lowercases the text; subjects then compare case-insensitively.)"""
    found = _VIOLATION.search(text)
    if found is None:
        return None
    action = "publish" if found.group(1).lower() == "publish" else "subscribe"
    return Refusal(action, found.group(2))


class RefusalWatch:
    """Calls in flight on one connection, failed with PermissionDenied when the server refuses
    their subject. `guard(prefix, call)` runs `call`; a refusal of a subject starting with
    `prefix` (case-insensitive) raises at once and cancels the call."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._waiters: dict[int, tuple[str, str, asyncio.Future[Refusal]]] = {}
        self._next = 0

    def refused(self, refusal: Refusal) -> None:
        subject = refusal.subject.lower()
        for prefix, action, future in list(self._waiters.values()):
            if action == refusal.action and subject.startswith(prefix) and not future.done():
                future.set_result(refusal)

    async def guard(self, prefix: str, call: Awaitable[T], *, action: str = "publish", finish: bool = False) -> T:
        """The result of `call`. Raises PermissionDenied when the server refuses `action` on a
        subject starting with `prefix` meanwhile; whatever `call` raises otherwise. With
        `finish`, a refused call is awaited to its end rather than cancelled (a flush: nats-py
        cannot take back a PING whose PONG is on its way, and the PONG follows the -ERR)."""
        loop = asyncio.get_running_loop()
        refused: asyncio.Future[Refusal] = loop.create_future()
        key = self._next
        self._next += 1
        self._waiters[key] = (prefix.lower(), action, refused)
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait((task, refused), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not finish:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # owned to its end
            raise
        finally:
            del self._waiters[key]
        if not refused.done():  # a refusal wins even when the call also ended (a flush after it)
            return task.result()
        if not finish:
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:  # noqa: BLE001 - the refusal is the answer; the call's own end is moot
            pass
        refusal = refused.result()
        if refusal.subject.lower() == prefix.lower():  # nats-py lowercases it; say it as asked
            refusal = Refusal(refusal.action, prefix)
        raise refusal.error(self.who)
