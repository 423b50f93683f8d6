"""`LLMAgent`: an agent whose handlers think with a language model, with memory from the log.

    class Writer(LLMAgent):
        name = "writer"
        role = "writer"
        system_prompt = "You write the day's report. Cite every claim."
        tool_names = ("archival_search", "core_memory_append")
        core_blocks = (BlockSpec(label="log", limit=2000),)

        async def respond(self, note: Note, ctx: Context) -> None:
            result = await self.converse(ctx, note.text)
            await ctx.send("reviewer", Note(text=result.text))

Per inbound message, `converse` runs the tool loop, every effect a step of the runtime:

1. catch up memory from the log (facts, blocks, its own turns) and record the position reached;
2. record the inbound text as a user turn;
3. each round: compile the context within the token budget, record the evictions first, call the
   model, record the call (`llm.call.completed`, full request and response) and the assistant
   turn: one step, so a redelivered message gets the recorded answer and never calls the model
   again;
4. execute each tool call in order as its own step, recording its memory events and folding them
   before the next call; send what the tools asked to send; tell the other holders of a shared
   block it changed;
5. record the tool results as the next user turn; stop when the model ends its turn (or after
   `max_rounds`).

Memory events carry the inbound message as their causation and its correlation id, so a whole
workflow can be traced and replayed (agents.research.replay).

MCP tools (`mcp_servers = (McpServerSpec(...),)`, agents.mcp): the servers start in `on_start`
and stop in `on_stop`; their tools join the memory tools as `<server>__<tool>`; each call runs
in the same `tool:...` step with the step id as its idempotency key, so a redelivery, a restart
or a replay gets the recorded result and never calls the server again (agents.mcp.toolbox).

Retention (`retention = RetentionPolicy(idle_ttl=...)`, agents.memory.retention): conversations
idle longer than the TTL are summarised and closed, as events, by a `memory.retention` step that
runs on every message before its turn is recorded (as of the message's time) and on a
`memory.retention.sweep` notice, which the agent's timer (`background`) sends itself every
`sweep_every` when something looks idle, and anyone may send as a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from agents.llm import Model, ModelError, call_model
from agents.llm_agent.memory_log import BLOCK_WRITES, MemoryLog
from agents.llm_agent.models import build_model, choose_model
from agents.mcp.errors import McpUnavailable
from agents.mcp.spec import McpServerSpec, MountedTools
from agents.memory import (
    AgentMemory,
    ContextCompiler,
    ContextConfig,
    MemoryTools,
    ToolContext,
    ToolOutcome,
)
from agents.memory.errors import BlockExists, BlockLimitExceeded
from agents.memory.retention import (
    SWEEP_TOPIC,
    Clock,
    RetentionPolicy,
    SystemClock,
    decide,
    event_id,
    format_duration,
    idle_conversations,
    run_timer,
    sweep_id,
    sweep_instant,
    sweep_notice,
)
from agents.runtime import Agent, Context, handler
from bus.config import ConsumerSettings
from bus.errors import BusError, ConcurrencyConflict, PermanentError
from schemas import derived_id, stable_id
from schemas.payloads.llm import ModelResponse, ToolResultBlock, ToolSpec, ToolUseBlock
from schemas.payloads.memory import ConversationClosed, MemoryEvent
from schemas.payloads.messaging import Note, Notice

if TYPE_CHECKING:
    from bus.client import Bus

log = logging.getLogger("continuum.agents.llm_agent")

# Topic of the notice telling a block's other holders that it changed.
BLOCK_CHANGED = "memory.block.changed"
# A block write that keeps losing to other writers gives up after this many fresh tries.
MAX_FENCE_RETRIES = 8


class BlockSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A core block an agent makes sure exists when it starts. Give the same `block_id` and
    `holders` in every holder's spec to share one block; whoever starts first creates it."""

    label: str
    limit: int
    block_id: str | None = None
    holders: tuple[str, ...] = ()
    description: str = ""
    value: str = ""


class ConversationResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a `converse` ended: the model's final text, the rounds it took, and the memory events
    its tool calls recorded (facts, contradictions, block writes), in order."""

    text: str
    rounds: int
    events: list[MemoryEvent] = []
    stopped: bool = False  # True when the loop hit max_rounds


class _CallStep(msgspec.Struct, frozen=True, kw_only=True):
    """The recorded result of one model call step."""

    call_id: str
    request_sha256: str
    response: ModelResponse
    events: list[MemoryEvent]  # evictions, then the assistant turn


class LLMAgent(Agent):
    """Base class of agents run by a model with memory tools. See the module docstring.

    Class attributes: `role` (the "Role:" line the model and the offline policies read),
    `system_prompt`, `tool_names` (memory tools offered), `core_blocks`, `budget_tokens`,
    `max_rounds`, `max_output_tokens`, `retention` (None: conversations are never closed),
    `mcp_servers` (MCP servers whose tools are offered too; override `mcp()` to compute them),
    `mcp_attempts` (how often an MCP call is tried, its server started again each time, before
    the model is told it failed). The model is Claude when ANTHROPIC_API_KEY is set, else the
    offline model (agents.llm_agent.models); pass `model=` to choose one explicitly, and
    `clock=` for the retention timer (tests pass a ManualClock).
    """

    role: ClassVar[str] = "assistant"
    system_prompt: ClassVar[str] = ""
    tool_names: ClassVar[tuple[str, ...]] = ()
    core_blocks: ClassVar[tuple[BlockSpec, ...]] = ()
    budget_tokens: ClassVar[int] = 24_000
    max_rounds: ClassVar[int] = 12
    max_output_tokens: ClassVar[int] = 4096
    retention: ClassVar[RetentionPolicy | None] = None
    mcp_servers: ClassVar[tuple[McpServerSpec, ...]] = ()
    mcp_attempts: ClassVar[int] = 3
    # A memory snapshot (agents.llm_agent.snapshot) once the memory log has grown by this many
    # sequences since the last one, and by at least as many as the last one holds (each snapshot
    # copies the whole memory: growing the interval with it keeps snapshots a bounded share of
    # the log), checked at start and before each conversation turn; the log's retention trims
    # memory only below every memory agent's latest snapshot. 0: never.
    snapshot_every: ClassVar[int] = 1000
    # One message at a time: turns of one conversation must not interleave. A short ack_wait is
    # safe for long model calls (the consumer engine sends in-progress while a handler runs) and
    # brings a killed process's message back quickly.
    consumer: ClassVar[ConsumerSettings | None] = ConsumerSettings(concurrency=1, prefetch=0, ack_wait_s=3.0)

    def __init__(
        self, model: Model | None = None, *, model_name: str | None = None, clock: Clock | None = None
    ) -> None:
        self._model_arg = model
        self._model_name_arg = model_name
        self.clock: Clock = clock or SystemClock()
        self._log: MemoryLog | None = None
        self.mcp_tools: MountedTools | None = None
        # What on_start opened (the MCP servers), closed by on_stop.
        self._resources = AsyncExitStack()

    # -- lifecycle -----------------------------------------------------------------------------

    async def on_start(self, bus: Bus) -> None:
        """Pick the model, start the MCP servers, rebuild memory from the log, and create
        missing core blocks. Raises McpUnavailable when an MCP server cannot be started (the
        ones started are stopped again), BusUnavailable."""
        choice = choose_model()
        async with AsyncExitStack() as opened:
            mcp_tools = None
            if specs := self.mcp():
                from agents.mcp.toolbox import McpToolbox  # loads the MCP SDK: only when servers are mounted

                mcp_tools = await opened.enter_async_context(McpToolbox(specs))
            self.attach(
                MemoryLog(bus, bus.config.name),
                self._model_arg or build_model(choice),
                model_name=self._model_name_arg or choice.model,
                mcp_tools=mcp_tools,
            )
            await self.log.catch_up()
            if await self._ensure_blocks():
                # Fold again in log order: blocks show in creation order, and a block another
                # holder created just before ours must come first here too, as in any replay.
                self._log = MemoryLog(bus, self.agent_name)
                await self.log.catch_up()
            await self.snapshot_if_due()
            self._resources = opened.pop_all()

    async def snapshot_if_due(self) -> None:
        """Record a memory snapshot when the memory log has grown since the latest one by
        `snapshot_every` sequences and by as many as it holds entries (its id derives from the
        position: a retry stores it once). Raises BusUnavailable."""
        if self.snapshot_every <= 0:
            return
        grown = self.log.position - self.log.snapshot_position
        if grown >= max(self.snapshot_every, self.log.snapshot_entries):
            await self.log.snapshot()

    def attach(self, log: MemoryLog, model: Model, *, model_name: str, mcp_tools: MountedTools | None = None) -> None:
        """Bind the agent to its memory log, model and MCP tools (on_start does this; a replay
        binds a log that captures instead of publishing, a model and MCP tools that answer from
        the record)."""
        self.agent_name = log.agent
        self.model = model
        self.compiler = ContextCompiler(
            ContextConfig(
                model=model_name, agent=self.agent_name, role=self.role, system_prompt=self.prompt(),
                budget_tokens=self.budget_tokens, max_output_tokens=self.max_output_tokens,
            )
        )
        self.tools = MemoryTools(self.tool_names)
        self.mcp_tools = mcp_tools
        self._log = log

    async def on_stop(self) -> None:
        """Stop the MCP servers and close the model's client."""
        try:
            await self._resources.aclose()
        finally:
            close = getattr(self.model, "aclose", None)
            if close is not None:
                await close()

    def prompt(self) -> str:
        """The system prompt (override to compute it)."""
        return self.system_prompt

    def mcp(self) -> tuple[McpServerSpec, ...]:
        """The MCP servers to mount (override to compute them, e.g. from the process's
        configuration); a replay asks too, to know which tool names are theirs."""
        return self.mcp_servers

    def tool_specs(self) -> list[ToolSpec]:
        """The tools offered to the model: the memory tools, then the MCP servers'."""
        specs = self.tools.specs()
        return specs + self.mcp_tools.specs() if self.mcp_tools is not None else specs

    @property
    def log(self) -> MemoryLog:
        if self._log is None:
            raise RuntimeError("the agent has not started (on_start not run)")
        return self._log

    @property
    def memory(self) -> AgentMemory:
        return self.log.memory

    async def _ensure_blocks(self) -> bool:
        """Create the missing core blocks; True if any was created."""
        created = False
        for spec in self.core_blocks:
            block_id = spec.block_id or f"{self.agent_name}/{spec.label}"
            for _ in range(MAX_FENCE_RETRIES):
                if self.memory.blocks.by_id(block_id) is not None:
                    break
                try:
                    event = self.memory.blocks.create(
                        spec.label, limit=spec.limit, actor=self.agent_name, value=spec.value,
                        description=spec.description, holders=list(spec.holders) or None, block_id=block_id,
                    )
                except BlockExists:
                    break
                try:
                    # A fixed id: two holders starting at once store one creation.
                    await self.log.record(event, id=stable_id("block.created", self.log.bus.subjects.ns, block_id))
                    created = True
                except ConcurrencyConflict:
                    await self.log.catch_up()
        return created

    # -- handlers ------------------------------------------------------------------------------

    @handler
    async def on_note(self, note: Note, ctx: Context) -> Note | None:
        """A message for this agent: `respond` to it."""
        return await self.respond(note, ctx)

    @handler
    async def on_notice(self, notice: Notice, ctx: Context) -> Note | None:
        """A shared block changed: read it now, so the next call shows the new value. A
        retention sweep: close what is idle as of the instant it states (`sweep`); asked as a
        request, answer with what was closed. A sweep notice without an ISO 8601 instant is a
        PermanentError (dead-lettered, with the reason)."""
        if notice.topic == BLOCK_CHANGED:
            await self.log.catch_up()
        elif notice.topic == SWEEP_TOPIC:
            try:
                as_of = sweep_instant(notice)
            except ValueError as exc:
                raise PermanentError(str(exc)) from exc
            await self.log.catch_up()
            closed = await self.sweep(ctx, as_of)
            if ctx.envelope.reply_to is not None:
                return _sweep_answer(self.agent_name, self.retention, as_of, closed)
        return None

    async def respond(self, note: Note, ctx: Context) -> Note | None:
        """Default: converse on the note's text; answer a request with the final text."""
        result = await self.converse(ctx, note.text)
        return Note(text=result.text) if ctx.envelope.reply_to is not None else None

    # -- the tool loop -------------------------------------------------------------------------

    async def converse(self, ctx: Context, text: str, *, sender: str | None = None) -> ConversationResult:
        """Run the model on `text` to the end of its tool loop (see the module docstring).

        Raises ModelError (its failure recorded as `llm.call.failed`; retryable ones are
        redelivered), BusUnavailable, and the runtime's step errors.
        """
        now = ctx.envelope.created_at  # the same on every attempt: decisions replay identically
        await self.log.catch_up()
        await self.snapshot_if_due()
        await ctx.step("memory.position", lambda: self.log.position, type=int)
        await self.sweep(ctx, now)  # before the new turn, which would end the idleness
        await self._write(ctx, "turn:user", lambda: [self.memory.recall.record(
            "user", at=now, text=text, sender=sender or ctx.envelope.sender, envelope_id=ctx.envelope.id,
        )])
        produced: list[Any] = []
        for round_ in range(self.max_rounds):
            call = await ctx.step(f"llm:{round_}", lambda: self._call(ctx, now), type=_CallStep)
            for event in call.events:
                self.memory.apply(event)
            uses = call.response.tool_uses
            if not uses:
                return ConversationResult(text=call.response.text, rounds=round_ + 1, events=produced)
            results: list[ToolResultBlock] = []
            for i, use in enumerate(uses):
                outcome = await ctx.step(
                    f"tool:{round_}.{i}:{use.name}", lambda u=use: self._execute(ctx, u, now), type=ToolOutcome
                )
                for event in outcome.events:
                    self.memory.apply(event)
                produced += outcome.events
                await self._deliver(ctx, outcome)
                results.append(outcome.result)
            await self._write(ctx, f"turn:results:{round_}", lambda r=results: [
                self.memory.recall.record("user", at=now, content=r)
            ])
        return ConversationResult(
            text=f"(stopped: the tool loop did not end within {self.max_rounds} rounds)",
            rounds=self.max_rounds, events=produced, stopped=True,
        )

    # -- retention -----------------------------------------------------------------------------

    async def sweep(self, ctx: Context, as_of: datetime) -> list[ConversationClosed]:
        """Close this agent's conversations idle past the retention TTL as of `as_of`
        (agents.memory.retention.decide): a `memory.retention` step recording each closure's
        summary and close, and folding them. A redelivery gets the recorded events back; an
        event is stored under an id derived from what it closes, so a sweep retried after a
        crash, or decided again, stores nothing twice. Returns the closes; without a policy it
        runs no step and returns []. Raises BusUnavailable and the runtime's step errors."""
        policy = self.retention
        if policy is None or not policy.enabled:
            return []

        async def run() -> list[Any]:
            cfg = self.compiler.config
            closures = decide(
                self.memory, policy, now=as_of, summariser=self.compiler.summariser,
                summary_chars=cfg.summary_chars, chars_per_token=cfg.chars_per_token,
            )
            ns = self.log.bus.subjects.ns
            return [
                await self.log.record(event, id=event_id(ns, event), cause=ctx.envelope)
                for closure in closures for event in closure.events
            ]

        events = await ctx.step("memory.retention", run, type=list[MemoryEvent])
        for event in events:
            self.memory.apply(event)
        return [e for e in events if isinstance(e, ConversationClosed)]

    async def background(self, bus: Bus) -> None:
        """The retention timer: every `retention.sweep_every` (on `self.clock`), when a
        conversation looks idle past the TTL in this process's memory, send the agent a sweep
        notice, under one id per time bucket (replicas and restarts store one). The handler
        decides on the caught-up log. Returns at once without a policy or an interval."""
        policy = self.retention
        if policy is None or not policy.enabled or policy.sweep_every is None:
            return

        async def fire(bucket: int, as_of: datetime) -> None:
            if not idle_conversations(self.memory.recall, policy, as_of):
                return
            try:
                await bus.send(
                    self.agent_name, sweep_notice(as_of), id=sweep_id(bus.subjects.ns, self.agent_name, bucket)
                )
            except BusError as exc:
                # The next bucket tries again; a lazy sweep on the next message covers it too.
                log.warning("%s: could not send the retention sweep as of %s: %s", self.agent_name, as_of, exc)

        await run_timer(policy.sweep_every, self.clock, fire)

    async def _call(self, ctx: Context, now: datetime) -> _CallStep:
        step_id = ctx.step_id
        call_id = derived_id(step_id, "call")
        events: list[Any] = []
        # An earlier attempt that died after the model answered (before this step's record) left
        # its call in the log: adopt it rather than asking the model again.
        call = await self.log.recorded_call(call_id) if ctx.attempt > 1 else None
        if call is None:
            compiled = self.compiler.compile(self.memory, tools=self.tool_specs(), now=now)
            events = [
                await self.log.record(e, id=derived_id(step_id, f"evict/{k}"), cause=ctx.envelope)
                for k, e in enumerate(compiled.evictions)
            ]
            try:
                call = await call_model(
                    self.model, compiled.request, agent=self.agent_name, call_id=call_id, step=step_id
                )
            except ModelError as exc:
                if exc.failed_call is not None:
                    failed_id = derived_id(step_id, f"failed/{ctx.attempt}")
                    await self.log.record(exc.failed_call, id=failed_id, cause=ctx.envelope)
                raise
            await self.log.record(call, id=call_id, cause=ctx.envelope)
        # Decided again on a retry, under the same id: a turn stored before a crash is adopted.
        turn = self.memory.recall.record_message(call.response.as_message(), at=now)
        events.append(await self.log.record(turn, id=derived_id(step_id, "turn"), cause=ctx.envelope))
        return _CallStep(call_id=call_id, request_sha256=call.request_sha256, response=call.response, events=events)

    async def _execute(self, ctx: Context, use: ToolUseBlock, now: datetime) -> ToolOutcome:
        """Execute one tool call and record its events; a block write that lost a race is
        decided again on the fresh value. An MCP tool goes to its server (`_call_mcp`)."""
        step_id = ctx.step_id
        if self.mcp_tools is not None and self.mcp_tools.owns(use.name):
            return ToolOutcome(result=await self._call_mcp(ctx, self.mcp_tools, use))
        tool_ctx = ToolContext(agent=self.agent_name, now=now)
        for _ in range(MAX_FENCE_RETRIES):
            outcome = self.tools.execute(use, self.memory, tool_ctx)
            try:
                # The same ids on every try: a refused append stores nothing, and a write stored
                # by an attempt that died before recording this step comes back as a duplicate
                # (its stored event is adopted) instead of being applied a second time.
                stored = [
                    await self.log.record(e, id=derived_id(step_id, f"ev/{k}"), cause=ctx.envelope)
                    for k, e in enumerate(outcome.events)
                ]
            except ConcurrencyConflict:
                await self.log.catch_up()
                continue
            except BlockLimitExceeded as exc:
                return _error(use, f"{use.name} failed: {exc}")
            return msgspec.structs.replace(outcome, events=stored)
        return _error(use, f"{use.name} failed: the block kept changing under {MAX_FENCE_RETRIES} attempts; try again")

    async def _call_mcp(self, ctx: Context, tools: MountedTools, use: ToolUseBlock) -> ToolResultBlock:
        """Call an MCP tool with the step id as idempotency key; a server that is unavailable
        (McpUnavailable) is started again and called again, up to `mcp_attempts` tries, then
        the model is told the call failed and its outcome is unknown."""
        tries = max(1, self.mcp_attempts)
        failure: McpUnavailable | None = None
        for attempt in range(1, tries + 1):
            try:
                return await tools.call(use, key=ctx.step_id)
            except McpUnavailable as exc:
                failure = exc
                log.warning("%s: %s (try %d of %d)", self.agent_name, exc, attempt, tries)
            if attempt < tries:
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        # Tried again here rather than by redelivering the message: a message put back lets
        # the next one in first, and its turn would land between this tool call and its result
        # (a malformed conversation); dead-lettering it would leave the call without a result.
        return ToolResultBlock(tool_use_id=use.id, is_error=True, content=(
            f"{failure} ({tries} tries); the outcome of the call is unknown: it may have taken effect"
        ))

    async def _deliver(self, ctx: Context, outcome: ToolOutcome) -> None:
        for message in outcome.messages:
            if message.to is not None:
                await ctx.send(message.to, message.payload)
            elif message.tag is not None:
                await ctx.broadcast(message.tag, message.payload)
        notified: set[str] = set()
        for event in outcome.events:
            if not isinstance(event, BLOCK_WRITES):
                continue
            block = self.memory.blocks.by_id(event.block_id)
            for holder in block.holders if block is not None else ():
                if holder != self.agent_name and holder not in notified:
                    notified.add(holder)
                    await ctx.send(holder, Notice(text=event.block_id, topic=BLOCK_CHANGED))

    async def _write(self, ctx: Context, name: str, decide: Callable[[], Sequence[Any]]) -> list[Any]:
        """A step that decides memory events, records them, and folds them."""

        async def run() -> list[Any]:
            step_id = ctx.step_id
            return [
                await self.log.record(e, id=derived_id(step_id, f"ev/{k}"), cause=ctx.envelope)
                for k, e in enumerate(decide())
            ]

        events = await ctx.step(name, run, type=list[MemoryEvent])
        for event in events:
            self.memory.apply(event)
        return events


def _sweep_answer(
    agent: str, policy: RetentionPolicy | None, as_of: datetime, closed: Sequence[ConversationClosed]
) -> Note:
    if policy is None or policy.idle_ttl is None:
        return Note(text=f"{agent}: retention is off", data={"closed": []})
    lines = [f"{agent}: closed {c.conversation} up to turn {c.last_turn}: {c.reason}" for c in closed]
    text = "\n".join(lines) or f"{agent}: nothing idle > {format_duration(policy.idle_ttl)} as of {as_of.isoformat()}"
    return Note(text=text, data={"closed": [
        {"conversation": c.conversation, "last_turn": c.last_turn, "reason": c.reason} for c in closed
    ]})


def _error(use: ToolUseBlock, text: str) -> ToolOutcome:
    return ToolOutcome(result=ToolResultBlock(tool_use_id=use.id, content=text, is_error=True))
