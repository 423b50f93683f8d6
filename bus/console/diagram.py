"""A conversation's causal chain laid out for drawing: one lane per participant, one row per node.

Messages (to an agent, to a tag, replies, dead letters) are arrows from the sender's lane to the
recipient's; events are boxes in their agent's lane. Runs of routine events by one agent (steps,
turns, facts, ...) collapse into one node that counts them; what a reader looks for keeps a node
of its own: contradictions, model calls, block writes, dead letters. Every node keeps the log
sequences it stands for (the first `MAX_SEQS`), so the page opens each one's event.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec

MAX_SEQS = 50
MESSAGE_CATEGORIES = ("inbox", "group", "reply", "dead")
# Events that keep a node of their own, and how the drawing marks them.
HIGHLIGHT = {
    "memory.contradiction.flagged": "contradiction",
    "llm.call.completed": "model",
    "llm.call.failed": "model-failed",
    "delivery.dead_lettered": "dead",
    "delivery.dead_letter.retried": "retry",
    "memory.block.set": "block",
    "memory.block.appended": "block",
    "memory.block.replaced": "block",
    "memory.fact.superseded": "fact-ended",
    "memory.fact.retracted": "fact-ended",
}


class Node(msgspec.Struct, kw_only=True):
    """One drawn node: its row and lane (and target lane for a message), what it shows, and the
    log sequences behind it."""

    row: int
    lane: int
    to_lane: int | None = None
    kind: str
    label: str
    count: int = 1
    seqs: list[int]
    first_step: int
    category: str
    mark: str | None = None  # contradiction, model, dead, block, ... (see HIGHLIGHT)


class Diagram(msgspec.Struct, kw_only=True):
    """Lanes (participant names, `#tag` for a broadcast's audience), nodes in log order, and the
    conversation's size."""

    correlation_id: str
    lanes: list[str]
    nodes: list[Node]
    steps: int
    truncated: bool = False


def layout(correlation_id: str, steps: list[dict[str, Any]], *, truncated: bool = False) -> Diagram:
    """Lay out the rows of the `conversations` view for one correlation id (ordered by step)."""
    lanes: list[str] = []
    index: dict[str, int] = {}

    def lane(name: str) -> int:
        if name not in index:
            index[name] = len(lanes)
            lanes.append(name)
        return index[name]

    nodes: list[Node] = []
    run: Counter[str] = Counter()
    for step in steps:
        sender = step.get("sender") or "?"
        kind = step.get("kind") or "?"
        category = step.get("category") or "?"
        seq = int(step["seq"])
        source = lane(sender)
        if category in MESSAGE_CATEGORIES:
            target_name = (f"#{step['tag']}" if step.get("tag") else step.get("recipient")) or "?"
            target = lane(target_name)
            label = kind if category != "dead" else f"dead letter: {kind}"
            nodes.append(Node(row=len(nodes), lane=source, to_lane=target, kind=kind, label=label, seqs=[seq],
                              first_step=int(step["step"]), category=category))
            run = Counter()
            continue
        mark = HIGHLIGHT.get(kind)
        last = nodes[-1] if nodes else None
        if mark is None and last is not None and last.mark is None and last.category == "event" and last.lane == source:
            run[kind] += 1
            last.count += 1
            last.kind = "events" if len(run) > 1 else kind
            last.label = ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in run.most_common())
            if len(last.seqs) < MAX_SEQS:
                last.seqs.append(seq)
            continue
        run = Counter({kind: 1}) if mark is None else Counter()
        nodes.append(Node(row=len(nodes), lane=source, kind=kind, label=kind, seqs=[seq],
                          first_step=int(step["step"]), category=category, mark=mark))
    return Diagram(correlation_id=correlation_id, lanes=lanes, nodes=nodes, steps=len(steps), truncated=truncated)
