"""Work items and their results."""

from __future__ import annotations

from typing import Any

from schemas.envelope import Payload


class TaskRequested(Payload, frozen=True, kw_only=True, tag="task.requested"):
    """Ask an agent (or a group) to do something."""

    title: str
    input: dict[str, Any] = {}


class TaskCompleted(Payload, frozen=True, kw_only=True, tag="task.completed"):
    """A task's result; `task_id` is the id of the `TaskRequested` envelope."""

    task_id: str
    output: dict[str, Any] = {}


class TaskFailed(Payload, frozen=True, kw_only=True, tag="task.failed"):
    """A task that could not be done, and why."""

    task_id: str
    error: str
