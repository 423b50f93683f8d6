"""`bus trace <correlation-id>`: the causal tree of one conversation or run, as indented text or
a Mermaid `graph TD` diagram.

The tree is read from the `conversations` view over the bus (`Bus.query`), never from the views
file: every envelope with that correlation id, in log order, hangs under the envelope its
`causation_id` names. An envelope whose cause is not in the conversation (or that has none) is a
root. Each node says what it was (kind), who sent it to whom, where it is in the log, and when,
relative to the first envelope.

    bus trace 0190f1c2-...                  # indented text
    bus trace 0190f1c2-... --format mermaid > run.mmd
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bus.cli.common import CliError, add_connection_options, open_bus, out

if TYPE_CHECKING:
    from bus import Bus

_SQL = """
SELECT seq, stored_at, id, kind, sender, recipient, tag, category, causation_id
FROM conversations WHERE correlation_id = ? ORDER BY seq
"""


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


def render_text(trace: Trace) -> list[str]:
    """The tree as indented lines: `seq kind sender → target  +elapsed`."""
    lines = [f"trace {trace.correlation_id}: {trace.count} envelope(s)" + (" (truncated)" if trace.truncated else "")]

    def walk(node: TraceNode, depth: int) -> None:
        cause = f"  (caused by {node.causation_id}, not earlier in this trace)" if node.foreign_cause else ""
        lines.append(f"{'  ' * depth}- #{node.seq} {node.kind} {node.sender} {node.target}{_elapsed(trace, node)}{cause}")
        for child in node.children:
            walk(child, depth + 1)

    for root in trace.roots:
        walk(root, 0)
    return lines


def render_mermaid(trace: Trace) -> list[str]:
    """The tree as a Mermaid `graph TD`: one node per envelope (`n<seq>`), one edge per cause."""
    lines = ["graph TD"]
    edges: list[str] = []

    def walk(node: TraceNode) -> None:
        label = f"#{node.seq} {node.kind}<br/>{node.sender} {node.target}{_elapsed(trace, node)}"
        lines.append(f'    n{node.seq}["{_mermaid_text(label)}"]')
        for child in node.children:
            edges.append(f"    n{node.seq} --> n{child.seq}")
            walk(child)

    for root in trace.roots:
        walk(root)
    return lines + edges


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
    for line in render_mermaid(trace) if args.format == "mermaid" else render_text(trace):
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
