"""`bus trace <correlation-id>`: the causal tree of one conversation or run, as indented text or
a Mermaid `graph TD` diagram.

The tree is read from the `conversations` view over the bus (`Bus.query`), never from the views
file: every envelope with that correlation id, in log order, hangs under the envelope its
`causation_id` names. An envelope whose cause is not in the conversation (or that has none) is a
root. Each node says what it was (kind), who sent it to whom, where it is in the log, and when,
relative to the first envelope.

    bus trace 0190f1c2-...                  # indented text
    bus trace 0190f1c2-... --format mermaid > run.mmd
    bus trace 0190f1c2-... --depth 2 --agent writer

Each node also says what is inside in a few words: a step's name, a note's first words, a
task's title, a fact's subject and value, the model of a call. Leaf siblings of the same kind and
route (for steps, of the same name) are drawn once with a count, at the first one's place:
`agent.step "tool:archival_insert" x19`, `memory.fact.recorded (e.g. "fec:...") x19`. `--depth N` draws N levels (the roots are the first); `--agent A`
keeps only the branches that lead to something A sent or received.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bus.cli.common import CliError, add_connection_options, open_bus, out, positive_int

if TYPE_CHECKING:
    from bus import Bus

_SQL = """
SELECT c.seq, c.stored_at, c.id, c.kind, c.sender, c.recipient, c.tag, c.category, c.causation_id,
       CASE WHEN c.kind = 'agent.step' THEN e.payload->>'name'
            WHEN c.kind IN ('note', 'notice') THEN left(e.payload->>'text', 60)
            WHEN c.kind LIKE 'task.%' THEN e.payload->>'title'
            WHEN c.kind LIKE 'llm.call.%' THEN e.payload->>'model'
            WHEN c.kind LIKE 'memory.fact.%' THEN concat_ws(' ', e.payload->>'subject', e.payload->>'value')
       END AS summary
FROM conversations AS c LEFT JOIN events AS e ON e.seq = c.seq
WHERE c.correlation_id = ? ORDER BY c.seq
"""
# A step name's round and position ("tool:0.3:archival_insert") differ between repeats of the
# same step; without them repeated tool calls collapse into one node.
_STEP_POSITION = re.compile(r":\d+(?:\.\d+)?(?=:|$)")


@dataclass
class TraceNode:
    """One envelope of the conversation and the envelopes it caused (in log order)."""

    seq: int
    id: str
    kind: str
    sender: str
    target: str  # "→ bob", "→ #team", or "(event)"
    stored_at: datetime | None
    causation_id: str | None
    children: list[TraceNode] = field(default_factory=list)
    # The cause is named but is not an earlier envelope of this conversation.
    foreign_cause: bool = False
    # A few words on what is inside (see the module docstring); None when nothing is said.
    summary: str | None = None


@dataclass(frozen=True)
class Trace:
    """The causal forest of one correlation id."""

    correlation_id: str
    roots: list[TraceNode]
    count: int
    started_at: datetime | None
    truncated: bool = False


def build_trace(correlation_id: str, rows: Sequence[dict[str, Any]], *, truncated: bool = False) -> Trace:
    """Arrange `rows` (the `conversations` view's rows of one correlation id, in seq order) into
    a forest by causation. Pure; never raises on odd data (a cause that is missing or later in
    the log makes a root)."""
    nodes: list[TraceNode] = []
    by_id: dict[str, TraceNode] = {}
    for row in rows:
        node = TraceNode(
            seq=int(row["seq"]), id=str(row["id"]), kind=str(row["kind"] or "?"), sender=str(row["sender"] or "?"),
            target=_target(row), stored_at=row.get("stored_at"), causation_id=row.get("causation_id"),
            summary=_summary(row),
        )
        nodes.append(node)
        by_id.setdefault(node.id, node)  # a re-stored id keeps its first position
    roots: list[TraceNode] = []
    for node in nodes:
        parent = by_id.get(node.causation_id) if node.causation_id else None
        # Only an earlier envelope can be a cause: this also rules out cycles in malformed data.
        if parent is None or parent.seq >= node.seq:
            node.foreign_cause = node.causation_id is not None
            roots.append(node)
        else:
            parent.children.append(node)
    started = min((n.stored_at for n in nodes if n.stored_at is not None), default=None)
    return Trace(correlation_id, roots, len(nodes), started, truncated)


async def load_trace(bus: Bus, correlation_id: str, *, min_seq: int | None = None, max_rows: int = 10_000) -> Trace:
    """The trace of `correlation_id` from the projection service's `conversations` view.
    Raises QueryError, BusUnavailable (no projection service)."""
    result = await bus.query(_SQL, [correlation_id], min_seq=min_seq, max_rows=max_rows)
    return build_trace(correlation_id, result.records(), truncated=result.truncated)


@dataclass
class ShownNode:
    """A node as drawn: one envelope, or `count` leaf siblings of the same kind and route (a step:
    of the same name), first and last at `node.seq` and `last_seq`; `hidden` counts the
    envelopes below it cut by a depth limit."""

    node: TraceNode
    count: int = 1
    last_seq: int = 0
    children: list[ShownNode] = field(default_factory=list)
    hidden: int = 0
    # The collapsed siblings say different things (the label shows the first, as an example).
    varied: bool = False


def shape(trace: Trace, *, depth: int | None = None, agent: str | None = None) -> list[ShownNode]:
    """The forest as it is drawn: branches not leading to `agent` dropped (when given), levels
    past `depth` cut (counted), repeated leaf siblings collapsed."""

    def involves(node: TraceNode) -> bool:
        return agent is None or node.sender == agent or node.target == f"→ {agent}" or any(
            involves(child) for child in node.children
        )

    def size(node: TraceNode) -> int:
        return 1 + sum(size(child) for child in node.children)

    def build(nodes: list[TraceNode], level: int) -> list[ShownNode]:
        shown: list[ShownNode] = []
        groups: dict[tuple[Any, ...], ShownNode] = {}  # leaves drawn so far, by repeat key
        for node in nodes:
            if not involves(node):
                continue
            if depth is not None and level + 1 >= depth:
                here = ShownNode(node, last_seq=node.seq, hidden=size(node) - 1)
            else:
                here = ShownNode(node, last_seq=node.seq, children=build(node.children, level + 1))
            if here.children or here.hidden:
                shown.append(here)
                continue
            key = _repeat_key(node)
            group = groups.get(key)
            if group is None:
                groups[key] = here
                shown.append(here)
            else:
                group.count += 1
                group.last_seq = node.seq
                group.varied = group.varied or node.summary != group.node.summary
        return shown

    return build(trace.roots, 0)


def render_text(trace: Trace, *, depth: int | None = None, agent: str | None = None) -> list[str]:
    """The tree as indented lines: `#seq kind sender → target "summary"  +elapsed`."""
    lines = [f"trace {trace.correlation_id}: {trace.count} envelope(s)" + (" (truncated)" if trace.truncated else "")]

    def walk(shown: ShownNode, level: int) -> None:
        node = shown.node
        cause = f"  (caused by {node.causation_id}, not earlier in this trace)" if node.foreign_cause else ""
        lines.append(f"{'  ' * level}- {_label(trace, shown)}{cause}")
        for child in shown.children:
            walk(child, level + 1)

    for root in shape(trace, depth=depth, agent=agent):
        walk(root, 0)
    return lines


def render_mermaid(trace: Trace, *, depth: int | None = None, agent: str | None = None) -> list[str]:
    """The tree as a Mermaid `graph TD`: one node per drawn envelope or group (`n<seq>`), one edge
    per cause."""
    lines = ["graph TD"]
    edges: list[str] = []

    def walk(shown: ShownNode) -> None:
        node = shown.node
        lines.append(f'    n{node.seq}["{_mermaid_text(_label(trace, shown, "<br/>"))}"]')
        for child in shown.children:
            edges.append(f"    n{node.seq} --> n{child.node.seq}")
            walk(child)

    for root in shape(trace, depth=depth, agent=agent):
        walk(root)
    return lines + edges


def _label(trace: Trace, shown: ShownNode, route_sep: str = " ") -> str:
    node = shown.node
    seqs = f"#{node.seq}" if shown.count == 1 else f"#{node.seq}..#{shown.last_seq}"
    if node.summary is None:
        what = node.kind
    elif shown.count > 1 and node.kind == "agent.step":
        what = f'{node.kind} "{_STEP_POSITION.sub("", node.summary)}"'  # the name the repeats share
    elif shown.varied:
        what = f'{node.kind} (e.g. "{node.summary}")'
    else:
        what = f'{node.kind} "{node.summary}"'
    times = f" x{shown.count}" if shown.count > 1 else ""
    below = f"  (+{shown.hidden} below)" if shown.hidden else ""
    return f"{seqs} {what}{times}{route_sep}{node.sender} {node.target}{_elapsed(trace, node)}{below}"


def _repeat_key(node: TraceNode) -> tuple[Any, ...]:
    """Leaf siblings with the same key are drawn once, with a count: the same kind and route,
    and for a step the same name without its position ("tool:0.3:archival_insert" and
    "tool:1.0:archival_insert" are repeats; "memory.position" is not one of them)."""
    name = _STEP_POSITION.sub("", node.summary or "") if node.kind == "agent.step" else None
    return (node.kind, node.sender, node.target, name)


def _summary(row: dict[str, Any]) -> str | None:
    text = row.get("summary")
    if not text:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= 60 else text[:59] + "…"


# A full id is a UUID's 36 characters; fewer is the short form `bus tail` prints (its last 8).
FULL_ID_CHARS = 36
_SHORT_SQL = """
SELECT DISTINCT correlation_id FROM conversations
WHERE ends_with(correlation_id, ?) OR starts_with(correlation_id, ?)
ORDER BY correlation_id LIMIT 6
"""


async def resolve_short_id(bus: Bus, given: str, *, min_seq: int | None = None) -> str:
    """The correlation id `given` stands for: itself when whole, else the one id in the views that
    ends (or starts) with it. Raises CliError when several do."""
    given = given.strip()
    if len(given) >= FULL_ID_CHARS or not given:
        return given
    result = await bus.query(_SHORT_SQL, [given, given], min_seq=min_seq)
    found = [row["correlation_id"] for row in result.records()]
    if len(found) > 1:
        more = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise CliError(f"{given!r} is the short form of several correlation ids ({more}): give more of it")
    return found[0] if found else given


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `trace` to the `bus` command."""
    trace = subparsers.add_parser("trace", help="show the causal tree of one conversation (a correlation id)")
    trace.add_argument(
        "correlation_id", metavar="CORRELATION_ID",
        help="the conversation or run to show: its id, or the short form `bus tail` prints (its last characters)",
    )
    trace.add_argument("--format", choices=("text", "mermaid"), default="text", help="output format (default %(default)s)")
    trace.add_argument("--min-seq", type=int, help="wait until the views have applied this stream sequence")
    trace.add_argument("--depth", type=positive_int, default=None, help="draw at most N levels (the roots are the first)")
    trace.add_argument("--agent", default=None, help="only the branches leading to what this agent sent or received")
    add_connection_options(trace)
    trace.set_defaults(func=run_trace)


async def run_trace(args: argparse.Namespace) -> int:
    """Print the trace; CliError when the id has no envelopes."""
    async with open_bus(args, name="cli-trace") as bus:
        correlation_id = await resolve_short_id(bus, args.correlation_id, min_seq=args.min_seq)
        trace = await load_trace(bus, correlation_id, min_seq=args.min_seq)
    if trace.count == 0:
        raise CliError(
            f"no envelopes with correlation id {args.correlation_id!r} in the views: check the id "
            "(`bus query \"SELECT DISTINCT correlation_id FROM conversations\"`), or pass --min-seq "
            "if it was just sent"
        )
    render = render_mermaid if args.format == "mermaid" else render_text
    for line in render(trace, depth=args.depth, agent=args.agent):
        out(line)
    return 0


def _target(row: dict[str, Any]) -> str:
    if row.get("recipient"):
        return f"→ {row['recipient']}"
    if row.get("tag"):
        return f"→ #{row['tag']}"
    return f"({row.get('category') or 'event'})"


def _elapsed(trace: Trace, node: TraceNode) -> str:
    if trace.started_at is None or node.stored_at is None:
        return ""
    ms = (node.stored_at - trace.started_at).total_seconds() * 1000
    return f"  +{ms:.0f}ms" if ms < 10_000 else f"  +{ms / 1000:.1f}s"


def _mermaid_text(text: str) -> str:
    """Text safe inside a quoted Mermaid label (quotes and angle brackets as entities, except
    the `<br/>` line breaks this module puts there)."""
    escaped = text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace("&lt;br/&gt;", "<br/>")
