"""Built-in payload families. Each module holds one family; `BUILTIN_PAYLOADS` lists them all."""

from schemas.payloads.delivery import DeadLettered, DeliveryExpired, DeliveryReport, Settlement
from schemas.payloads.messaging import Note, Notice, Ping, Pong, RequestFailed
from schemas.payloads.work import TaskCompleted, TaskFailed, TaskRequested

BUILTIN_PAYLOADS: tuple[type, ...] = (
    Note,
    Notice,
    Ping,
    Pong,
    RequestFailed,
    TaskRequested,
    TaskCompleted,
    TaskFailed,
    DeadLettered,
    DeliveryExpired,
    DeliveryReport,
)

__all__ = [
    "BUILTIN_PAYLOADS",
    "DeadLettered",
    "DeliveryExpired",
    "DeliveryReport",
    "Note",
    "Notice",
    "Ping",
    "Pong",
    "RequestFailed",
    "Settlement",
    "TaskCompleted",
    "TaskFailed",
    "TaskRequested",
]
