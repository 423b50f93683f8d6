"""Retention: a conversation idle longer than a TTL is summarised and closed, as events.

    policy = RetentionPolicy(idle_ttl=timedelta(days=1), sweep_every=timedelta(hours=1))
    for closure in decide(memory, policy, now=as_of):
        ...record closure.events (the summary, then the close), and fold them

A sweep looks at every conversation of the agent whose last turn is older than `now - idle_ttl`
and that is not closed up to that turn. For each it decides (pure, like the memory tools):

1. `memory.conversation.summarised` for the turns still in the context window (when the policy
   summarises and there are any), written by the same summariser as eviction, carrying the block
   versions of its time (a summary never passes an old block value off as current);
2. `memory.conversation.closed` up to the last turn, with `rule = "retention.idle_ttl"` and a
   reason that states it ("idle 2d 3h > ttl 1d").

Nothing is deleted: the turns stay in recall (`conversation_search`, the `recall` view). The
close moves the conversation's window past its last turn, so the next message starts a fresh
window; the closing summary is shown as background like any eviction summary (the newest
`summaries_shown`, below core memory, which wins where they disagree).

Time. A sweep is decided as of one instant that its trigger states, never by reading a clock
inside the decision, so a redelivery and a replay decide the same:

- on a message: the message's envelope time (the agent sweeps before recording the new turn);
- on a timer: a `memory.retention.sweep` notice the agent sends itself, whose text is the
  instant (the start of the `sweep_every` bucket). Its envelope id is derived from the agent and
  the bucket, so replicas and restarts store one per bucket (JetStream deduplication).

The `Clock` only decides when the timer fires; tests inject a `ManualClock` and never sleep.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import msgspec

from agents.memory.recall import Conversation, RecallLog
from agents.memory.state import AgentMemory
from agents.memory.summarise import ExtractiveSummariser, Summariser
from agents.memory.tokens import (
    DEFAULT_CHARS_PER_TOKEN,
    MESSAGE_OVERHEAD_TOKENS,
    tokens_for_chars,
)
from schemas.ids import stable_id
from schemas.payloads.memory import ConversationClosed, ConversationSummarised
from schemas.payloads.messaging import Notice

RULE = "retention.idle_ttl"
SWEEP_TOPIC = "memory.retention.sweep"
MIN_SWEEP_EVERY = timedelta(seconds=1)


class RetentionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How long an agent's conversations may stay idle, and how retention runs.

    idle_ttl     a conversation whose last turn is older than this is closed (None: retention
                 off, the default)
    summarise    summarise the turns still in the window before closing (else close only)
    sweep_every  how often the agent's timer looks for idle conversations (None: only when a
                 message arrives or a sweep is asked for); a conversation closes at most this
                 long after its TTL ran out

    Raises ValueError for a TTL that is not positive or a sweep interval under a second.
    """

    idle_ttl: timedelta | None = None
    summarise: bool = True
    sweep_every: timedelta | None = timedelta(hours=1)

    def __post_init__(self) -> None:
        if self.idle_ttl is not None and self.idle_ttl <= timedelta(0):
            raise ValueError(f"idle_ttl must be positive, got {self.idle_ttl}")
        if self.sweep_every is not None and self.sweep_every < MIN_SWEEP_EVERY:
            raise ValueError(f"sweep_every must be at least {MIN_SWEEP_EVERY}, got {self.sweep_every}")

    @property
    def enabled(self) -> bool:
        return self.idle_ttl is not None


class Closure(msgspec.Struct, frozen=True, kw_only=True):
    """One conversation closed by a sweep: the summary (if any) and the close, to record in
    that order."""

    conversation: str
    idle: timedelta
    closed: ConversationClosed
    summary: ConversationSummarised | None = None

    @property
    def events(self) -> list[ConversationSummarised | ConversationClosed]:
        return [self.closed] if self.summary is None else [self.summary, self.closed]


# -- deciding ---------------------------------------------------------------------------------


def idle_conversations(recall: RecallLog, policy: RetentionPolicy, now: datetime) -> list[tuple[str, timedelta]]:
    """(conversation, idle time) of each conversation a sweep at `now` would close: its last
    turn is older than `now - idle_ttl` and it is not closed up to that turn. Empty when
    retention is off."""
    if policy.idle_ttl is None:
        return []
    now = _aware(now)
    due = []
    for name in recall.conversations():
        conv = recall.conversation(name)
        if not conv.entries or conv.closed_upto >= conv.last_turn:
            continue
        idle = now - _aware(conv.entries[-1].event.at)
        if idle > policy.idle_ttl:
            due.append((name, idle))
    return due


def decide(
    memory: AgentMemory,
    policy: RetentionPolicy,
    *,
    now: datetime,
    summariser: Summariser | None = None,
    summary_chars: int = 1500,
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
) -> list[Closure]:
    """The closures a sweep at `now` decides (see the module docstring). Pure: records and
    changes nothing. Never raises on memory content."""
    summarise = summariser or ExtractiveSummariser()
    ttl = policy.idle_ttl
    now = _aware(now)
    out = []
    for name, idle in idle_conversations(memory.recall, policy, now):
        assert ttl is not None  # idle_conversations is empty when retention is off
        conv = memory.recall.conversation(name)
        summary = _summary(memory, conv, name, now, summarise, summary_chars, chars_per_token) if policy.summarise else None
        # No turn left to summarise (a sweep that died between its summary and its close, or a
        # window evicted to the end): the close names the summary that already covers them.
        summary_id = summary.summary_id if summary is not None else next(
            (s.summary_id for s in reversed(conv.summaries) if s.last_turn == conv.last_turn), None
        )
        closed = ConversationClosed(
            agent=memory.agent,
            last_turn=conv.last_turn,
            reason=f"idle {format_duration(idle, exact=True)} > ttl {format_duration(ttl)}",
            at=now,
            conversation=name,
            rule=RULE,
            idle_s=round(idle.total_seconds(), 3),
            ttl_s=ttl.total_seconds(),
            summary_id=summary_id,
        )
        out.append(Closure(conversation=name, idle=idle, closed=closed, summary=summary))
    return out


def _summary(
    memory: AgentMemory, conv: Conversation, name: str, now: datetime,
    summarise: Summariser, summary_chars: int, chars_per_token: float,
) -> ConversationSummarised | None:
    window = conv.window()
    if not window:
        return None  # every turn is summarised already (evicted)
    first, last = window[0].turn, window[-1].turn
    chars = sum(entry.chars for entry in window)
    return ConversationSummarised(
        agent=memory.agent,
        # The eviction summary's id scheme: one range is summarised once, whoever decides it.
        summary_id=stable_id("summary", memory.agent, name, first, last),
        first_turn=first,
        last_turn=last,
        summary=summarise([e.event for e in window], max_chars=summary_chars),
        method=summarise.method,
        turns=len(window),
        tokens_evicted=tokens_for_chars(chars, chars_per_token) + MESSAGE_OVERHEAD_TOKENS * len(window),
        at=now,
        conversation=name,
        block_versions=memory.blocks.versions(),
    )


def event_id(namespace: str, event: ConversationSummarised | ConversationClosed) -> str:
    """The envelope id to record a closure's event under: derived from what it closes, so a
    sweep retried after a crash, or decided again by another trigger in the duplicate window,
    is stored once."""
    what = "summary" if isinstance(event, ConversationSummarised) else "closed"
    return stable_id(SWEEP_TOPIC, namespace, event.agent, event.conversation, event.last_turn, what)


def format_duration(delta: timedelta, *, exact: bool = False) -> str:
    """`delta` in its two largest units: "2d 3h", "12h", "45m", "30s". With `exact`, a zero
    second unit is kept ("1d 0h") so a value just over a round TTL does not read as equal."""
    seconds = max(0, int(delta.total_seconds()))
    units = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)]
    for i, (name, size) in enumerate(units):
        if seconds >= size or size == 1:
            head = f"{seconds // size}{name}"
            if size == 1:
                return head
            sub_name, sub_size = units[i + 1]
            sub = seconds % size // sub_size
            return f"{head} {sub}{sub_name}" if sub or exact else head
    raise AssertionError("unreachable")


def _aware(at: datetime) -> datetime:
    # Times in the log are UTC; a naive one (hand-written) is read as UTC rather than refused.
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


# -- the sweep trigger --------------------------------------------------------------------------


def sweep_notice(as_of: datetime) -> Notice:
    """The notice asking an agent to sweep as of `as_of` (what its timer sends itself)."""
    return Notice(text=_aware(as_of).isoformat(), topic=SWEEP_TOPIC)


def sweep_instant(notice: Notice) -> datetime:
    """The instant a sweep notice asks to sweep as of. Raises ValueError when its text is not
    an ISO 8601 time."""
    try:
        return _aware(datetime.fromisoformat(notice.text.strip()))
    except ValueError as exc:
        raise ValueError(
            f"a {SWEEP_TOPIC} notice must say the instant to sweep as of in ISO 8601 "
            f"(e.g. 2026-03-02T09:00:00+00:00), got {notice.text[:60]!r}"
        ) from exc


def sweep_id(namespace: str, agent: str, bucket: int) -> str:
    """The envelope id of the timer's sweep notice for one time bucket (one per bucket)."""
    return stable_id(SWEEP_TOPIC, namespace, agent, bucket)


# -- time -------------------------------------------------------------------------------------


class Clock(Protocol):
    """Where the retention timer reads the time and waits."""

    def now(self) -> datetime: ...

    async def sleep_until(self, when: datetime) -> None: ...


class SystemClock:
    """The wall clock (UTC)."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        await asyncio.sleep(max(0.0, (when - self.now()).total_seconds()))


class ManualClock:
    """A clock that moves only when told (`advance`, `set`): for tests, which never sleep."""

    def __init__(self, start: datetime) -> None:
        self._now = _aware(start)
        self._moved = asyncio.Event()
        self.sleepers = 0  # tasks waiting in sleep_until now
        self.looks = 0  # times a sleeper looked at the clock (a test waits for it to grow)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by `delta` and wake whoever waits for a time now passed."""
        self.set(self._now + delta)

    def set(self, when: datetime) -> None:
        """Set the clock to `when` (forward or back) and wake the waiters to look again."""
        self._now = _aware(when)
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def sleep_until(self, when: datetime) -> None:
        self.sleepers += 1
        try:
            while True:
                self.looks += 1
                if self._now >= when:
                    return
                await self._moved.wait()
        finally:
            self.sleepers -= 1


async def run_timer(every: timedelta, clock: Clock, fire: Callable[[int, datetime], Awaitable[Any]]) -> None:
    """Call `fire(bucket, as_of)` now and then at every `every` boundary (of the epoch), until
    cancelled. `as_of` is the bucket's start, so every replica fires the same instant; buckets
    missed while the clock jumped are skipped (one sweep covers them). Raises what `fire` raises."""
    step = every.total_seconds()
    while True:
        bucket = math.floor(clock.now().timestamp() / step)
        await fire(bucket, datetime.fromtimestamp(bucket * step, UTC))
        await clock.sleep_until(datetime.fromtimestamp((bucket + 1) * step, UTC))
