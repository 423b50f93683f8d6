"""Keeping a task's cancellation when a library call loses it.

nats-py waits for every request (JetStream API calls, `request`, `flush`) with `asyncio.wait_for`.
On Python 3.11, when a task is cancelled at the moment the reply arrives, `wait_for` returns the
reply and the cancellation is gone: the task runs on with `cancelling()` still counting it, and
a loop that should have stopped waits forever (seen as a service that never finishes stopping).
Awaiting such a call through `cancellation_kept` raises the lost `CancelledError` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def cancellation_kept(call: Awaitable[T]) -> T:
    """Await `call`; if the current task was cancelled meanwhile and the cancellation did not
    surface, raise CancelledError. Raises whatever `call` raises."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    result = await call
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError()
    return result
