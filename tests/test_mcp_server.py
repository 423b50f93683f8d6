"""`bus mcp` driven by the official MCP SDK's own client over stdio, against a real bus.

The server runs as a subprocess (`python -m bus.cli.main mcp`), exactly as Claude Code or
Claude Desktop would start it; the projection service and the research team (on the offline
model) run in this process against a real nats-server. Pinned: the day-2 contradictions are
found (and none as of before day 2), a recorded fact is seen by the next search with
read-your-writes, a request reaches an agent and its reply comes back, the resources serve the
report and an agent's blocks; bad input of every kind is a clear tool error and the server
keeps serving with nothing lost.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextResourceContents

from conftest import wait_for

from agents.examples.greeter import Greeter
from agents.research.corpus import load_corpus
from agents.research.demo import DemoSettings, ResearchDemo
from agents.research.team import AGENT_CLASSES
from agents.runtime import AgentRuntime
from bus import Bus, BusConfig
from bus.server import free_port_outside_ephemeral_range
from projections.config import ProjectionSettings, QuerySettings
from projections.service import ProjectionService
from schemas.payloads import Note

CORPUS = load_corpus()
SENDER = "mcp-test"
TOOLS = {"search_memory", "open_contradictions", "whats_new", "record_fact", "send_message", "broadcast",
         "request_agent", "list_agents", "conversation_trace"}


@asynccontextmanager
async def views(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    """The projection service, answering queries over the bus (a short lag wait: a query for a
    sequence past the log's end is refused within 0.5 s)."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"), query=QuerySettings(max_lag_wait_s=0.5))
    async with ProjectionService(bus, settings) as service:
        yield service


@asynccontextmanager
async def team(config: BusConfig) -> AsyncIterator[None]:
    """The four research agents as runtimes in this process, on the offline model, and the
    example greeter (it answers pings: a request/reply partner)."""
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        readies = []
        for name, cls in {**AGENT_CLASSES, "greeter": Greeter}.items():
            ready = asyncio.Event()
            tasks.create_task(AgentRuntime(cls(), config, name=name).run(stop, on_ready=ready.set))
            readies.append(ready.wait())
        await asyncio.wait_for(asyncio.gather(*readies), 30)
        try:
            yield
        finally:
            stop.set()


@asynccontextmanager
async def mcp_session(config: BusConfig, tmp_path: Path) -> AsyncIterator[ClientSession]:
    """`bus mcp` started by the SDK's stdio client, initialised; its stderr goes to a file."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "bus.cli.main", "mcp", "--url", config.url, "--name", SENDER, "--home", str(tmp_path / "home"),
              *(["--creds", config.credentials] if config.credentials else [])],
        env={"BUS_MONITOR_URL": config.monitor_url or "", "PYTHONPATH": os.getcwd()},
        cwd=str(tmp_path),
    )
    with (tmp_path / "mcp.stderr").open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await asyncio.wait_for(session.initialize(), 30)
            yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured result."""
    result = await asyncio.wait_for(session.call_tool(tool, arguments), 60)
    assert isinstance(result, CallToolResult)
    assert not result.is_error, f"{tool} failed: {_text(result)}"
    assert result.structured_content is not None
    return result.structured_content


async def refused(session: ClientSession, tool: str, arguments: dict[str, Any]) -> str:
    """Call a tool that must fail; its error message, which is one line."""
    result = await asyncio.wait_for(session.call_tool(tool, arguments), 60)
    assert isinstance(result, CallToolResult) and result.is_error, f"{tool}({arguments}) did not fail"
    message = _text(result)
    assert "\n" not in message and len(message) <= 600, message
    return message


def _text(result: CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def test_a_client_finds_the_day_2_contradictions_records_a_fact_and_asks_an_agent(
    bus_config: BusConfig, tmp_path: Path
) -> None:
    """After the research demo's days 1 and 2: the open contradictions are exactly the corpus's
    day-2 ones (and there were none as of the end of day 1); what is new since day 1 is day 2's
    findings; a fact recorded through MCP carries the MCP sender, its citation and confidence,
    is found by the next search given its seq as min_seq, and recording it again stores nothing;
    a request to the greeter comes back with its reply; the resources serve the latest report
    and the synthesiser's blocks; a read without min_seq still sees the server's own writes
    (list_agents names the MCP sender); the tools declare output schemas."""
    config = msgspec.structs.replace(bus_config, name="coordinator")
    day2 = {f.id for p in CORPUS.day(2) for f in p.findings}
    declared = {frozenset(pair) for pair in CORPUS.contradictions() if pair[0] in day2}
    async with Bus(config) as bus, views(bus, tmp_path), team(config):
        demo = ResearchDemo(bus, DemoSettings(home=str(tmp_path), day_timeout_s=60), say=lambda line: None)
        await demo.run_day(1)
        second = await demo.run_day(2)
        async with mcp_session(bus_config, tmp_path) as session:
            listed = await session.list_tools()
            assert {t.name for t in listed.tools} == TOOLS
            assert all(t.output_schema for t in listed.tools)

            found = await call(session, "open_contradictions", min_seq=second.last_seq)
            assert {frozenset((c["a"]["source"], c["b"]["source"])) for c in found["contradictions"]} == declared
            assert all(c["open"] and c["actor"] == "synthesiser" for c in found["contradictions"])
            subject = found["contradictions"][0]["a"]["subject"]
            about = await call(session, "open_contradictions", subject=subject)
            assert about["contradictions"] and all(subject in (c["a"]["subject"], c["b"]["subject"])
                                                   for c in about["contradictions"])
            before = await call(session, "open_contradictions", as_of=str(second.first_seq))
            assert before["contradictions"] == [] and before["as_of_seq"] == second.first_seq
            now = await call(session, "open_contradictions", as_of=datetime.now(UTC).isoformat(),
                             min_seq=second.last_seq)
            assert {c["contradiction_id"] for c in now["contradictions"]} == {
                c["contradiction_id"] for c in found["contradictions"]}
            past = await call(session, "search_memory", as_of="2020-01-01T00:00:00Z", min_seq=second.last_seq)
            assert (past["as_of_seq"], past["facts"], past["turns"], past["blocks"]) == (0, [], [], [])

            turns = await call(session, "search_memory", text="day 2", kinds=["recall"], agent="researcher",
                               min_seq=second.last_seq)
            assert turns["turns"] and all(t["agent"] == "researcher" and "day 2" in t["text"].lower()
                                          for t in turns["turns"])
            held = await call(session, "search_memory", kinds=["blocks"], agent="synthesiser", limit=50,
                              min_seq=second.last_seq)
            assert "digest" in {b["label"] for b in held["blocks"]}

            new = await call(session, "whats_new", since=str(second.first_seq), limit=50, min_seq=second.last_seq)
            assert {f["source_ref"] for f in new["facts"]} == day2
            assert len(new["contradictions"]) == len(declared)

            recorded = await call(session, "record_fact", subject="mcp:read-your-writes", statement="An MCP "
                                  "client sees the fact it recorded in its next search.", source_ref="test:mcp.1",
                                  confidence=0.8, value="holds", source_title="tests/test_mcp_server.py")
            assert recorded["recorded_by"] == SENDER and not recorded["already_recorded"]
            hits = await call(session, "search_memory", text="read-your-writes", kinds=["facts"],
                              min_seq=recorded["seq"])
            [fact] = hits["facts"]
            assert (fact["fact_id"], fact["recorded_by"], fact["source_ref"], fact["confidence"], fact["recorded_seq"]) == (
                recorded["fact_id"], SENDER, "test:mcp.1", 0.8, recorded["seq"])
            again = await call(session, "record_fact", subject="mcp:read-your-writes", statement="An MCP "
                               "client sees the fact it recorded in its next search.", source_ref="test:mcp.1",
                               confidence=0.8, value="holds")
            assert again["already_recorded"] and again["seq"] == recorded["seq"]

            reply = await call(session, "request_agent", to="greeter", payload={"kind": "ping", "text": "mcp"},
                               timeout_s=30)
            assert (reply["sender"], reply["kind"], reply["text"]) == ("greeter", "pong", "hello, mcp")

            report = await session.read_resource("continuum://research/report/latest")
            [contents] = report.contents
            assert isinstance(contents, TextResourceContents) and "Report for day 2" in contents.text
            blocks = await session.read_resource("continuum://agents/synthesiser/blocks")
            assert "digest" in blocks.contents[0].text  # type: ignore[union-attr]

            trace = await call(session, "conversation_trace", correlation_id=second.correlation_id, limit=500)
            assert trace["steps"][0]["depth"] == 0 and trace["steps"][0]["target"] == "→ researcher"
            # No min_seq: a read through the server waits for the server's own writes by itself.
            agents = {a["name"] for a in (await call(session, "list_agents"))["agents"]}
            assert {"researcher", "synthesiser", "writer", "reviewer", SENDER} <= agents


async def test_bad_input_is_a_clear_tool_error_and_nothing_is_lost(bus_config: BusConfig, tmp_path: Path) -> None:
    """An unknown tool, arguments of the wrong JSON type, out-of-range numbers, a point that is
    neither a sequence nor a time, an invalid or unknown agent name, a request nobody answers,
    SQL in a search's words, and a query the service refuses (a min_seq past the log's end):
    each is an MCP tool error with a one-line message naming the problem. The server keeps
    serving: the fact recorded before is still found afterwards, the log holds no stray write."""
    async with Bus(bus_config) as bus, views(bus, tmp_path):
        silent = await bus.send("silent", Note(text="an agent that never runs"))  # known to the log, never answers
        async with mcp_session(bus_config, tmp_path) as session:
            recorded = await call(session, "record_fact", subject="mcp:robustness", statement="Bad input loses nothing.",
                                  source_ref="test:mcp.2", confidence=0.5)
            last = await bus.last_seq()

            assert "no_such_tool" in await refused(session, "no_such_tool", {})
            assert "limit: Input should be a valid integer" in await refused(session, "search_memory", {"limit": "ten"})
            assert "limit: Input should be less than or equal to 50 (got 500)" in await refused(
                session, "search_memory", {"limit": 500})
            assert "kinds" in await refused(session, "search_memory", {"kinds": ["facts", "dreams"]})
            assert "confidence" in await refused(session, "record_fact", {
                "subject": "s", "statement": "x", "source_ref": "r", "confidence": 1.5})
            assert "statement: Field required" in await refused(session, "record_fact", {
                "subject": "s", "source_ref": "r", "confidence": 0.5})
            assert "neither a log sequence" in await refused(session, "search_memory", {"as_of": "yesterday"})
            assert "invalid agent name" in await refused(session, "send_message", {"to": "two words", "text": "x"})
            assert "no agent carries the tag 'team'" in await refused(session, "broadcast", {"tag": "team",
                                                                                          "text": "x"})
            assert "unknown agent 'nobody'" in await refused(session, "request_agent", {"to": "nobody", "text": "x"})
            assert "unknown kind 'pnig'" in await refused(session, "send_message", {"to": "silent",
                                                                                  "payload": {"kind": "pnig"}})
            assert "either `text`" in await refused(session, "send_message", {"to": "silent"})
            assert "not a UUID" in await refused(session, "send_message", {"to": "silent", "text": "x",
                                                                           "message_id": "abc"})
            assert "no reply from 'silent'" in await refused(session, "request_agent", {
                "to": "silent", "text": "anyone?", "timeout_s": 0.5})
            assert "(lag)" in await refused(session, "search_memory", {"min_seq": last + 1_000_000})

            sql = await call(session, "search_memory", text="'; DROP TABLE facts; --", kinds=["facts"])
            assert sql["facts"] == []
            hits = await call(session, "search_memory", text="loses nothing", kinds=["facts"])
            assert [f["fact_id"] for f in hits["facts"]] == [recorded["fact_id"]]

            # Only the request that timed out was written after the fact (it stays in the log).
            requests = await bus.query("SELECT kind, recipient FROM events WHERE seq > ? AND seq > ? ORDER BY seq",
                                       [recorded["seq"], silent.ack.seq], min_seq=await bus.last_seq())
            assert [tuple(r) for r in requests.rows] == [("note", "silent")]

            sent = await call(session, "send_message", to="silent", text="retried once",
                              message_id="0190f1c2-0000-7000-8000-000000000001")
            twice = await call(session, "send_message", to="silent", text="retried once",
                               message_id="0190f1c2-0000-7000-8000-000000000001")
            assert twice["duplicate"] and twice["seq"] == sent["seq"]


async def test_streamable_http_serves_the_same_tools(bus_config: BusConfig, tmp_path: Path) -> None:
    """`bus mcp --http`: a client over streamable HTTP records a fact and reads it back with
    read-your-writes; SIGTERM stops the server."""
    port = free_port_outside_ephemeral_range()  # named on another program's command line
    async with Bus(bus_config) as bus, views(bus, tmp_path):
        with (tmp_path / "mcp-http.stderr").open("wb") as errlog:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bus.cli.main", "mcp", "--http", "--port", str(port), "--url", bus_config.url,
                "--creds", str(bus_config.credentials),
                "--name", SENDER, "--home", str(tmp_path / "home"), cwd=str(tmp_path), stdout=errlog, stderr=errlog,
                env={**os.environ, "BUS_MONITOR_URL": bus_config.monitor_url or ""},
            )
            try:
                await wait_for(lambda: _listening(port), timeout_s=30, interval_s=0.05, what="bus mcp --http listening")
                async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write), \
                        ClientSession(read, write) as session:
                    await asyncio.wait_for(session.initialize(), 30)
                    recorded = await call(session, "record_fact", subject="mcp:http", statement="HTTP works too.",
                                          source_ref="test:mcp.3", confidence=0.9)
                    hits = await call(session, "search_memory", subject="mcp:http", kinds=["facts"],
                                      min_seq=recorded["seq"])
                    assert [f["fact_id"] for f in hits["facts"]] == [recorded["fact_id"]]
            finally:
                process.terminate()
                assert await asyncio.wait_for(process.wait(), 30) is not None


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True
