"""A cancellation that a library call loses (nats-py's `asyncio.wait_for` on Python 3.11) is
raised again, so the task stops instead of running on."""

from __future__ import annotations

import asyncio

import pytest

from bus.cancellation import cancellation_kept


async def swallowing(started: asyncio.Event) -> str:
    """Like 3.11's wait_for when the reply and the cancellation arrive together: the
    cancellation is caught and a result returned."""
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        return "reply"
    return "never"


async def test_a_lost_cancellation_is_raised_again() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(cancellation_kept(swallowing(started)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_without_a_cancellation_the_result_is_returned() -> None:
    async def answer() -> int:
        return 42

    assert await cancellation_kept(answer()) == 42


async def test_a_cancellation_already_being_handled_is_not_raised_twice() -> None:
    """Called while the task unwinds a cancellation (cleanup in a `finally`), the call
    completes: only a cancellation arriving during it counts."""
    results: list[int] = []

    async def answer() -> int:
        return 7

    async def cleanup_after_cancel() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            results.append(await cancellation_kept(answer()))

    task = asyncio.create_task(cleanup_after_cancel())
    await asyncio.sleep(0)  # one loop turn: the task is waiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert results == [7]
