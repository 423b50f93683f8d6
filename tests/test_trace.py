"""`bus trace`: the causal tree of one correlation id, read over the bus from the projection
service, as indented text and as a Mermaid diagram."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.trace import build_trace, load_trace, render_mermaid, render_text, resolve_short_id
from bus import Bus
from bus.cli.common import CliError
from bus.cli.main import build_parser
from bus.server import EmbeddedServer
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas.payloads import Note, Notice, TaskCompleted, TaskRequested


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


async def _run(bus: Bus) -> tuple[str, dict[str, int], int]:
    """A small run: lead asks reader, reader delegates to scout and broadcasts, scout answers,
    reader answers lead; plus noise in another conversation. Returns (correlation id, seq by
    step name, last seq)."""
    ask = await bus.send("reader", TaskRequested(title="survey"), sender="lead")
    corr = ask.envelope.correlation_id
    dig = await bus.send("scout", TaskRequested(title="dig"), sender="reader", correlation_id=corr, causation_id=ask.envelope.id)
    note = await bus.broadcast("team", Notice(text="digging", topic="status"), sender="reader",
                               correlation_id=corr, causation_id=ask.envelope.id)
    found = await bus.send("reader", TaskCompleted(task_id=dig.envelope.id), sender="scout",
                           correlation_id=corr, causation_id=dig.envelope.id)
    await bus.send("lead", Note(text="unrelated"), sender="critic")
    done = await bus.send("lead", TaskCompleted(task_id=ask.envelope.id), sender="reader",
                          correlation_id=corr, causation_id=found.envelope.id)
    seqs = {"ask": ask.ack.seq, "dig": dig.ack.seq, "note": note.ack.seq, "found": found.ack.seq, "done": done.ack.seq}
    return corr, seqs, done.ack.seq


async def test_trace_builds_the_causal_tree_of_a_real_run(bus: Bus, service: ProjectionService) -> None:
    """The trace holds exactly the run's envelopes, each under its cause, children in log
    order; the text form indents by depth and the Mermaid form has one node per envelope and
    one edge per cause."""
    corr, s, last = await _run(bus)

    trace = await load_trace(bus, corr, min_seq=last)

    assert trace.count == 5 and [r.seq for r in trace.roots] == [s["ask"]]
    root = trace.roots[0]
    assert [c.seq for c in root.children] == [s["dig"], s["note"]]
    assert [c.seq for c in root.children[0].children] == [s["found"]]
    assert [c.seq for c in root.children[0].children[0].children] == [s["done"]]

    lines = render_text(trace)
    assert lines[0] == f"trace {corr}: 5 envelope(s)"
    body = [line.split("  +")[0] for line in lines[1:]]
    assert body == [
        f'- #{s["ask"]} task.requested "survey" lead → reader',
        f'  - #{s["dig"]} task.requested "dig" reader → scout',
        f"    - #{s['found']} task.completed scout → reader",
        f"      - #{s['done']} task.completed reader → lead",
        f'  - #{s["note"]} notice "digging" reader → #team',
    ]

    mermaid = render_mermaid(trace)
    assert mermaid[0] == "graph TD"
    nodes = [line for line in mermaid if line.lstrip().startswith("n") and "[" in line]
    edges = sorted(line.strip() for line in mermaid if "-->" in line)
    assert len(nodes) == 5 and f'n{s["dig"]}["#{s["dig"]} task.requested &quot;dig&quot;<br/>reader → scout' in nodes[1]
    assert edges == sorted([
        f"n{s['ask']} --> n{s['dig']}", f"n{s['ask']} --> n{s['note']}",
        f"n{s['dig']} --> n{s['found']}", f"n{s['found']} --> n{s['done']}",
    ])


async def test_bus_trace_command_prints_text_and_mermaid(
    bus: Bus, service: ProjectionService, nats_server: EmbeddedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bus trace ID` prints the indented tree, `--format mermaid` the diagram; an unknown id is
    a clear error, not an empty tree."""
    corr, s, last = await _run(bus)
    parser = build_parser()

    args = parser.parse_args(["trace", corr, "--url", nats_server.url, "--creds", bus.config.credentials, "--min-seq", str(last)])
    assert await args.func(args) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"trace {corr}: 5 envelope(s)" and text[1].startswith(f'- #{s["ask"]} task.requested "survey" lead → reader')

    args = parser.parse_args(["trace", corr, "--url", nats_server.url, "--creds", bus.config.credentials, "--format", "mermaid"])
    assert await args.func(args) == 0
    mermaid = capsys.readouterr().out.splitlines()
    assert mermaid[0] == "graph TD" and f"    n{s['found']} --> n{s['done']}" in mermaid

    args = parser.parse_args(["trace", "no-such-run", "--url", nats_server.url, "--creds", bus.config.credentials])
    with pytest.raises(CliError, match="no envelopes with correlation id 'no-such-run'"):
        await args.func(args)


async def test_the_short_id_tail_prints_finds_its_trace(bus: Bus, service: ProjectionService) -> None:
    """`bus tail` shows a correlation id's last 8 characters; `bus trace` takes them (or any start
    or end of the id) and says so when they fit several ids."""
    corr, _, last = await _run(bus)
    other = (await bus.send("lead", Note(text="another run"), sender="critic")).envelope.correlation_id
    assert await resolve_short_id(bus, corr[-8:], min_seq=last + 1) == corr
    assert await resolve_short_id(bus, corr, min_seq=last + 1) == corr
    assert await resolve_short_id(bus, "00000000", min_seq=last + 1) == "00000000"  # none: left as given
    shared = next(i for i in range(len(corr)) if corr[i] != other[i])
    assert shared >= 1  # ids made in the same minute share their start (UUIDv7: the time)
    with pytest.raises(CliError, match="short form of several correlation ids"):
        await resolve_short_id(bus, corr[:shared], min_seq=last + 1)


def _row(seq: int, kind: str, sender: str, recipient: str | None, cause: int | None, summary: str | None = None) -> dict:
    return {"seq": seq, "id": f"e{seq}", "kind": kind, "sender": sender, "recipient": recipient, "tag": None,
            "category": "event" if recipient is None else "inbox", "causation_id": None if cause is None else f"e{cause}",
            "stored_at": None, "summary": summary}


def test_repeated_steps_collapse_and_depth_and_agent_narrow_the_tree() -> None:
    """Tool-call steps that differ only in their position collapse into one node with a count;
    --depth cuts and counts what is below; --agent keeps the branches leading to that agent."""
    rows = [_row(1, "note", "lead", "writer", None, "write the report")]
    rows += [_row(2 + i, "agent.step", "writer", None, 1, f"tool:0.{i}:archival_insert") for i in range(19)]
    rows += [_row(21, "note", "writer", "reviewer", 1, "draft ready"),
             _row(22, "agent.step", "reviewer", None, 21, "llm:0"),
             _row(23, "note", "lead", "critic", None, "unrelated")]
    trace = build_trace("r", rows)
    text = render_text(trace)
    assert text[1] == '- #1 note "write the report" lead → writer'
    assert text[2] == '  - #2..#20 agent.step "tool:archival_insert" x19 writer (event)'
    assert text[3:] == ['  - #21 note "draft ready" writer → reviewer', '    - #22 agent.step "llm:0" reviewer (event)',
                        '- #23 note "unrelated" lead → critic']
    cut = render_text(trace, depth=1)
    assert cut[1:] == ['- #1 note "write the report" lead → writer  (+21 below)', '- #23 note "unrelated" lead → critic']
    focus = render_text(trace, agent="reviewer")
    assert focus[1:] == ['- #1 note "write the report" lead → writer', '  - #21 note "draft ready" writer → reviewer',
                         '    - #22 agent.step "llm:0" reviewer (event)']
    mermaid = render_mermaid(trace, agent="reviewer")
    assert sum(1 for line in mermaid if "[" in line) == 3 and "    n1 --> n21" in mermaid


def test_a_cause_outside_the_trace_or_later_in_the_log_makes_a_root() -> None:
    """Malformed causation (a cause not in the conversation, or one stored after its effect)
    never loses an envelope or loops: the envelope becomes a root and says why."""
    rows = [
        {"seq": 5, "id": "a", "kind": "note", "sender": "x", "recipient": "y", "causation_id": "elsewhere"},
        {"seq": 6, "id": "b", "kind": "note", "sender": "y", "recipient": "x", "causation_id": "c"},
        {"seq": 7, "id": "c", "kind": "note", "sender": "x", "recipient": "y", "causation_id": "b"},
    ]
    trace = build_trace("r", rows)
    assert [r.seq for r in trace.roots] == [5, 6] and [c.seq for c in trace.roots[1].children] == [7]
    assert trace.roots[0].foreign_cause and trace.roots[1].foreign_cause
    assert "not earlier in this trace" in render_text(trace)[1]
