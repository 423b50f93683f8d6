"""LLM agents using MCP tools: a real MCP server subprocess over stdio (fixtures_agents/
mcp_ledger_server.py), real nats-server, real agent processes under the supervisor; only the
model is the offline one (fixtures_agents/mcp_agent.py's CallPolicy).

The exactly-once proof: the clerk handles tasks that each append two ledger lines through the
server's `append` tool; its process is SIGKILLed at random points around the calls (after a
random number of calls began, plus a random delay of up to 12 ms: before a call, while the
server works on it, right after it answered and before its step was recorded). Every call
carries its step id as idempotency key, and the server keeps one line per key, so afterwards:
every task handled once, every ledger line exactly once, and the recorded append steps are
exactly the ledger's keys, each result naming its own line. `<ledger>.attempts` counts every
call: the difference is the calls a kill made run again (absorbed by the key).

The seed is printed; CONTINUUM_FAULT_SEED replays a run. The long run is `-m soak`.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from conftest import wait_for
from fixtures_agents import mcp_ledger_server
from fixtures_agents.helpers import payloads, read_log, subject_counts
from fixtures_agents.mcp_agent import McpClerk, ledger_server
from test_deadletter import dead_letters
from test_llm_agent import ctx_for
from test_supervisor import supervised

from agents.mcp.errors import McpConfigError, McpUnavailable
from agents.mcp.spec import IDEMPOTENCY_KEY, McpServerSpec, check_specs
from agents.mcp.toolbox import McpToolbox
from agents.memory import ToolOutcome
from agents.research.replay import replay_workflow
from agents.supervisor import AgentSpec, RestartPolicy, SupervisorSettings
from bus import Bus, BusConfig
from bus.server import free_port_outside_ephemeral_range
from schemas.payloads import AgentCrashed, Note, StepRecorded
from schemas.payloads.llm import ToolUseBlock

TESTS = Path(__file__).resolve().parent
BUS = Path(sys.executable).with_name("bus")
SEED_ENV = "CONTINUUM_FAULT_SEED"
APPENDS = 2  # ledger appends per task
_APPEND_STEP = re.compile(r"tool:\d+\.\d+:ledger__append")


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def use(name: str, **arguments: object) -> ToolUseBlock:
    return ToolUseBlock(id=f"toolu_{name}", name=name, input=dict(arguments))


def append_task(n: int) -> str:
    return " ; ".join(f'call append {{"entry": "{n}:{i}"}}' for i in range(APPENDS))


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ledger.txt"
    monkeypatch.setenv("CONTINUUM_TEST_LEDGER", str(path))
    return path


@asynccontextmanager
async def clerk(bus: Bus) -> AsyncIterator[McpClerk]:
    agent = McpClerk()
    await agent.on_start(bus)
    try:
        yield agent
    finally:
        await agent.on_stop()


# -- the spec and the toolbox, against the server alone ---------------------------------------


@pytest.mark.parametrize("fields", [
    {"name": "a__b", "command": "x"},           # the separator inside a name
    {"name": "files_", "command": "x"},         # a trailing '_' makes '<name>__<tool>' ambiguous
    {"name": "", "command": "x"},
    {"name": "with space", "command": "x"},
    {"name": "n" * 25, "command": "x"},
    {"name": "both", "command": "x", "url": "http://127.0.0.1:1/mcp"},
    {"name": "neither"},
    {"name": "blank", "command": "  "},
    {"name": "slow", "command": "x", "call_timeout_s": 0},
])
def test_a_spec_that_cannot_work_is_refused_when_it_is_made(fields: dict) -> None:
    """Bad names (they prefix tool names), both or neither transport, a zero timeout:
    McpConfigError at definition, before any process starts."""
    with pytest.raises(McpConfigError):
        McpServerSpec(**fields)


def test_two_servers_of_one_name_are_refused() -> None:
    """Their tools would share a prefix."""
    with pytest.raises(McpConfigError, match="two MCP servers"):
        check_specs([McpServerSpec(name="a", command="x"), McpServerSpec(name="a", url="http://h/mcp")])


def test_the_server_fixture_reads_the_key_the_agent_sends() -> None:
    assert mcp_ledger_server.IDEMPOTENCY_KEY == IDEMPOTENCY_KEY


def test_an_agent_without_mcp_servers_never_loads_the_sdk() -> None:
    """The SDK costs half a second to import: LLM agents and replays load it only to mount."""
    code = "import sys, agents.llm_agent, agents.research.replay, agents.mcp.spec; print('mcp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=TESTS.parent)
    assert out.stdout.strip() == "False"


async def test_tools_are_offered_with_the_server_prefix_and_misuse_is_an_error_result(ledger: Path) -> None:
    """Only allowed tools are offered, as `<server>__<tool>` with the server's schema; an
    unknown or not allowed name, wrong argument types and a failing tool come back as is_error
    results that say what is wrong; each call carries the key it was given."""
    spec = msgspec.structs.replace(ledger_server(), allowed_tools=("append", "echo", "fail"))
    async with McpToolbox([spec]) as toolbox:
        offered = {s.name: s for s in toolbox.specs()}
        assert list(offered) == ["ledger__append", "ledger__echo", "ledger__fail"]
        assert offered["ledger__echo"].input_schema["properties"]["times"]["type"] == "integer"
        assert toolbox.owns("ledger__hang") and not toolbox.owns("archival_search")

        echoed = await toolbox.call(use("ledger__echo", text="hi", times=2), key="key-1")
        assert not echoed.is_error and echoed.content.startswith("hihi key=key-1 pid=")
        assert echoed.tool_use_id == "toolu_ledger__echo"

        unknown = await toolbox.call(use("ledger__nope"), key="k")
        assert unknown.is_error and "unknown tool 'ledger__nope'" in unknown.content and "ledger__echo" in unknown.content
        refused = await toolbox.call(use("ledger__hang"), key="k")
        assert refused.is_error and "not allowed" in refused.content
        wrong = await toolbox.call(use("ledger__echo", text="hi", times="many"), key="k")
        assert wrong.is_error and "times" in wrong.content and "integer" in wrong.content
        failed = await toolbox.call(use("ledger__fail"), key="k")
        assert failed.is_error and "fail" in failed.content
    assert lines(Path(f"{ledger}.attempts")) == []  # nothing refused reached the ledger
    assert servers_of(ledger) == []  # leaving the toolbox stopped the server


async def test_a_hung_or_crashed_server_is_retryable_and_started_again_on_the_next_call(
    ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call the server does not answer within call_timeout_s, and a server that exits in a
    call, raise McpUnavailable (a RetryableError) promptly; the next call runs on a new server
    process."""
    monkeypatch.setenv("CONTINUUM_TEST_MCP_TIMEOUT_S", "0.5")
    async with McpToolbox([ledger_server()]) as toolbox:
        first = (await toolbox.call(use("ledger__echo", text="a"), key="k")).content
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(McpUnavailable, match="did not answer hang within 0.5s"):
            await toolbox.call(use("ledger__hang"), key="k")
        assert loop.time() - began < 5
        second = (await toolbox.call(use("ledger__echo", text="b"), key="k")).content
        with pytest.raises(McpUnavailable, match="closed the connection during crash"):
            await toolbox.call(use("ledger__crash"), key="k")
        third = (await toolbox.call(use("ledger__echo", text="c"), key="k")).content
    pids = [re.search(r"pid=(\d+)", text)[1] for text in (first, second, third)]  # type: ignore[index]
    assert len(set(pids)) == 3
    assert servers_of(ledger) == []  # the hung one too


async def test_a_server_reached_by_url_over_streamable_http(ledger: Path) -> None:
    """The same tools mounted by URL: offered with the prefix, called with the key."""
    port = free_port_outside_ephemeral_range()  # named on another program's command line
    server = await asyncio.create_subprocess_exec(
        sys.executable, mcp_ledger_server.__file__, "--ledger", str(ledger), "--http", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await wait_for(listening, timeout_s=20, what="the HTTP server listening")
        spec = McpServerSpec(name="ledger", url=f"http://127.0.0.1:{port}/mcp", allowed_tools=("echo", "append"))
        async with McpToolbox([spec]) as toolbox:
            assert [s.name for s in toolbox.specs()] == ["ledger__append", "ledger__echo"]
            echoed = await toolbox.call(use("ledger__echo", text="over http"), key="key-h")
            appended = await toolbox.call(use("ledger__append", entry="h"), key="key-h")
        assert echoed.content.startswith("over http key=key-h ") and appended.content == "appended h as line 1"
        assert lines(ledger) == ["key-h h"]
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)


async def test_a_server_that_cannot_start_is_mcp_unavailable_and_leaves_nothing_running(ledger: Path) -> None:
    """A command that does not exist: entering the toolbox raises McpUnavailable naming it,
    and the server started before it is stopped again."""
    good = ledger_server()
    bad = McpServerSpec(name="missing", command="/nonexistent/mcp-server")
    with pytest.raises(McpUnavailable, match="'missing' .*could not be started"):
        async with McpToolbox([good, bad]):
            pass
    assert servers_of(ledger) == []


def servers_of(ledger: Path) -> list[int]:
    """Pids of the ledger server processes serving `ledger`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(ledger).encode() in cmdline and str(mcp_ledger_server.__file__).encode() in cmdline:
            found.append(int(proc.name))
    return found


def test_tool_answers_render_as_text_for_the_model_and_are_bounded() -> None:
    """Text blocks verbatim, other blocks named, structured content as JSON when it is all
    there is; an answer over MAX_ANSWER_CHARS is cut with a note."""
    from mcp import types

    from agents.mcp.connection import MAX_ANSWER_CHARS, render

    mixed = types.CallToolResult(content=[
        types.TextContent(type="text", text="first"),
        types.ImageContent(type="image", data="aGk=", mime_type="image/png"),
    ])
    assert render(mixed) == "first\n[image content (image/png) not shown]"
    structured = types.CallToolResult(content=[], structured_content={"n": 1})
    assert render(structured) == '{"n":1}'
    long = render(types.CallToolResult(content=[types.TextContent(type="text", text="x" * (MAX_ANSWER_CHARS + 5))]))
    assert long.startswith("x" * MAX_ANSWER_CHARS) and long.endswith(f"(cut: the answer has {MAX_ANSWER_CHARS + 5} characters)")


async def test_a_replayed_call_that_was_never_recorded_is_a_replay_mismatch() -> None:
    """In a replay, MCP tools answer only from the record: an unrecorded call means the agent
    diverged (ReplayMismatch), never a call to a server."""
    from agents.llm.errors import ReplayMismatch
    from agents.mcp.recorded import RecordedTools

    tools = RecordedTools([ledger_server()], [], {})
    assert tools.owns("ledger__append") and not tools.owns("archival_insert")
    with pytest.raises(ReplayMismatch, match="never calls an MCP server"):
        await tools.call(use("ledger__append", entry="x"), key="k")


# -- an agent on the bus ----------------------------------------------------------------------


async def test_a_redelivered_message_gets_the_recorded_result_and_never_calls_the_server_again(
    bus: Bus, ledger: Path
) -> None:
    """Each MCP call is its own `tool:` step, called with the step id as idempotency key; a
    second attempt of the message replays every step from the log: same answer, no call."""
    async with clerk(bus) as agent:
        envelope = bus.envelope(Note(text='call append {"entry": "one"} ; call echo {"text": "hi"}'),
                                to="tester", sender="tester")
        first = await agent.converse(ctx_for(bus, envelope, 1), envelope.payload.text)
        calls = lines(Path(f"{ledger}.attempts"))
        again = await agent.converse(ctx_for(bus, envelope, 2), envelope.payload.text)
        assert again == first and lines(Path(f"{ledger}.attempts")) == calls and len(calls) == 1
    steps = {env.payload.name: env for _, env in await read_log(bus, "default.event.tester.step.>")}
    append, echo = steps["tool:0.0:ledger__append"], steps["tool:1.0:ledger__echo"]
    assert lines(ledger) == [f"{append.id} one"]  # the key is the step's id
    echoed = msgspec.json.decode(bytes(echo.payload.result), type=ToolOutcome).result.content
    assert f"key={echo.id} " in echoed and first.text.startswith("ledger__append: appended one as line 1\n")


async def test_bus_replay_replays_mcp_calls_from_the_record_without_starting_a_server(
    bus: Bus, ledger: Path
) -> None:
    """A handling with MCP calls replays to the same events, in this process and through
    `bus replay`, with no call reaching the server (its attempts log is unchanged)."""
    async with clerk(bus) as agent:
        sent = await bus.send("tester", Note(text='call append {"entry": "r"} ; call echo {"text": "x"}'),
                              sender="coordinator")
        await agent.on_note(sent.envelope.payload, ctx_for(bus, sent.envelope, 1))
    calls = lines(Path(f"{ledger}.attempts"))
    report = await replay_workflow(bus, sent.envelope.correlation_id, {"tester": McpClerk})
    assert report.same, report
    (handling,) = report.handlings
    assert handling.llm_calls == 3 and handling.recorded == handling.replayed > 0
    proc = await asyncio.create_subprocess_exec(
        str(BUS), "replay", sent.envelope.correlation_id, "--url", bus.config.url, "--creds", str(bus.config.credentials),
        "--agent", "tester=fixtures_agents.mcp_agent:McpClerk",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=TESTS,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and out.decode().strip().endswith("same events: yes"), out.decode()
    assert lines(Path(f"{ledger}.attempts")) == calls


async def test_bad_calls_and_failing_servers_leave_the_agent_running_and_lose_nothing(
    bus_config: BusConfig, bus: Bus, ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one agent process: wrong argument types and a failing tool are answered to the model
    at once; a hanging server and a crashing one are started and called again within the step,
    then (after `mcp_attempts` tries) answered as an error whose outcome is unknown, so the
    conversation stays in order and well formed; the task after them runs on a fresh server.
    Every task completes, none is dead-lettered, the agent process never restarts."""
    monkeypatch.setenv("CONTINUUM_TEST_MCP_TIMEOUT_S", "1")
    texts = [
        'call echo {"text": "x", "times": "many"}',
        'call fail {}',
        'call hang {}',
        'call crash {}',
        'call echo {"text": "still here"}',
    ]
    spec = AgentSpec(target="fixtures_agents.mcp_agent:McpFragileClerk", name="fragile", bus=bus_config,
                     workdir=str(TESTS))
    async with supervised(bus, spec, SupervisorSettings(restart=RestartPolicy(backoff_initial_s=0.05))) as sup:
        pid = (await sup.wait_ready(30)).replicas[0].pid
        for text in texts:
            await bus.send("fragile", Note(text=text))

        async def settled() -> bool:
            done = len(await read_log(bus, "default.inbox.sink.fragile")) + len(await dead_letters(bus, "fragile"))
            return done == len(texts)

        await wait_for(settled, timeout_s=60, interval_s=0.05, what="every task handled or dead-lettered")
        assert sup.pid_of(0) == pid
    notes = await payloads(bus, "default.inbox.sink.fragile", Note)
    answers = dict(n.text.split(" => ", 1) for n in notes)
    assert set(answers) == set(texts) and len(notes) == len(texts)
    assert answers[texts[0]].startswith("ledger__echo: error: ") and "valid integer" in answers[texts[0]]
    assert answers[texts[1]].startswith("ledger__fail: error: ")
    assert answers[texts[2]].startswith("ledger__hang: error: MCP server 'ledger' did not answer hang within 1s")
    assert answers[texts[3]].startswith("ledger__crash: error: MCP server 'ledger' closed the connection during crash")
    assert all("outcome of the call is unknown" in answers[t] for t in texts[2:4])
    assert answers[texts[4]].startswith("ledger__echo: still here key=")
    assert await dead_letters(bus, "fragile") == []
    assert await payloads(bus, "default.event.fragile.agent.crashed", AgentCrashed) == []


# -- exactly once under SIGKILL ---------------------------------------------------------------


async def run_with_kills(
    bus: Bus, config: BusConfig, ledger: Path, monkeypatch: pytest.MonkeyPatch, *, messages: int, kills: int
) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"MCP fault injection: {messages} tasks, {kills} kills, seed {seed} (replay: {SEED_ENV}={seed})")
    rng = random.Random(seed)
    attempts = Path(f"{ledger}.attempts")
    monkeypatch.setenv("CONTINUUM_TEST_STEP_MS", "2")
    tasks = {append_task(n) for n in range(messages)}
    for n in range(messages):
        await bus.send("clerk", Note(text=append_task(n)))
    # Kill points: once this many calls have begun (a sorted random sample), plus a random delay.
    thresholds = sorted(rng.sample(range(1, messages * APPENDS), kills))
    spec = AgentSpec(target="fixtures_agents.mcp_agent:McpClerk", name="clerk", bus=config, workdir=str(TESTS))
    settings = SupervisorSettings(
        restart=RestartPolicy(backoff_initial_s=0.02, backoff_max_s=0.1, max_crashes=100_000, window_s=1.0),
        stop_grace_s=10.0,
    )
    async with supervised(bus, spec, settings) as sup:
        progress = 0
        for killed, threshold in enumerate(thresholds, start=1):

            def due(threshold: int = threshold, progress: int = progress) -> bool:
                began = len(lines(attempts))
                return sup.status().replicas[0].state == "running" and began >= threshold and began > progress

            await wait_for(due, timeout_s=60, interval_s=0.002, what=f"calls before kill {killed}")
            await asyncio.sleep(rng.uniform(0, 0.012))  # before, during or right after a call
            pid = sup.pid_of(0)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            progress = len(lines(attempts))
            await wait_for(lambda pid=pid: sup.pid_of(0) not in (None, pid), timeout_s=30, what="replacement")

        async def all_handled() -> bool:
            info = await bus.js.consumer_info(bus.subjects.stream, "clerk__inbox")
            done = (await subject_counts(bus, "default.inbox.sink.clerk")).get("default.inbox.sink.clerk", 0)
            return done >= messages and info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(all_handled, timeout_s=120, interval_s=0.1, what="every task handled")

    # Every task handled, once.
    answers = [n.text.split(" => ")[0] for n in await payloads(bus, "default.inbox.sink.clerk", Note)]
    assert sorted(answers) == sorted(tasks)
    # Every ledger line exactly once.
    kept = [line.split(" ", 1) for line in lines(ledger)]
    entries = [entry for _, entry in kept]
    assert sorted(entries) == sorted(f"{n}:{i}" for n in range(messages) for i in range(APPENDS))
    assert len({key for key, _ in kept}) == len(kept)
    # The log's recorded append steps are the ledger's keys, once each, each naming its line.
    appends = [env for _, env in await read_log(bus, "default.event.clerk.step.>")
               if isinstance(env.payload, StepRecorded) and _APPEND_STEP.fullmatch(env.payload.name)]
    line_of = {key: (number, entry) for number, (key, entry) in enumerate(kept, start=1)}
    assert sorted(env.id for env in appends) == sorted(line_of)
    for env in appends:
        number, entry = line_of[env.id]
        result = msgspec.json.decode(bytes(env.payload.result), type=ToolOutcome).result
        assert result.content == f"appended {entry} as line {number}" and not result.is_error
    steps = await subject_counts(bus, "default.event.clerk.step.>")
    assert set(steps.values()) == {1}
    # Nothing dead-lettered; every kill seen as a crash.
    assert await subject_counts(bus, "default.dead.clerk") == {}
    crashes = await payloads(bus, "default.event.clerk.agent.crashed", AgentCrashed)
    assert len(crashes) == kills and all(c.signal == "SIGKILL" for c in crashes)
    # Orphans of killed agents exit with their parent; the last server stopped with its agent.
    await wait_for(lambda: servers_of(ledger) == [], timeout_s=10, what="no ledger server left running")
    calls = lines(attempts)
    print(
        f"MCP fault injection ok: {kills} kills, {len(calls)} calls for {len(kept)} lines: "
        f"{len(calls) - len(kept)} calls re-run after a kill, absorbed by the idempotency key"
    )


async def test_mcp_effects_exactly_once_under_random_kills(
    bus_config: BusConfig, bus: Bus, ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 tasks of 2 appends, 10 SIGKILLs around the calls: every task handled once, every
    ledger line exactly once, the recorded steps match the ledger, nothing dead-lettered."""
    await run_with_kills(bus, bus_config, ledger, monkeypatch, messages=20, kills=10)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_mcp_effects_exactly_once_under_random_kills_soak(
    bus_config: BusConfig, bus: Bus, ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 tasks, 80 SIGKILLs: the same guarantees as the CI variant."""
    await run_with_kills(bus, bus_config, ledger, monkeypatch, messages=200, kills=80)
