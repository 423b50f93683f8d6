"""Recall memory: the agent's conversation, turn by turn, with the context window over it.

Every turn stays in recall (searchable with `search`); the window is the turns after the last
summarised or closed range. Turn numbers run 1, 2, ... per conversation; `record` decides the
next one. The fold never raises: a duplicate turn is ignored, a gap is applied and reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime

from agents.memory.anomaly import Anomaly
from agents.memory.tokens import content_chars
from schemas.payloads.llm import ContentBlock, Message, TextBlock, ToolResultBlock, ToolUseBlock
from schemas.payloads.memory import ConversationClosed, ConversationSummarised, TurnRecorded

RecallEvent = TurnRecorded | ConversationSummarised | ConversationClosed

_WORD = re.compile(r"[a-z0-9]+")


class TurnEntry:
    """A recorded turn plus what the compiler needs often: its size and its message."""

    __slots__ = ("event", "chars", "safe_start", "_message")

    def __init__(self, event: TurnRecorded) -> None:
        self.event = event
        blocks = event.content or [TextBlock(text=event.text)]
        prefix = _sender_prefix(event)
        self.chars = content_chars(blocks) + len(prefix)
        # The window may start here: a user turn that is not answering tool calls (a window
        # that began with a tool_result would orphan it from its tool_use).
        self.safe_start = event.role == "user" and not any(isinstance(b, ToolResultBlock) for b in blocks)
        self._message: Message | None = None

    @property
    def turn(self) -> int:
        return self.event.turn

    @property
    def message(self) -> Message:
        """The turn as a Messages-API message (user turns from other agents name the sender)."""
        if self._message is None:
            blocks: list[ContentBlock] = list(self.event.content or [TextBlock(text=self.event.text)])
            prefix = _sender_prefix(self.event)
            if prefix:
                first = next((i for i, b in enumerate(blocks) if isinstance(b, TextBlock)), None)
                if first is None:
                    blocks.insert(0, TextBlock(text=prefix.strip()))
                else:
                    blocks[first] = TextBlock(text=prefix + blocks[first].text)  # type: ignore[union-attr]
            self._message = Message(role=self.event.role, content=blocks)
        return self._message


def _sender_prefix(event: TurnRecorded) -> str:
    if event.role == "user" and event.sender and event.sender != event.agent:
        return f"[from {event.sender}] "
    return ""


class Conversation:
    """One conversation's turns, summaries and window."""

    __slots__ = ("entries", "summaries", "evicted_upto", "window_start", "closed_upto")

    def __init__(self) -> None:
        self.entries: list[TurnEntry] = []
        self.summaries: list[ConversationSummarised] = []
        self.evicted_upto = 0  # turns numbered <= this are outside the window
        self.window_start = 0  # index into entries of the first turn in the window
        self.closed_upto = 0

    @property
    def last_turn(self) -> int:
        return self.entries[-1].turn if self.entries else 0

    def window(self) -> list[TurnEntry]:
        """Turns inside the context window, oldest first."""
        return self.entries[self.window_start :]


class RecallLog:
    """An agent's conversations."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self._conversations: dict[str, Conversation] = {}
        self._summary_ids: set[str] = set()

    def conversation(self, name: str = "main") -> Conversation:
        """The conversation `name` (empty if nothing was recorded yet)."""
        conv = self._conversations.get(name)
        if conv is None:
            conv = self._conversations[name] = Conversation()
        return conv

    def conversations(self) -> list[str]:
        return list(self._conversations)

    @property
    def total_turns(self) -> int:
        return sum(len(c.entries) for c in self._conversations.values())

    # -- deciding -----------------------------------------------------------------------------

    def record(
        self,
        role: str,
        *,
        at: datetime,
        text: str = "",
        content: Sequence[ContentBlock] = (),
        conversation: str = "main",
        sender: str | None = None,
        envelope_id: str | None = None,
    ) -> TurnRecorded:
        """The event recording the next turn. Give `text`, or `content` blocks (then `text`
        becomes their searchable rendering). Raises ValueError for an empty turn or a bad role."""
        if role not in ("user", "assistant"):
            raise ValueError(f"role must be 'user' or 'assistant', got {role!r}")
        blocks = list(content)
        if len(blocks) == 1 and isinstance(blocks[0], TextBlock) and not blocks[0].cache and not text:
            text, blocks = blocks[0].text, []
        if blocks:
            text = text or searchable_text(blocks)
        if not text and not blocks:
            raise ValueError("a turn needs text or content")
        return TurnRecorded(
            agent=self.agent,
            turn=self.conversation(conversation).last_turn + 1,
            role=role,  # type: ignore[arg-type]
            at=at,
            text=text,
            content=blocks,
            conversation=conversation,
            sender=sender,
            envelope_id=envelope_id,
        )

    def record_message(self, message: Message, *, at: datetime, **kwargs: object) -> TurnRecorded:
        """`record` for a Messages-API message (e.g. the model's answer)."""
        return self.record(message.role, at=at, content=message.content, **kwargs)  # type: ignore[arg-type]

    # -- folding ------------------------------------------------------------------------------

    def apply(self, event: RecallEvent, seq: int = 0) -> Anomaly | None:
        """Fold one recall event. Events of other agents are ignored."""
        if event.agent != self.agent:
            return None
        kind = type(event).__struct_config__.tag
        conv = self.conversation(event.conversation)
        match event:
            case TurnRecorded(turn=turn):
                if turn <= conv.last_turn:
                    return None  # redelivered duplicate
                anomaly = None
                if turn != conv.last_turn + 1:
                    anomaly = Anomaly(
                        kind="turn_gap",
                        event_kind=kind,
                        detail=f"conversation {event.conversation!r}: turn {conv.last_turn} -> {turn}",
                        seq=seq,
                    )
                conv.entries.append(TurnEntry(event))
                return anomaly
            case ConversationSummarised(summary_id=summary_id, last_turn=last_turn):
                if summary_id in self._summary_ids:
                    return None
                self._summary_ids.add(summary_id)
                conv.summaries.append(event)
                if last_turn > conv.evicted_upto:
                    conv.evicted_upto = last_turn
                    while conv.window_start < len(conv.entries) and conv.entries[conv.window_start].turn <= last_turn:
                        conv.window_start += 1
                return None
            case ConversationClosed(last_turn=last_turn):
                conv.closed_upto = max(conv.closed_upto, last_turn)
                # A closed range leaves the window (it stays in recall): the next message
                # starts a fresh window.
                if last_turn > conv.evicted_upto:
                    conv.evicted_upto = last_turn
                    while conv.window_start < len(conv.entries) and conv.entries[conv.window_start].turn <= last_turn:
                        conv.window_start += 1
                return None
        return None

    # -- searching ----------------------------------------------------------------------------

    def search(
        self,
        query: str,
        *,
        role: str | None = None,
        conversation: str | None = None,
        limit: int = 10,
    ) -> list[TurnRecorded]:
        """Turns matching `query` (words, case-insensitive), best match first, then newest.

        An empty query returns the newest turns.
        """
        words = set(_WORD.findall(query.lower()))
        convs: Iterable[Conversation] = (
            [self.conversation(conversation)] if conversation is not None else self._conversations.values()
        )
        scored: list[tuple[int, datetime, int, TurnRecorded]] = []
        for conv in convs:
            for entry in conv.entries:
                event = entry.event
                if role is not None and event.role != role:
                    continue
                if words:
                    hits = len(words.intersection(_WORD.findall(event.text.lower())))
                    if hits == 0:
                        continue
                else:
                    hits = 0
                scored.append((hits, event.at, event.turn, event))
        scored.sort(key=lambda s: (s[0], s[1], s[2]), reverse=True)
        return [s[3] for s in scored[: max(0, limit)]]


def searchable_text(blocks: Iterable[ContentBlock]) -> str:
    """A plain-text rendering of content blocks: text, tool calls by name, tool results."""
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            parts.append(f"[called {block.name}]")
        elif isinstance(block, ToolResultBlock):
            parts.append(("[tool error] " if block.is_error else "[tool result] ") + block.content)
    return "\n".join(parts)
