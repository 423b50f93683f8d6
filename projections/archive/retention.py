"""Retention by policy: which records of the log may be trimmed, and when, per subject class.

A `RetentionClass` names subject filters (relative to the namespace: `event.*.agent.heartbeat`
is `<ns>.event.*.agent.heartbeat`) and the rule for their records:

    expire_after_s          purged once older than this, archived or not, or once archived like the
                            rest, whichever goes further (None: only once archived)
    keep_last_per_subject   the last record of each subject stays (fenced subjects: a writer's
                            expected-last-sequence must keep meaning what it meant)
    until_settled           never at or above a delivery still pending on any consumer (its
                            recorded steps and model call are read back on redelivery)
    until_delivered         never at or above a record a consumer has still to deliver or see
                            acknowledged (messages: an agent's backlog, a pending delivery)
    until_snapshot          never at or above the position of any memory agent's latest snapshot
                            (an agent restarting loads that snapshot plus what follows)

Whatever the class, nothing younger than `RetentionPolicy.min_age_s` is trimmed. Subjects of no
class are trimmed only below every class's bound and every last record kept (one purge of the
whole log below the lowest of them: NATS cannot purge "all but some subjects"), so a fenced
subject written once long ago holds them: the defaults give every built-in kind a class, leaving
only kinds an application adds. Classes may not overlap: a record belongs to one class.

`DEFAULT_RETENTION` is the table in the README (Retention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_S = 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class RetentionClass:
    """One subject class and its rule (see the module docstring)."""

    name: str
    filters: tuple[str, ...]
    expire_after_s: float | None = None
    keep_last_per_subject: bool = False
    until_settled: bool = False
    until_delivered: bool = False
    until_snapshot: bool = False

    def __post_init__(self) -> None:
        if not self.filters:
            raise ValueError(f"retention class {self.name!r} has no subject filter")
        for subject_filter in self.filters:
            if not subject_filter or subject_filter.startswith(".") or ">" in subject_filter[:-1] or " " in subject_filter:
                raise ValueError(f"retention class {self.name!r}: {subject_filter!r} is not a subject filter")
        if self.expire_after_s is not None and self.expire_after_s <= 0:
            raise ValueError(f"retention class {self.name!r}: expire_after_s must be more than 0")
        if self.expire_after_s is not None and (
            self.keep_last_per_subject or self.until_snapshot or self.until_settled or self.until_delivered
        ):
            raise ValueError(f"retention class {self.name!r}: records that expire cannot also wait for a "
                             "settlement or a snapshot, or keep a last record")


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """The classes (disjoint) and the age below which nothing is trimmed.

    min_age_s   nothing stored less than this long ago is trimmed (default 1 hour: longer than
                the duplicate window, a request's timeout and a handler's retries)
    """

    classes: tuple[RetentionClass, ...]
    min_age_s: float = 3600.0
    everything_else: str = "everything else"

    def __post_init__(self) -> None:
        if self.min_age_s < 0:
            raise ValueError("min_age_s must be 0 or more")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names) or self.everything_else in names:
            raise ValueError(f"retention class names must be unique (got {names})")
        filters = [(c.name, f) for c in self.classes for f in c.filters]
        for i, (name_a, a) in enumerate(filters):
            for name_b, b in filters[i + 1:]:
                if overlap(a, b):
                    raise ValueError(f"retention classes {name_a!r} and {name_b!r} overlap: {a} and {b}")


def overlap(a: str, b: str) -> bool:
    """Whether some subject matches both NATS subject filters `a` and `b`."""
    left, right = a.split("."), b.split(".")
    for i in range(max(len(left), len(right))):
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != y and x != "*" and y != "*":
            return False
    return True


DEFAULT_CLASSES: tuple[RetentionClass, ...] = (
    RetentionClass(name="heartbeats", filters=("event.*.agent.heartbeat",), expire_after_s=7 * DAY_S),
    RetentionClass(name="delivery reports", filters=("event.*.delivery.report",), expire_after_s=7 * DAY_S),
    RetentionClass(name="agent state", filters=("event.*.agent.state",), keep_last_per_subject=True),
    RetentionClass(name="memory blocks", filters=("event.*.memory.block.>",), keep_last_per_subject=True,
                   until_snapshot=True),
    RetentionClass(name="memory", filters=("event.*.memory.fact.>", "event.*.memory.contradiction.>",
                                           "event.*.memory.turn.>", "event.*.memory.conversation.>"),
                   until_snapshot=True),
    RetentionClass(name="memory snapshots", filters=("event.*.agent.memory.snapshot",), until_snapshot=True),
    RetentionClass(name="steps", filters=("event.*.step.>",), until_settled=True),
    RetentionClass(name="model calls", filters=("event.*.llm.>",), until_settled=True),
    RetentionClass(name="messages", filters=("inbox.>", "group.>", "reply.>"), until_delivered=True),
    RetentionClass(name="dead letters", filters=("dead.>",)),
    RetentionClass(name="lifecycle", filters=(
        "event.*.agent.started", "event.*.agent.stopped", "event.*.agent.crashed", "event.*.agent.restarted",
        "event.*.agent.circuit_opened",
    )),
    RetentionClass(name="delivery facts", filters=(
        "event.*.delivery.dead_lettered", "event.*.delivery.expired", "event.*.delivery.dead_letter.>",
    )),
    RetentionClass(name="archive facts", filters=("event.*.archive.>",)),
    RetentionClass(name="recorded work", filters=("event.*.note", "event.*.notice", "event.*.task.>")),
)

DEFAULT_RETENTION = RetentionPolicy(classes=DEFAULT_CLASSES)


@dataclass(frozen=True, kw_only=True)
class TrimSettings:
    """A trim: the policy, who asks and why (both recorded in the `archive.log.trimmed` event).

    views_wait_s   how long to wait for a projection service's views to have applied what is to
                   be trimmed (a trim goes no further than they did); 0: do not ask
    """

    policy: RetentionPolicy = field(default_factory=lambda: DEFAULT_RETENTION)
    by: str = "operator"
    reason: str = "policy"
    views_wait_s: float = 10.0
