"""A local 3-node JetStream cluster, for real: `bus up --cluster 3 --detach`, `bus status` and
`bus down` run as subprocesses, and `LocalCluster` losing a node (SIGKILL, SIGSTOP) and getting
it back. Every wait is on a condition with a deadline."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx2
import msgspec
import pytest

from bus import Bus, BusConfig, BusUnavailable
from bus.cli.main import main
from bus.cli.state import NodeState, read_state, state_path
from bus.cluster import LocalCluster, agreed_meta_leader, agreed_stream_leaders
from cluster import ClusterAccess
from bus.config import StreamSettings
from bus.server import read_monitor
from schemas.payloads import Note

from conftest import wait_for
from test_certificates import _server_only

ENTRY = Path(sys.executable).parent / "bus"
BUS = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "bus.cli.main"]
NODES = ["continuum-1", "continuum-2", "continuum-3"]


class Result(msgspec.Struct, frozen=True):
    code: int
    stdout: str
    stderr: str


async def run_bus(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 60.0) -> Result:
    """Run `bus ARGS...` to completion without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *BUS, *args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"`bus {' '.join(args)}` did not finish within {timeout_s}s")
    return Result(proc.returncode or 0, stdout.decode(), stderr.decode())


def nats_servers_under(directory: Path) -> list[int]:
    """Pids of live (not zombie) nats-server processes whose command line names `directory`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if argv and "nats-server" in argv[0] and state != "Z" and any(str(directory) in a for a in argv):
            found.append(int(entry.name))
    return found


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: no BUS_* settings from outside, a private BUS_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["BUS_HOME"] = str(tmp_path / "home")
    return env


# -- bus up --cluster / status / down ----------------------------------------------------------


async def test_up_cluster_detached_status_shows_each_node_and_down_stops_them_all(tmp_path, cli_env) -> None:
    """`bus up --cluster 3 --detach` starts three nodes and the projection service, records each
    node in the state file and prints a BUS_URL (and BUS_MONITOR_URL) naming all of them; `bus
    status` shows the log with 3 replicas, its leader and each replica current with no lag, in
    text and in --json, and queries answered; `bus down` stops the projection service and leaves
    no nats-server of that home running."""
    home = Path(cli_env["BUS_HOME"])
    try:
        up = await run_bus("up", "--cluster", "3", "--detach", "--home", str(home), env=cli_env, cwd=tmp_path)
        assert up.code == 0, up.stderr + up.stdout
        state = read_state(home)
        assert state is not None and [node.name for node in state.nodes] == NODES
        assert len(nats_servers_under(home)) == 3
        assert state.url == ",".join(node.url for node in state.nodes)
        assert state.monitor_url == ",".join(node.monitor_url or "" for node in state.nodes)
        assert f"BUS_URL={state.url} BUS_MONITOR_URL={state.monitor_url}" in up.stdout
        assert "3 replicas" in up.stdout and "fsync on every write" in up.stdout
        assert "answering queries" in up.stdout and state.projections_pid is not None

        env = {**cli_env, "BUS_URL": state.url, "BUS_MONITOR_URL": state.monitor_url or ""}
        sent = await run_bus("send", "alice", '{"kind":"note","text":"hi"}', env=env, cwd=tmp_path)
        assert sent.code == 0, sent.stderr
        status: dict = {}

        async def every_replica_current() -> bool:
            nonlocal status
            result = await run_bus("status", "--json", env=env, cwd=tmp_path)
            assert result.code == 0, result.stderr
            status = json.loads(result.stdout)
            nodes = status["cluster"]["nodes"]
            return all(node["current"] and node["lag"] == 0 for node in nodes)

        await wait_for(every_replica_current, timeout_s=15, interval_s=0.2, what="every replica to be current")
        cluster = status["cluster"]
        assert cluster["replicas"] == 3 and cluster["leader"] in NODES
        assert sorted(node["name"] for node in cluster["nodes"]) == NODES
        assert [node["role"] for node in cluster["nodes"]] == ["leader", "replica", "replica"]
        assert status["log"]["messages"] == 1 and status["fsync_every_write"] is True
        assert status["query_service"] is True

        text = await run_bus("status", env=env, cwd=tmp_path)
        assert f"the log keeps 3 replicas, leader {cluster['leader']}" in text.stdout
        node_lines = [line for line in text.stdout.splitlines() if line.strip().startswith("continuum-")]
        assert len(node_lines) == 3 and sum(" leader " in line for line in node_lines) == 1

        # The console beside the cluster reads it like any client: the note is in its traffic.
        assert state.console_url is not None and f"console      {state.console_url}" in up.stdout

        async def console_lists_the_note() -> bool:
            async with httpx2.AsyncClient(base_url=state.console_url, timeout=5) as client:
                answer = await client.get("/api/traffic", params={"agent": "alice"})
            return answer.status_code == 200 and [i["kind"] for i in answer.json()["items"]] == ["note"]

        await wait_for(console_lists_the_note, timeout_s=15, interval_s=0.2, what="the console to list the note")
    finally:
        down = await run_bus("down", "--home", str(home), "--grace", "5", env=cli_env, cwd=tmp_path)
    assert down.code == 0, down.stderr
    assert down.stdout.count("stopped: nats-server continuum-") == 3
    assert f"stopped: projection service (pid {state.projections_pid})" in down.stdout
    assert f"stopped: console (pid {state.console_pid})" in down.stdout
    await wait_for(lambda: not nats_servers_under(home), timeout_s=10, what="every node of the home to exit")
    assert read_state(home) is None


async def test_up_cluster_with_tls_serves_tls_routes_and_commands_trust_any_one_node(tmp_path, cli_env) -> None:
    """`bus up --cluster 3 --tls`: every node requires TLS on its route port and verifies the
    other nodes' certificates; a command given one node's URL (not the list `bus up` printed)
    still verifies it with the home's CA. A given certificate that cannot authenticate a route
    (server authentication only) is refused before any node starts, in one line."""
    home = Path(cli_env["BUS_HOME"])
    try:
        up = await run_bus("up", "--cluster", "3", "--tls", "--detach", "--no-projections", "--home", str(home),
                           env=cli_env, cwd=tmp_path)
        assert up.code == 0, up.stderr + up.stdout
        state = read_state(home)
        assert state is not None and state.tls_ca is not None
        for node in state.nodes:
            route = (await asyncio.to_thread(read_monitor, node.monitor_url or "", "varz"))["cluster"]
            assert route["tls_required"] is True and route["tls_verify"] is True, route
        one_node = {**cli_env, "BUS_URL": state.nodes[1].url}
        sent = await run_bus("send", "alice", '{"kind":"note","text":"over TLS"}', env=one_node, cwd=tmp_path)
        assert sent.code == 0 and "seq 1" in sent.stdout, sent.stderr
    finally:
        down = await run_bus("down", "--home", str(home), "--grace", "5", env=cli_env, cwd=tmp_path)
    assert down.code == 0, down.stderr
    await wait_for(lambda: not nats_servers_under(home), timeout_s=10, what="every node of the home to exit")

    tls = home / "auth" / "tls"
    old = tmp_path / "old-server.pem"
    old.write_bytes((tls / "server.pem").read_bytes())
    _server_only(str(old), str(tls / "ca.pem"), tls / "ca-key.pem")
    refused = await run_bus("up", "--cluster", "3", "--tls", "--detach", "--no-projections", "--home", str(home),
                            "--tls-cert", str(old), "--tls-key", str(tls / "server-key.pem"),
                            "--tls-ca", str(tls / "ca.pem"), env=cli_env, cwd=tmp_path)
    assert refused.code != 0 and "client authentication" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not nats_servers_under(home)


@pytest.mark.parametrize("value", ["0", "2", "4", "7", "-3", "three"])
def test_a_cluster_size_other_than_1_3_or_5_exits_2_saying_what_is_allowed(value, tmp_path, capsys) -> None:
    """`--cluster` takes 3 or 5 nodes (or 1: one server); anything else is a usage error, exit 2,
    with a message and no traceback, before anything starts."""
    with pytest.raises(SystemExit) as exited:
        main(["up", "--cluster", value, "--home", str(tmp_path / "home")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--cluster" in err and "3 or 5" in err and "Traceback" not in err
    assert not (tmp_path / "home").exists()


def test_a_single_server_state_file_from_before_clusters_still_reads(tmp_path) -> None:
    """A state file written before clusters existed (no `nodes`) reads as one server, which is
    what `bus down` and `bus up` then act on."""
    home = tmp_path / "home"
    home.mkdir()
    state_path(home).write_text(
        '{"pid":123,"url":"nats://127.0.0.1:4222","monitor_url":"http://127.0.0.1:8222",'
        '"store_dir":"/x/nats","projections_pid":null,"supervisor_pid":null}'
    )
    state = read_state(home)
    assert state is not None and state.nodes == ()
    assert state.servers == (NodeState(name="nats-server", pid=123, url="nats://127.0.0.1:4222",
                                       monitor_url="http://127.0.0.1:8222", store_dir="/x/nats"),)


# -- readiness, as /jsz tells it ---------------------------------------------------------------


def _meta(leader: str, current: list[str] | tuple[()] = ()) -> dict:
    return {"meta_cluster": {"leader": leader, "replicas": [{"name": n, "current": True} for n in current]}}


@pytest.mark.parametrize(("views", "leader"), [
    ({"a": _meta("b"), "b": _meta("b", ["a", "c"]), "c": _meta("b")}, "b"),
    ({"a": _meta("b"), "b": _meta("b", ["a"]), "c": _meta("b")}, None),        # c not current yet
    ({"a": _meta("a", ["b", "c"]), "b": _meta("b", ["a", "c"]), "c": _meta("b")}, None),  # two leaders
    ({"a": _meta(""), "b": _meta(""), "c": _meta("")}, None),                  # electing
    ({"a": _meta("b"), "b": _meta("b", ["a", "c"]), "c": None}, None),         # c not answering
    ({"a": _meta("c", ["b"]), "b": _meta("c")}, None),                         # leader c is down
    ({"a": _meta("a", ["b"]), "b": _meta("a")}, "a"),                          # c down: the others suffice
    ({}, None),
])
def test_the_meta_leader_counts_once_every_node_names_it_and_it_hears_from_all(views, leader) -> None:
    """Ready means one meta leader named by every running node, itself running, with every
    other running node current in its own view."""
    assert agreed_meta_leader(views) == leader


def _streams(*streams: tuple[str, str]) -> dict:
    details = [{"name": name, "cluster": {"leader": leader}} for name, leader in streams]
    return {"account_details": [{"name": "$G", "stream_detail": details}]}


def test_a_stream_counts_as_led_once_its_holders_agree_on_a_running_leader() -> None:
    """Each stream needs one leader named by all its holders and among the running nodes; a
    node that does not answer leaves its streams unknown."""
    agreed = {"a": _streams(("LOG", "b"), ("ADV", "a")), "b": _streams(("LOG", "b")), "c": _streams(("ADV", "a"))}
    assert agreed_stream_leaders(agreed) == ({"LOG": "b", "ADV": "a"}, set())
    split = {"a": _streams(("LOG", "b")), "b": _streams(("LOG", "c"))}
    assert agreed_stream_leaders(split) == ({}, {"LOG"})
    gone = {"a": _streams(("LOG", "x")), "b": _streams(("LOG", "x"))}  # x was killed
    assert agreed_stream_leaders(gone) == ({}, {"LOG"})
    silent = {"a": _streams(("LOG", "a")), "b": None}
    assert agreed_stream_leaders(silent) == ({"LOG": "a"}, {"(node b)"})
    assert agreed_stream_leaders({"a": _streams(), "b": _streams()}) == ({}, set())


# -- LocalCluster ------------------------------------------------------------------------------


def stream_config(cluster: LocalCluster, access: ClusterAccess, url: str | None = None) -> BusConfig:
    return BusConfig(url=url or cluster.url, monitor_url=cluster.monitor_url, name="tester",
                     stream=StreamSettings(replicas=3), credentials=access.admin, tls=access.tls)


async def stream_detail(cluster: LocalCluster, node: str, stream: str) -> dict | None:
    """`stream` as `node` itself holds it (its /jsz: state and cluster block), None if it does
    not answer or hold it."""
    try:
        jsz = await asyncio.to_thread(read_monitor, cluster.node_named(node).monitor_url, "jsz?streams=true", 1.0)
    except (OSError, ValueError):
        return None
    details = [s for a in jsz.get("account_details") or [] for s in a.get("stream_detail") or [] if s["name"] == stream]
    return details[0] if details else None


async def replicas_hold(cluster: LocalCluster, stream: str, last_seq: int) -> bool:
    """True when every node answers for `stream` on its own monitoring port with the same
    message count and `last_seq` as its last sequence, and the leader counts every other node a
    current replica."""
    details = [await stream_detail(cluster, name, stream) for name in NODES]
    if any(d is None for d in details):
        return False
    states = {(d["state"]["messages"], d["state"]["last_seq"]) for d in details if d is not None}
    if len(states) != 1 or states.pop()[1] != last_seq:
        return False
    leader = await live_leader(cluster, stream)
    own = await stream_detail(cluster, leader, stream) if leader else None
    replicas = (own or {}).get("cluster", {}).get("replicas") or []
    return sorted(r["name"] for r in replicas if r.get("current")) == sorted(set(NODES) - {leader})


async def live_leader(cluster: LocalCluster, stream: str) -> str | None:
    leaders, _ = agreed_stream_leaders(await cluster.jsz_views(streams=True))
    return leaders.get(stream)


async def test_a_killed_leader_is_replaced_and_catches_up_when_started_again(
    nats_cluster: LocalCluster, cluster_access: ClusterAccess
) -> None:
    """SIGKILL of the log's leader: the other two elect a new one and keep taking writes; the node,
    started again on the same ports and store, catches up, so every node holds the same messages
    and the new leader reports each replica current with no lag."""
    async with Bus(stream_config(nats_cluster, cluster_access)) as bus:
        stream = bus.subjects.stream
        for i in range(10):
            await bus.send("alice", Note(text=f"before {i}"))
        leader = await live_leader(nats_cluster, stream)
        assert leader is not None
        old = nats_cluster.node_named(leader)
        url = old.url
        await old.kill()
        assert old.pid is None and not old.running

        async def new_leader() -> bool:
            return (await live_leader(nats_cluster, stream)) not in (None, old.name)

        # nats-server 2.15's raft election timeout is 4-9 s.
        await wait_for(new_leader, timeout_s=20, interval_s=0.1, what="a new leader of the log")
        for i in range(10):
            last = await _send_retrying(bus, f"after {i}")

        await old.start()
        assert old.url == url and old.running
        await wait_for(lambda: replicas_hold(nats_cluster, stream, last.ack.seq), timeout_s=20, interval_s=0.1,
                       what="every replica to hold the 20 messages")
        assert (await live_leader(nats_cluster, stream)) != old.name


async def test_a_paused_replica_misses_writes_and_catches_up_when_resumed(
    nats_cluster: LocalCluster, cluster_access: ClusterAccess
) -> None:
    """SIGSTOP of a replica: the leader and the other replica still take writes (a majority); the
    node, resumed, catches up to the same last sequence."""
    # Seeded with the first node only, so the client's connections are not on the paused one (a
    # client on a hung server waits for its pings to go unanswered first: another test's subject).
    first = nats_cluster.nodes[0]
    async with Bus(stream_config(nats_cluster, cluster_access, url=first.url)) as bus:
        stream = bus.subjects.stream
        await bus.send("alice", Note(text="first"))
        leader = await live_leader(nats_cluster, stream)
        replica = nats_cluster.node_named(next(n for n in reversed(NODES) if n not in (leader, first.name)))
        await replica.pause()
        assert replica.paused and replica.running
        for i in range(5):
            last = await bus.send("alice", Note(text=f"while paused {i}"))
        await replica.resume()
        assert not replica.paused
        await wait_for(lambda: replicas_hold(nats_cluster, stream, last.ack.seq), timeout_s=20, interval_s=0.1,
                       what="the resumed replica to catch up")


async def test_a_start_that_fails_half_way_leaves_no_process(tmp_path: Path) -> None:
    """When one node cannot start (its client port is held), start() raises BusUnavailable naming
    it and stops the nodes that did start: no nats-server of that store is left."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        held = blocker.getsockname()[1]
        root = tmp_path / "cluster"
        cluster = LocalCluster(3, store_root=root, client_ports=[0, 0, held], start_timeout_s=1.0)
        with pytest.raises(BusUnavailable, match=r"(?s)continuum-3.*address already in use"):
            await cluster.start()
    assert all(node.pid is None for node in cluster.nodes)
    assert not nats_servers_under(root)


async def _send_retrying(bus: Bus, text: str, timeout_s: float = 10.0):
    """Send a note, retrying while the client is still finding the surviving nodes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await bus.send("alice", Note(text=text))
        except BusUnavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
