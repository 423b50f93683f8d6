"""The context compiler: memory → one `ModelRequest` within a token budget.

Layout of the request, stable prefix first (so the provider's prompt cache hits):

    tools                       cache breakpoint on the last tool
    system[0]  agent header + system prompt          cache breakpoint
    system[1]  <core_memory> every held block         cache breakpoint (changes only on a write)
    system[2]  <memory_metadata> counts of what lies outside the window,
               <conversation_summaries> labelled, *below* the blocks, marked as older than them
    messages   the turns in the window, oldest first

Eviction: when the estimated input exceeds `budget_tokens x evict_at`, the oldest turns leave
the window until it fits `keep_after_eviction` of the message budget (hysteresis: eviction
happens once in a while, not on every call). The cut only falls where the window can start: a
user turn that is not a tool result, so a tool call is never separated from its result. The
evicted turns stay in recall; a `ConversationSummarised` event stands in for them. `compile` is
pure: it returns that event for the caller to record and apply, and builds the request as if it
were applied already.

A summary is written by a deterministic summariser that never quotes tool inputs (block edits),
carries the block versions of its time, and is shown under the blocks with a note that core
memory wins: a summary can never pass an old block value off as current.

Token counts are estimates (agents.memory.tokens): characters / `chars_per_token`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

import msgspec

from agents.memory.errors import ContextOverflow
from agents.memory.recall import TurnEntry
from agents.memory.render import render_block, render_core_memory, render_metadata, render_summaries
from agents.memory.state import AgentMemory
from agents.memory.summarise import ExtractiveSummariser, Summariser
from agents.memory.tokens import MESSAGE_OVERHEAD_TOKENS, TOOLS_OVERHEAD_TOKENS, tokens_for_chars, tools_chars
from schemas.ids import stable_id
from schemas.payloads.llm import (
    ContentBlock,
    Message,
    ModelRequest,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
)
from schemas.payloads.memory import ConversationSummarised

# Said in every request when the window opens on an assistant turn (the API wants a user first).
WINDOW_OPENER = "(Earlier turns are summarised above; the conversation continues.)"


class ContextConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How one agent's context is compiled."""

    model: str
    agent: str
    role: str
    system_prompt: str
    # Estimated input tokens per call. Keep it well under the model's window: cost grows with it.
    budget_tokens: int = 32_000
    max_output_tokens: int = 4096
    chars_per_token: float = 3.0
    # Evict when the estimate exceeds budget x evict_at; keep this share of the message budget.
    evict_at: float = 1.0
    keep_after_eviction: float = 0.5
    # Never evict the newest turns below this many (unless they alone overflow).
    min_window_turns: int = 2
    summary_chars: int = 1500
    summaries_shown: int = 3
    # One turn larger than this share of the message budget is clipped in the prompt (in recall
    # it stays whole).
    max_turn_share: float = 0.5
    conversation: str = "main"
    cache_prefix: bool = True

    def __post_init__(self) -> None:
        if self.budget_tokens < 256 or self.chars_per_token <= 0:
            raise ValueError("budget_tokens must be >= 256 and chars_per_token > 0")
        if not 0.0 < self.keep_after_eviction <= 1.0 or self.evict_at <= 0.0:
            raise ValueError("keep_after_eviction must be in (0, 1] and evict_at > 0")


class ContextEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Estimated input tokens by part, after any eviction."""

    system: int
    core_memory: int
    tools: int
    metadata: int
    messages: int
    total: int
    budget: int


class CompiledContext(msgspec.Struct, frozen=True, kw_only=True):
    """The request to send, the evictions to record first, and what went into it."""

    request: ModelRequest
    evictions: list[ConversationSummarised]
    estimate: ContextEstimate
    window_first_turn: int
    window_last_turn: int


class ContextCompiler:
    """Compiles requests for one agent. Keeps a render cache of blocks; otherwise stateless."""

    def __init__(self, config: ContextConfig, *, summariser: Summariser | None = None) -> None:
        self.config = config
        self.summariser: Summariser = summariser or ExtractiveSummariser()
        self._header = f"Agent: {config.agent}\nRole: {config.role}\n\n{config.system_prompt}"
        self._block_cache: dict[tuple[str, int, tuple[str, ...]], str] = {}

    def compile(self, memory: AgentMemory, *, tools: Sequence[ToolSpec] = (), now: datetime) -> CompiledContext:
        """The request for the agent's next call.

        Raises ContextOverflow when system prompt, core memory and tools alone exceed the
        budget, and ValueError when the window holds no turn to answer.
        """
        cfg = self.config
        cpt = cfg.chars_per_token
        conv = memory.recall.conversation(cfg.conversation)
        window = conv.window()
        if not window:
            raise ValueError(f"conversation {cfg.conversation!r} of {memory.agent} has no turn to answer")

        core = render_core_memory(self._render_blocks(memory))
        header_tokens = tokens_for_chars(len(self._header), cpt)
        core_tokens = tokens_for_chars(len(core), cpt)
        tools_tokens = tokens_for_chars(tools_chars(tools), cpt) + (TOOLS_OVERHEAD_TOKENS if tools else 0)
        fixed = header_tokens + core_tokens + tools_tokens
        # Reserve room for the metadata and the summaries shown, whatever they are this time.
        reserve = tokens_for_chars(cfg.summary_chars * cfg.summaries_shown + 600, cpt)
        message_budget = cfg.budget_tokens - fixed - reserve
        if message_budget <= 0:
            raise ContextOverflow(
                f"{memory.agent}: system prompt, core memory and tools need ~{fixed} tokens plus "
                f"{reserve} reserved for summaries; the budget is {cfg.budget_tokens}. Raise "
                "budget_tokens, shrink block limits, or offer fewer tools."
            )

        summaries = list(conv.summaries)
        evictions: list[ConversationSummarised] = []
        window_tokens = _tokens(window, cpt)
        if fixed + reserve + window_tokens > cfg.budget_tokens * cfg.evict_at:
            cut = _choose_cut(window, cpt, target=message_budget * cfg.keep_after_eviction, keep=cfg.min_window_turns)
            if cut > 0:
                evicted = window[:cut]
                event = self._summarise(memory, evicted, window_tokens - _tokens(window[cut:], cpt), now)
                evictions.append(event)
                summaries.append(event)
                window = window[cut:]
                window_tokens = _tokens(window, cpt)

        stats = memory.stats(cfg.conversation)
        if evictions:
            evicted_turns = sum(e.turns for e in evictions)
            stats = msgspec.structs.replace(
                stats, turns_in_window=stats.turns_in_window - evicted_turns, summaries=stats.summaries + len(evictions)
            )
        tail = render_metadata(stats)
        shown = render_summaries(summaries[-cfg.summaries_shown :]) if cfg.summaries_shown > 0 else ""
        if shown:
            tail += "\n" + shown
        tail_tokens = tokens_for_chars(len(tail), cpt)

        messages = _messages(window, clip_tokens=max(1, int(message_budget * cfg.max_turn_share)), cpt=cpt)
        cache = cfg.cache_prefix
        system = [TextBlock(text=self._header, cache=cache), TextBlock(text=core, cache=cache), TextBlock(text=tail)]
        tool_list = list(tools)
        if cache and tool_list:
            tool_list[-1] = msgspec.structs.replace(tool_list[-1], cache=True)
        request = ModelRequest(
            model=cfg.model, max_tokens=cfg.max_output_tokens, system=system, messages=messages, tools=tool_list
        )
        messages_tokens = window_tokens  # per-turn framing included
        estimate = ContextEstimate(
            system=header_tokens,
            core_memory=core_tokens,
            tools=tools_tokens,
            metadata=tail_tokens,
            messages=messages_tokens,
            total=fixed + tail_tokens + messages_tokens,
            budget=cfg.budget_tokens,
        )
        return CompiledContext(
            request=request,
            evictions=evictions,
            estimate=estimate,
            window_first_turn=window[0].turn,
            window_last_turn=window[-1].turn,
        )

    def _render_blocks(self, memory: AgentMemory) -> list[str]:
        out = []
        for block in memory.blocks.held():
            key = (block.block_id, block.version, block.holders)
            text = self._block_cache.get(key)
            if text is None:
                if len(self._block_cache) > 4096:
                    self._block_cache.clear()
                text = self._block_cache[key] = render_block(block)
            out.append(text)
        return out

    def _summarise(
        self, memory: AgentMemory, evicted: Sequence[TurnEntry], tokens_evicted: int, now: datetime
    ) -> ConversationSummarised:
        cfg = self.config
        first, last = evicted[0].turn, evicted[-1].turn
        text = self.summariser([e.event for e in evicted], max_chars=cfg.summary_chars)
        return ConversationSummarised(
            agent=memory.agent,
            summary_id=stable_id("summary", memory.agent, cfg.conversation, first, last),
            first_turn=first,
            last_turn=last,
            summary=text,
            method=self.summariser.method,
            turns=len(evicted),
            tokens_evicted=tokens_evicted,
            at=now,
            conversation=cfg.conversation,
            block_versions=memory.blocks.versions(),
        )


def _tokens(entries: Sequence[TurnEntry], cpt: float) -> int:
    chars = 0
    for entry in entries:
        chars += entry.chars
    return (math.ceil(chars / cpt) if chars else 0) + MESSAGE_OVERHEAD_TOKENS * len(entries)


def _choose_cut(window: Sequence[TurnEntry], cpt: float, *, target: float, keep: int) -> int:
    """Index of the first turn to keep: the earliest safe start whose suffix fits `target`,
    else the latest safe start that still keeps `keep` turns; 0 when nothing can go."""
    n = len(window)
    last_allowed = n - max(1, keep)
    suffix_chars = 0
    suffix = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix_chars += window[i].chars
        suffix[i] = suffix_chars
    best_fit = None
    latest_safe = 0
    for i in range(1, last_allowed + 1):
        if not window[i].safe_start:
            continue
        latest_safe = i
        if best_fit is None and suffix[i] / cpt + MESSAGE_OVERHEAD_TOKENS * (n - i) <= target:
            best_fit = i
            break
    return best_fit if best_fit is not None else latest_safe


def _messages(window: Sequence[TurnEntry], *, clip_tokens: int, cpt: float) -> list[Message]:
    """Window turns as alternating messages (consecutive turns of one role are merged)."""
    clip_chars = int(clip_tokens * cpt)
    out: list[Message] = []
    for entry in window:
        message = entry.message if entry.chars <= clip_chars else _clipped(entry, clip_chars)
        if out and out[-1].role == message.role:
            merged = _merge(out[-1].content, message.content)
            out[-1] = Message(role=message.role, content=merged)
        else:
            out.append(message)
    if out and out[0].role == "assistant":
        out.insert(0, Message(role="user", content=[TextBlock(text=WINDOW_OPENER)]))
    return out


def _merge(first: list[ContentBlock], second: list[ContentBlock]) -> list[ContentBlock]:
    # Tool results must lead a user message, so they go before any text of either part.
    combined = [*first, *second]
    results = [b for b in combined if isinstance(b, ToolResultBlock)]
    if not results:
        return combined
    return results + [b for b in combined if not isinstance(b, ToolResultBlock)]


def _clipped(entry: TurnEntry, clip_chars: int) -> Message:
    note = f"\n[clipped to {clip_chars} characters; turn {entry.turn} is whole in recall memory]"
    blocks: list[ContentBlock] = []
    for block in entry.message.content:
        if isinstance(block, TextBlock) and len(block.text) > clip_chars:
            blocks.append(TextBlock(text=block.text[:clip_chars] + note))
        elif isinstance(block, ToolResultBlock) and len(block.content) > clip_chars:
            blocks.append(msgspec.structs.replace(block, content=block.content[:clip_chars] + note))
        else:
            blocks.append(block)
    return Message(role=entry.message.role, content=blocks)
