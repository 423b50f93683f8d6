"""The `bus` command, run for real: as a subprocess (the installed entry point) against real
nats-servers on free ports, with a temporary BUS_HOME. In-process `main([...])` only where no
server or event loop is involved.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from bus import Bus, BusConfig
from bus.cli.main import main
from bus.cli.server_commands import local_port_of
from bus.cli.state import read_state
from bus.server import EmbeddedServer, free_port_outside_ephemeral_range
from bus.topology import ensure_consumer, inbox_consumer_config
from schemas import Delivery, Envelope, PayloadRegistry, decode_loose
from schemas.payloads import Note, Notice, Pong

from conftest import refused_port, wait_for

ENTRY = Path(sys.executable).parent / "bus"
BUS = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "bus.cli.main"]
NOTE = '{"kind":"note","text":"hi"}'
CONVERSATION = "018f0000-0000-7c0f-8e5a-1d2b3c4d5e6f"


class Result(msgspec.Struct, frozen=True):
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: no BUS_* settings from outside, a private BUS_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["BUS_HOME"] = str(tmp_path / "home")
    return env


@pytest.fixture
def server_env(cli_env: dict[str, str], nats_server: EmbeddedServer, admin_credentials: str) -> dict[str, str]:
    """cli_env pointed at the test's server (with its monitoring URL, for the fsync check), as
    its admin (authorization is on)."""
    return {**cli_env, "BUS_URL": nats_server.url, "BUS_MONITOR_URL": nats_server.settings.monitor_url or "",
            "BUS_CREDS": admin_credentials}


async def run_bus(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 60.0, stdin: bytes | None = None) -> Result:
    """Run `bus ARGS...` to completion without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *BUS, *args, env=env, cwd=cwd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"`bus {' '.join(args)}` did not finish within {timeout_s}s")
    return Result(proc.returncode or 0, stdout.decode(), stderr.decode())


def run_bus_sync(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 60.0) -> Result:
    done = subprocess.run([*BUS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    return Result(done.returncode, done.stdout, done.stderr)


def pid_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def detached_home(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Path]:
    """A home whose detached server (if a test starts one) is stopped at the end, whatever happens."""
    home = Path(cli_env["BUS_HOME"])
    yield home
    if read_state(home) is not None:
        run_bus_sync("down", "--home", str(home), "--grace", "2", env=cli_env, cwd=tmp_path)


async def stored(config: BusConfig, seq: int) -> tuple[str, bytes]:
    async with Bus(config) as bus:
        msg = await bus.js.get_msg(bus.subjects.stream, seq=seq)
        return msg.subject, msg.data


# -- up / down ---------------------------------------------------------------------------------


async def test_up_detach_records_state_and_down_stops_it(tmp_path, cli_env, detached_home) -> None:
    """`up --detach` returns once the server accepts clients and records its pid and URL; a second
    `up` says it is already running and where; `down` stops it and clears the state; a second
    `down` says nothing is running."""
    port = free_port_outside_ephemeral_range()
    up = await run_bus("up", "--detach", "--no-projections", "--port", str(port), env=cli_env, cwd=tmp_path)
    assert up.code == 0, up.stderr
    assert f"nats://127.0.0.1:{port}" in up.stdout
    state = read_state(detached_home)
    assert state is not None and state.url == f"nats://127.0.0.1:{port}" and state.projections_pid is None
    assert accepts(port)
    assert "fsync on every write" in up.stdout

    again = await run_bus("up", "--detach", "--port", str(port), env=cli_env, cwd=tmp_path)
    assert again.code == 0
    assert "already running" in again.stdout and state.url in again.stdout and str(state.pid) in again.stdout

    down = await run_bus("down", env=cli_env, cwd=tmp_path)
    assert down.code == 0, down.stderr
    assert f"nats-server (pid {state.pid})" in down.stdout
    await wait_for(lambda: pid_gone(state.pid), what="the detached nats-server to exit")
    assert read_state(detached_home) is None and not accepts(port)

    nothing = await run_bus("down", env=cli_env, cwd=tmp_path)
    assert nothing.code == 0 and "nothing to stop" in nothing.stdout


async def test_up_starts_the_server_where_bus_url_points(tmp_path, cli_env, detached_home) -> None:
    """Without --port, `bus up` listens on the port of a local BUS_URL, where every other command
    (and `BusConfig.from_env`) will look for it; `bus send` then finds it with no option."""
    port = free_port_outside_ephemeral_range()
    env = {**cli_env, "BUS_URL": f"nats://127.0.0.1:{port}"}
    up = await run_bus("up", "--detach", "--no-projections", env=env, cwd=tmp_path)
    assert up.code == 0, up.stderr
    state = read_state(detached_home)
    assert state is not None and state.url == f"nats://127.0.0.1:{port}"
    sent = await run_bus("send", "alice", NOTE, env=env, cwd=tmp_path)
    assert sent.code == 0 and "seq 1" in sent.stdout, sent.stderr


def test_only_a_single_local_url_gives_bus_up_its_port() -> None:
    assert local_port_of("nats://127.0.0.1:4333") == 4333
    assert local_port_of("localhost:4334") == 4334
    assert local_port_of("nats://127.0.0.1") is None  # no port: the default
    assert local_port_of("nats://10.0.0.5:4222") is None  # another machine: not ours to start
    assert local_port_of("nats://127.0.0.1:4222,nats://127.0.0.1:4223") is None
    assert local_port_of("nats://127.0.0.1:notaport") is None
    assert local_port_of("") is None


async def test_up_detach_starts_projections_and_down_stops_both(tmp_path, cli_env, detached_home) -> None:
    """Without --no-projections, `up --detach` also starts the projection service (answering
    queries before `up` returns); `down` stops it first, then the server."""
    port = free_port_outside_ephemeral_range()
    up = await run_bus("up", "--detach", "--port", str(port), env=cli_env, cwd=tmp_path)
    assert up.code == 0, up.stderr + up.stdout
    state = read_state(detached_home)
    assert state is not None and state.projections_pid is not None
    assert "answering queries" in up.stdout
    status = await run_bus("status", "--json", env={**cli_env, "BUS_URL": state.url}, cwd=tmp_path)
    assert status.code == 0, status.stderr
    assert json.loads(status.stdout)["query_service"] is True

    down = await run_bus("down", env=cli_env, cwd=tmp_path)
    assert down.code == 0, down.stderr
    assert down.stdout.index("projection service") < down.stdout.index("nats-server")
    await wait_for(lambda: pid_gone(state.projections_pid) and pid_gone(state.pid), what="both children to exit")


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


async def test_a_projection_service_that_dies_is_started_again(tmp_path, cli_env, detached_home) -> None:
    """`up --detach` runs the projection service under a keeper: killing the service (SIGKILL,
    as the OOM killer would) brings a new one that answers queries; `down` stops both."""
    port = free_port_outside_ephemeral_range()
    up = await run_bus("up", "--detach", "--port", str(port), env=cli_env, cwd=tmp_path)
    assert up.code == 0, up.stderr + up.stdout
    state = read_state(detached_home)
    assert state is not None and state.projections_pid is not None
    (first,) = children_of(state.projections_pid)
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: children_of(state.projections_pid) not in ([], [first]), timeout_s=30,
                   what="a new projection service")
    env = {**cli_env, "BUS_URL": state.url}

    async def answers() -> bool:
        return (await run_bus("query", "select 1 as one", "--format", "json", env=env, cwd=tmp_path)).code == 0

    await wait_for(answers, timeout_s=60, interval_s=0.5, what="the restarted service to answer")
    (second,) = children_of(state.projections_pid)
    down = await run_bus("down", env=cli_env, cwd=tmp_path)
    assert down.code == 0, down.stderr
    await wait_for(lambda: pid_gone(second) and pid_gone(state.projections_pid), what="keeper and service to exit")


async def test_up_on_a_busy_port_names_the_port_and_the_option(tmp_path, cli_env) -> None:
    """A port taken by another program gives exit 2 and a message naming the port and --port."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = await run_bus("up", "--detach", "--no-projections", "--port", str(port), env=cli_env, cwd=tmp_path)
    assert result.code == 2
    assert str(port) in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr
    assert read_state(Path(cli_env["BUS_HOME"])) is None


async def _start_foreground(tmp_path: Path, env: dict[str, str], *extra: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        *BUS, "up", "--no-projections", *extra, env=env, cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    assert proc.stdout is not None

    async def read_until_ready() -> None:
        while True:
            line = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"`bus up` exited early: {''.join(lines)}{(await proc.stderr.read()).decode()}")  # type: ignore[union-attr]
            lines.append(line)
            if "press Ctrl-C" in line:
                return

    try:
        await asyncio.wait_for(read_until_ready(), 30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, lines


async def test_foreground_up_stops_in_order_on_ctrl_c(tmp_path, cli_env) -> None:
    """Foreground `up` prints the URL and what to run next, serves its metrics, and on SIGINT
    stops the server, clears the state and exits 0."""
    port, metrics_port = free_port_outside_ephemeral_range(), free_port_outside_ephemeral_range()
    proc, lines = await _start_foreground(tmp_path, cli_env, "--port", str(port), "--metrics-port", str(metrics_port))
    try:
        text = "".join(lines)
        assert f"nats://127.0.0.1:{port}" in text and "bus tail" in text and "bus send" in text
        state = read_state(Path(cli_env["BUS_HOME"]))
        assert state is not None and state.supervisor_pid == proc.pid
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        )
        assert 'continuum_child_up{child="nats-server"} 1.0' in metrics
        proc.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()  # type: ignore[union-attr]
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "stopped" in rest
    assert pid_gone(state.pid) and not accepts(port)
    assert read_state(Path(cli_env["BUS_HOME"])) is None


async def test_down_stops_a_foreground_up(tmp_path, cli_env) -> None:
    """`bus down` asks a foreground `bus up` to stop (it stops its own children) and it exits 0."""
    port = free_port_outside_ephemeral_range()
    proc, _ = await _start_foreground(tmp_path, cli_env, "--port", str(port))
    try:
        state = read_state(Path(cli_env["BUS_HOME"]))
        assert state is not None
        down = await run_bus("down", env=cli_env, cwd=tmp_path)
        assert down.code == 0, down.stderr
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert pid_gone(state.pid) and not accepts(port)


# -- no server ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["send", "alice", NOTE], ["broadcast", "team", NOTE], ["request", "bob", '{"kind":"ping"}'], ["tail"], ["status"]],
    ids=["send", "broadcast", "request", "tail", "status"],
)
async def test_without_a_server_commands_say_how_to_start_one(tmp_path, cli_env, args) -> None:
    """With nothing listening at BUS_URL, a command exits 2 at once, tells to run
    `bus up --detach` or set BUS_URL, and prints no traceback."""
    with refused_port() as port:
        env = {**cli_env, "BUS_URL": f"nats://127.0.0.1:{port}"}
        result = await run_bus(*args, env=env, cwd=tmp_path, timeout_s=20)
    assert result.code == 2
    assert "bus up --detach" in result.stderr and "BUS_URL" in result.stderr
    assert "Traceback" not in result.stderr


# -- send / broadcast / request ----------------------------------------------------------------


async def test_send_stores_a_typed_envelope_with_the_options(tmp_path, server_env, bus_config) -> None:
    """`send` decodes the payload with its typed class and stores it on the recipient's inbox
    subject with sender, priority, expiry and correlation id; it prints the id and the seq."""
    result = await run_bus(
        "send", "alice", '{"kind":"note","text":"hi","data":{"n":1}}', "--from", "ops", "--priority", "8",
        "--expires-in", "60", "--correlation-id", CONVERSATION, "--json", env=server_env, cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    receipt = json.loads(result.stdout)
    subject, data = await stored(bus_config, receipt["seq"])
    envelope = Bus(bus_config).codec.decode(data)
    assert subject == "default.inbox.alice.ops"
    assert envelope.id == receipt["id"] and envelope.payload == Note(text="hi", data={"n": 1})
    assert (envelope.sender, envelope.to, envelope.priority, envelope.correlation_id) == ("ops", "alice", 8, CONVERSATION)
    assert envelope.expires_at is not None

    plain = await run_bus("send", "alice", f"@{_write(tmp_path / 'p.json', NOTE)}", env=server_env, cwd=tmp_path)
    assert plain.code == 0 and "sent note to alice" in plain.stdout and f"seq {receipt['seq'] + 1}" in plain.stdout


async def test_broadcast_goes_to_the_tag_subject(tmp_path, server_env, bus_config) -> None:
    """`broadcast` stores the payload on the tag's group subject, read from stdin with @-."""
    result = await run_bus(
        "broadcast", "team", "@-", "--json", env=server_env, cwd=tmp_path, stdin=b'{"kind":"notice","text":"all"}'
    )
    assert result.code == 0, result.stderr
    subject, data = await stored(bus_config, json.loads(result.stdout)["seq"])
    assert subject == "default.group.team.cli"
    assert decode_loose(data).tag == "team"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["send", "alice", '{"kind":"nope","text":"x"}'], ["unknown kind 'nope'", "note", "task.requested"]),
        (["send", "alice", '{"kind":"note",text:"x"}'], ["not valid JSON", '"kind":"note"']),
        (["send", "alice", '{"text":"x"}'], ['no "kind"', "known kinds"]),
        (["send", "alice", '{"kind":"note"}'], ["invalid 'note' payload", "text", "required"]),
        (["send", "alice", '{"kind":"note","text":"x","txt":1}'], ["unknown field(s) 'txt'", "fields of 'note'"]),
        (["send", "alice", '{"kind":"note","text":5}'], ["Expected `str`", "$.text"]),
        (["send", "al.ice", NOTE], ["invalid agent name 'al.ice'", "letters, digits"]),
        (["broadcast", "te am", NOTE], ["invalid tag"]),
        (["send", "alice", NOTE, "--from", "a b"], ["invalid sender name"]),
        (["send", "alice", NOTE, "--priority", "10"], ["--priority", "0..9"]),
        (["send", "alice", "@missing.json"], ["cannot read the payload file", "missing.json"]),
        (["send", "alice", NOTE, "--types", "no_such_module"], ["--types no_such_module"]),
    ],
    ids=["unknown-kind", "invalid-json", "no-kind", "missing-field", "unknown-field", "wrong-type",
         "bad-agent", "bad-tag", "bad-sender", "bad-priority", "missing-file", "bad-types-module"],
)
async def test_bad_arguments_exit_2_saying_what_to_fix(tmp_path, server_env, bus, args, expected) -> None:
    """Bad input exits 2 with a message naming the problem (and the valid choices), no
    traceback, and stores nothing."""
    before = await bus.last_seq()
    result = await run_bus(*args, env=server_env, cwd=tmp_path)
    assert result.code == 2, result.stdout
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert await bus.last_seq() == before


async def test_types_adds_user_payload_kinds(tmp_path, server_env, bus_config) -> None:
    """`--types MODULE` makes the payload kinds defined in MODULE sendable, typed and validated; a
    module in the working directory imports without PYTHONPATH (as `bus agent start` finds one)."""
    (tmp_path / "shop_payloads.py").write_text(
        "from schemas import Payload\n\n"
        "class OrderPlaced(Payload, frozen=True, kw_only=True, tag='shop.order_placed'):\n"
        "    order_id: str\n    amount: float\n"
    )
    env = {k: v for k, v in server_env.items() if k != "PYTHONPATH"}
    ok = await run_bus(
        "send", "billing", '{"kind":"shop.order_placed","order_id":"o-1","amount":9.5}', "--types", "shop_payloads",
        "--json", env=env, cwd=tmp_path,
    )
    assert ok.code == 0, ok.stderr
    _, data = await stored(bus_config, json.loads(ok.stdout)["seq"])
    assert msgspec.json.decode(data)["payload"] == {"kind": "shop.order_placed", "order_id": "o-1", "amount": 9.5}

    bad = await run_bus(
        "send", "billing", '{"kind":"shop.order_placed","order_id":"o-1"}', "--types", "shop_payloads",
        env=env, cwd=tmp_path,
    )
    assert bad.code == 2 and "amount" in bad.stderr and "fields of 'shop.order_placed'" in bad.stderr
    unknown = await run_bus("send", "billing", '{"kind":"shop.order_placed"}', env=env, cwd=tmp_path)
    assert unknown.code == 2 and "--types MODULE" in unknown.stderr


async def test_request_prints_the_typed_reply(tmp_path, server_env, bus) -> None:
    """`request` waits for the agent's reply and prints its kind and JSON payload; both the
    request and the reply are in the log."""

    async def answer(envelope: Envelope, delivery: Delivery) -> None:
        await bus.reply(envelope, Pong(text=envelope.payload.text, responder="bob"))

    async with bus.consumer("bob", answer):
        result = await run_bus("request", "bob", '{"kind":"ping","text":"there?"}', "--json", env=server_env, cwd=tmp_path)
        text = await run_bus("request", "bob", '{"kind":"ping"}', "--timeout", "10", env=server_env, cwd=tmp_path)
    assert result.code == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["kind"] == "pong" and reply["payload"] == {"kind": "pong", "text": "there?", "responder": "bob"}
    subject, _ = await stored(bus.config, reply["seq"])
    assert subject == f"default.reply.cli.{reply['request_id']}.bob"
    assert text.code == 0 and "reply pong from bob" in text.stdout and '"responder":"bob"' in text.stdout


async def test_request_without_an_answer_times_out(tmp_path, server_env) -> None:
    """A request nobody answers exits 1 after --timeout, saying the request is still in the log."""
    result = await run_bus("request", "nobody", '{"kind":"ping"}', "--timeout", "0.5", env=server_env, cwd=tmp_path)
    assert result.code == 1
    assert "no reply from 'nobody' within 0.5s" in result.stderr and "Traceback" not in result.stderr


# -- tail --------------------------------------------------------------------------------------


async def test_tail_all_shows_stored_envelopes_and_survives_bad_bytes(tmp_path, server_env, bus) -> None:
    """`tail --all` prints one line per stored envelope (kind, route, seq), shows bytes that are
    not an envelope as undecodable instead of crashing, and filters by subject and kind."""
    note = await bus.send("alice", Note(text="one"))
    await bus.js.publish("default.inbox.alice.mallory", b"\xffnot an envelope")
    notice = await bus.broadcast("team", Notice(text="two"))

    result = await run_bus("tail", "--all", "--limit", "3", env=server_env, cwd=tmp_path, timeout_s=30)
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert "note" in lines[0] and "tester → alice" in lines[0] and f"seq {note.ack.seq}" in lines[0]
    assert "(undecodable)" in lines[1] and "default.inbox.alice.mallory" in lines[1]
    assert "notice" in lines[2] and "tester → #team" in lines[2] and f"seq {notice.ack.seq}" in lines[2]

    only = await run_bus("tail", "group.>", "--all", "--limit", "1", "--json", env=server_env, cwd=tmp_path, timeout_s=30)
    record = json.loads(only.stdout)
    assert record["kind"] == "notice" and record["seq"] == notice.ack.seq
    assert record["envelope"]["payload"] == {"kind": "notice", "text": "two", "topic": None}

    kinds = await run_bus("tail", "--all", "--kind", "not*", "--limit", "2", env=server_env, cwd=tmp_path, timeout_s=30)
    assert [line.split()[1] for line in kinds.stdout.splitlines()] == ["note", "notice"]


async def test_tail_since_a_time_or_an_age_and_count(tmp_path, server_env, bus) -> None:
    """`tail --since WHEN` starts at a stored time (ISO, or an age such as 1h); `--count N` stops
    after N; `--corr` keeps one conversation, by the short id tail prints; a WHEN that is neither
    is refused with exit 2 and says what it takes."""
    from datetime import datetime, timezone

    first = await bus.send("alice", Note(text="first"))
    between = datetime.now(timezone.utc)
    second = await bus.send("alice", Note(text="second"))

    hour = await run_bus("tail", "--since", "1h", "--count", "2", "--json", env=server_env, cwd=tmp_path, timeout_s=30)
    assert hour.code == 0, hour.stderr
    assert [json.loads(line)["seq"] for line in hour.stdout.splitlines()] == [first.ack.seq, second.ack.seq]

    later = await run_bus("tail", "--since", between.isoformat(), "--count", "1", "--json",
                          env=server_env, cwd=tmp_path, timeout_s=30)
    assert later.code == 0, later.stderr
    assert [json.loads(line)["seq"] for line in later.stdout.splitlines()] == [second.ack.seq]

    other = await bus.send("bob", Note(text="another conversation"))
    short = second.envelope.correlation_id[-8:]  # what tail prints
    only = await run_bus("tail", "--all", "--corr", short, "--count", "1", "--json", env=server_env, cwd=tmp_path, timeout_s=30)
    assert only.code == 0, only.stderr
    assert [json.loads(line)["seq"] for line in only.stdout.splitlines()] == [second.ack.seq]
    assert other.envelope.correlation_id[-8:] != short

    bad = await run_bus("tail", "--since", "yesterday-ish", env=server_env, cwd=tmp_path)
    assert bad.code == 2 and "neither an ISO time" in bad.stderr


async def test_tail_follows_new_envelopes_only(tmp_path, server_env, bus) -> None:
    """By default `tail` starts at the next stored envelope: one stored before it started is not
    shown, one stored after is."""
    await bus.send("alice", Note(text="before"))
    proc = await asyncio.create_subprocess_exec(
        *BUS, "tail", "--limit", "1", env=server_env, cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        async def header() -> bytes:
            while b"tailing " not in (line := await proc.stderr.readline()):  # type: ignore[union-attr]
                assert line, "tail exited before it was ready"
            return line

        assert b"tailing default.> " in await asyncio.wait_for(header(), 30)
        after = await bus.send("bob", Note(text="after"))
        stdout = await asyncio.wait_for(proc.stdout.read(), 30)  # type: ignore[union-attr]
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = stdout.decode().splitlines()
    assert len(lines) == 1 and "tester → bob" in lines[0] and f"seq {after.ack.seq}" in lines[0]


async def test_tail_rejects_a_filter_that_matches_nothing(tmp_path, server_env) -> None:
    """A filter outside the subject layout is refused with examples (exit 2)."""
    result = await run_bus("tail", "alice.>", env=server_env, cwd=tmp_path)
    assert result.code == 2 and "inbox.alice.>" in result.stderr


# -- status / schema ---------------------------------------------------------------------------


async def test_status_shows_the_log_and_consumer_backlogs(tmp_path, server_env, bus) -> None:
    """`status` reports the log stream (messages, seqs, fsync), each durable consumer's pending
    count, and the advisory stream; `--json` gives the same as one object."""
    await ensure_consumer(bus.js, bus.subjects.stream, inbox_consumer_config(bus.subjects, "carol", bus.config.consumer))
    for i in range(3):
        last = await bus.send("carol", Note(text=str(i)))

    result = await run_bus("status", "--json", env=server_env, cwd=tmp_path)
    assert result.code == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["log"]["messages"] == 3 and status["log"]["last_seq"] == last.ack.seq
    assert status["fsync_every_write"] is True
    carol = next(c for c in status["consumers"] if c["name"] == "carol__inbox")
    assert (carol["pending"], carol["ack_pending"], carol["redelivered"]) == (3, 0, 0)
    assert status["advisories"]["name"] == "CONTINUUM_DEFAULT_ADVISORIES"

    text = await run_bus("status", env=server_env, cwd=tmp_path)
    assert "3 messages" in text.stdout and "carol__inbox" in text.stdout and "fsync        yes" in text.stdout
    assert "pending: stored, not yet delivered" in text.stdout and "at seq: the log sequence delivered last" in text.stdout


def test_schema_export_writes_a_schema_per_kind(tmp_path, capsys) -> None:
    """`schema export DIR` writes the envelope's and every payload kind's JSON Schema."""
    assert main(["schema", "export", str(tmp_path / "schemas")]) == 0
    names = {p.name for p in (tmp_path / "schemas").iterdir()}
    kinds = PayloadRegistry.with_builtins().kinds()
    assert {"envelope.json", *(f"payload.{k}.json" for k in kinds)} <= names
    assert json.loads((tmp_path / "schemas" / "payload.note.json").read_text())["$defs"]["Note"]["required"] == ["kind", "text"]
    assert f"{len(kinds)} payload kinds" in capsys.readouterr().out


# -- bench / smoke -----------------------------------------------------------------------------


def test_bench_skips_a_section_that_does_not_exist(monkeypatch, capsys) -> None:
    """A section module that does not exist yet is skipped and reported so, in the one JSON object."""
    monkeypatch.setattr("bus.cli.bench_command.SECTIONS", ("bus.bench.not_written_yet",))
    assert main(["bench", "--quick", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["figures"] == {}
    assert report["sections"] == {
        "bus.bench.not_written_yet": {"status": "skipped", "reason": "bus.bench.not_written_yet does not exist yet"}
    }
    assert "skipped" in captured.err


async def test_bench_quick_json_prints_one_object(tmp_path, cli_env) -> None:
    """`bench --quick --json --section publish` prints exactly one JSON object with the section's
    figures and their targets."""
    result = await run_bus("bench", "--quick", "--json", "--section", "publish", env=cli_env, cwd=tmp_path, timeout_s=120)
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sections"]["bus.bench.publish"]["status"] == "ok"
    assert report["figures"]["durable_publish_per_s"] > 0
    assert report["targets"]["durable_publish_per_s"]["target"] == ">= 40,000"
    assert report["scale"] == 0.05 and report["repeats"] == 1


@pytest.mark.soak
async def test_bench_quick_json_runs_every_section(tmp_path, cli_env) -> None:
    """`bench --quick --json` runs every section (skipping missing ones) into one JSON object."""
    result = await run_bus("bench", "--quick", "--json", env=cli_env, cwd=tmp_path, timeout_s=900)
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sections"] and all(s["status"] in ("ok", "skipped") for s in report["sections"].values())


async def test_smoke_runs_send_broadcast_request_and_stops(tmp_path, cli_env) -> None:
    """`bus smoke` starts its own server, delivers a send to each agent, a broadcast to both and a
    request/reply, printing each step with its seq, and exits 0 after a clean stop."""
    result = await run_bus("smoke", "--timeout", "20", env=cli_env, cwd=tmp_path, timeout_s=90)
    assert result.code == 0, result.stdout + result.stderr
    out = result.stdout
    assert "smoke → alice: note stored at seq" in out and "smoke → bob: note stored at seq" in out
    assert "handled by alice" in out and "handled by bob" in out
    assert "smoke → #team: notice stored at seq" in out
    assert "reply pong 'bob is here'" in out
    assert "stopped cleanly" in out and "smoke passed" in out


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
