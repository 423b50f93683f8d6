"""Every process Continuum starts is scrapable: it serves /metrics on 127.0.0.1 and registers a
Prometheus file_sd target under `<home>/metrics-targets/` while it runs (bus.scrape).

Real nats-server, real `bus` CLI processes, real supervisors and replicas; scraped over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bus import Bus, BusConfig
from bus.scrape import ScrapeTarget, read_target, read_targets, serve_metrics, targets_dir
from bus.server import EmbeddedServer, free_port_outside_ephemeral_range
from conftest import refused_port, wait_for
from schemas.payloads import Ping, Pong

TESTS = Path(__file__).resolve().parent
BUS = [sys.executable, "-m", "bus.cli.main"]
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def scrape(address: str) -> dict[str, tuple[str, list[Sample]]]:
    """The families at http://`address`/metrics: name -> (type, samples). Blocking."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: (family.type, family.samples) for family in text_string_to_metric_families(text)}


async def scrape_async(address: str) -> dict[str, tuple[str, list[Sample]]]:
    return await asyncio.to_thread(scrape, address)


def total(families: dict[str, tuple[str, list[Sample]]], sample_name: str) -> float:
    """The sum of every sample named `sample_name` (over all label sets); 0 when absent."""
    return sum(s.value for _, samples in families.values() for s in samples if s.name == sample_name)


def assert_prometheus_names(families: dict[str, tuple[str, list[Sample]]]) -> None:
    """Counters expose `<name>_total` samples, nothing else ends in `_total`, names are valid."""
    for name, (kind, samples) in families.items():
        assert NAME.match(name), name
        for sample in samples:
            if kind == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            else:
                assert not sample.name.endswith("_total"), f"{sample.name} is a {kind}, not a counter"


def targets_by_process(home: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for target in read_targets(targets_dir(home)):
        found.setdefault(target.labels["process"], []).append(target.address)
    return found


async def run_bus(*args: str, env: dict[str, str], timeout_s: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *BUS, *args, env=env, cwd=TESTS, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
def env(bus_config: BusConfig, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: the test's server, a private home."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    return {**clean, "BUS_URL": bus_config.url, "BUS_HOME": str(tmp_path / "home"), "BUS_NAMESPACE": "default",
            "BUS_MONITOR_URL": bus_config.monitor_url or "", "BUS_CREDS": str(bus_config.credentials)}


@pytest.fixture
async def agent_home(env: dict[str, str]) -> AsyncIterator[Path]:
    """A home whose agents are stopped at the end, whatever happened."""
    home = Path(env["BUS_HOME"])
    yield home
    await run_bus("agent", "stop", "--all", "--wait", "10", env=env)
    for state_file in home.glob("agents/*/*/state.json"):
        try:
            os.killpg(json.loads(state_file.read_text())["supervisor_pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


async def test_a_supervised_replica_and_its_supervisor_are_scrape_targets(
    env: dict[str, str], agent_home: Path, bus: Bus
) -> None:
    """`bus agent start` leaves one target per replica and one for the supervisor; the replica's
    /metrics counts the message it handled; `bus agent stop` removes both files again."""
    code, _, stderr = await run_bus("agent", "start", "fixtures_agents.basic:Echo", "--name", "greeter", env=env)
    assert code == 0, stderr
    directory = targets_dir(agent_home)
    replica = read_target(directory / "agent.default.greeter.0.json")
    supervisor = read_target(directory / "supervisor.default.greeter.json")
    assert replica is not None and supervisor is not None, sorted(p.name for p in directory.glob("*"))
    assert replica.labels | {"instance": ""} == {
        "process": "agent", "namespace": "default", "agent": "greeter", "replica": "0", "instance": "",
    }
    assert replica.labels["instance"].endswith("/agent/default/greeter/0")
    assert replica.address.startswith("127.0.0.1:") and supervisor.address.startswith("127.0.0.1:")

    before = await scrape_async(replica.address)
    assert_prometheus_names(before)
    assert total(before, "process_start_time_seconds") > 0
    acked_before = total(before, "continuum_acked_total")

    reply = await bus.request("greeter", Ping(text="hi"), timeout_s=10)
    assert isinstance(reply.payload, Pong)

    async def acked_moved() -> bool:
        return total(await scrape_async(replica.address), "continuum_acked_total") > acked_before

    # The engine moves its counts into Prometheus after each settlement flush.
    await wait_for(acked_moved, timeout_s=10, interval_s=0.1, what="the replica's continuum_acked_total to move")
    after = await scrape_async(replica.address)
    assert total(after, "continuum_handler_seconds_count") >= 1

    sup = await scrape_async(supervisor.address)
    assert_prometheus_names(sup)
    running = [s for s in sup["continuum_supervisor_replicas"][1] if s.labels["state"] == "running"]
    assert running[0].value == 1.0
    assert sup["continuum_supervisor_restarts"][0] == "counter"
    assert total(sup, "continuum_supervisor_replica_up") == 1.0

    # `bus agent ps --json` says where each replica serves, too.
    code, stdout, _ = await run_bus("agent", "ps", "--json", env=env)
    assert code == 0 and json.loads(stdout.splitlines()[0])["replicas"][0]["metrics"] == replica.address

    code, stdout, _ = await run_bus("metrics", "targets", env=env)
    assert code == 0
    rows = [line.split() for line in stdout.splitlines()[1:-1]]
    assert sorted(row[0] for row in rows) == ["agent", "supervisor"] and all(row[-1] == "yes" for row in rows)

    code, _, stderr = await run_bus("agent", "stop", "greeter", env=env)
    assert code == 0, stderr
    assert read_targets(directory) == []


async def test_a_restarted_replica_replaces_its_target(env: dict[str, str], agent_home: Path) -> None:
    """A replica killed by SIGKILL leaves its file behind; the replica started in its place
    registers under the same name (a new port, the same instance label), so no stale target
    stays behind."""
    code, _, stderr = await run_bus("agent", "start", "fixtures_agents.basic:Echo", "--name", "echo", env=env)
    assert code == 0, stderr
    path = targets_dir(agent_home) / "agent.default.echo.0.json"
    first = read_target(path)
    assert first is not None
    status = json.loads((agent_home / "agents/default/echo/state.json").read_text())
    os.kill(status["replicas"][0]["pid"], signal.SIGKILL)

    def replaced() -> bool:
        target = read_target(path)
        return target is not None and target.address != first.address

    await wait_for(replaced, timeout_s=30, interval_s=0.05, what="the restarted replica to register")
    second = read_target(path)
    assert second is not None and second.labels["instance"] == first.labels["instance"]
    assert "continuum_acked" in await scrape_async(second.address)


async def test_the_projection_service_is_a_scrape_target(bus: Bus, tmp_path: Path) -> None:
    """`bus projections run` (as `bus up` starts it, no --metrics-port) serves its metrics on a
    port of its own choosing, registers it, counts applied events, and removes the file on exit."""
    home = tmp_path / "home"
    proc = await asyncio.create_subprocess_exec(
        *BUS, "projections", "run", "--url", bus.config.url, "--creds", str(bus.config.credentials), "--namespace", bus.subjects.ns, "--home", str(home),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: "projections" in targets_by_process(home), timeout_s=60, interval_s=0.05,
                       what="the projection service to register")
        (target,) = read_targets(targets_dir(home))
        assert target.labels["service"] and target.labels["namespace"] == bus.subjects.ns
        seq = (await bus.send("somebody", Ping(text="counted"))).ack.seq

        async def applied() -> bool:
            families = await scrape_async(target.address)
            checkpoints = [s.value for s in families["continuum_projection_checkpoint"][1]]
            return bool(checkpoints) and min(checkpoints) >= seq

        await wait_for(applied, timeout_s=30, interval_s=0.1, what="the service to apply the event")
        families = await scrape_async(target.address)
        assert_prometheus_names(families)
        assert total(families, "continuum_projection_events_applied_total") >= 1
        assert total(families, "process_resident_memory_bytes") > 0

        # A second service on the same views file is refused, and leaves the first's target be.
        second = await asyncio.create_subprocess_exec(
            *BUS, "projections", "run", "--url", bus.config.url, "--creds", str(bus.config.credentials), "--namespace", bus.subjects.ns, "--home", str(home),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 2, stderr.decode()
        assert read_targets(targets_dir(home)) == [target]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
    assert read_targets(targets_dir(home)) == []


async def test_bus_up_and_its_projection_service_are_scrape_targets(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """A foreground `bus up --metrics-port P` serves on P with the server's figures in Prometheus
    naming (counters as `_total`, bytes as `_bytes`), and the projection service it starts is a
    target in the same directory; both files go when it stops."""
    del nats_server  # only its binary and config are used: `bus up` starts a server of its own
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    port, monitor_port, metrics_port = free_port_outside_ephemeral_range(), free_port_outside_ephemeral_range(), free_port_outside_ephemeral_range()
    proc = await asyncio.create_subprocess_exec(
        *BUS, "up", "--port", str(port), "--monitor-port", str(monitor_port), "--metrics-port", str(metrics_port),
        "--home", str(home), "--start-timeout", "60", env=env, cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines: list[str] = []

    async def until_ready() -> None:
        while "press Ctrl-C" not in (line := (await proc.stdout.readline()).decode()):  # type: ignore[union-attr]
            assert line, "".join(lines)
            lines.append(line)

    try:
        await asyncio.wait_for(until_ready(), 90)
        assert any(f"127.0.0.1:{metrics_port}/metrics" in line for line in lines), lines
        await wait_for(lambda: set(targets_by_process(home)) == {"bus_up", "projections", "keeper"}, timeout_s=30,
                       interval_s=0.05, what="bus up, the projection service and the keepers to register")
        assert targets_by_process(home)["bus_up"] == [f"127.0.0.1:{metrics_port}"]

        up = await scrape_async(f"127.0.0.1:{metrics_port}")
        assert_prometheus_names(up)
        assert up["continuum_nats_received_messages"][0] == "counter"
        assert up["continuum_nats_sent_bytes"][0] == "counter"
        assert up["continuum_nats_resident_memory_bytes"][0] == "gauge"
        assert total(up, "continuum_nats_received_messages_total") > 0
        assert total(up, "continuum_nats_up") == 1.0
        assert not any(name.startswith("continuum_nats_in_") for name in up)
        children = {s.labels["child"]: s.value for s in up["continuum_child_up"][1]}
        assert children == {"nats-server": 1.0, "projections": 1.0}

        (projections,) = targets_by_process(home)["projections"]
        families = await scrape_async(projections)
        assert_prometheus_names(families)
        assert "continuum_projection_lag_events" in families

        # The keepers (of the projection service and the console) are targets too; the server's
        # figures come from `bus up` alone in the foreground.
        keepers = [await scrape_async(address) for address in targets_by_process(home)["keeper"]]
        for keeper in keepers:
            assert_prometheus_names(keeper)
            assert "continuum_nats_up" not in keeper
        kept = {s.labels["child"]: s.value for k in keepers for s in k["continuum_child_up"][1]}
        assert kept.get("projections") == 1.0
        assert {s.labels["child"] for k in keepers for s in k["continuum_keeper_restarts"][1]} == set(kept)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0
    assert read_targets(targets_dir(home)) == []


async def test_a_detached_bus_ups_keeper_serves_the_servers_figures(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    """A detached `bus up` exits at once; the keeper of its projection service stands in for it
    as a target: the server's figures (as a foreground `bus up` serves them), whether the
    service runs, how often it was restarted (once after a SIGKILL). `bus down` removes it."""
    del nats_server  # only its binary and config are used
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    port, monitor_port = free_port_outside_ephemeral_range(), free_port_outside_ephemeral_range()
    code, stdout, stderr = await run_bus(
        "up", "--detach", "--no-ui", "--port", str(port), "--monitor-port", str(monitor_port), "--home", str(home),
        "--start-timeout", "60", env=env, timeout_s=120,
    )
    try:
        assert code == 0, stderr + stdout
        await wait_for(lambda: {"keeper", "projections"} <= set(targets_by_process(home)), timeout_s=30,
                       interval_s=0.05, what="the keeper and the projection service to register")
        (keeper,) = targets_by_process(home)["keeper"]
        families = await scrape_async(keeper)
        assert_prometheus_names(families)
        assert total(families, "continuum_nats_up") == 1.0
        assert total(families, "continuum_nats_received_messages_total") > 0
        assert {s.labels["child"]: s.value for s in families["continuum_child_up"][1]} == {"projections": 1.0}
        assert total(families, "continuum_keeper_restarts_total") == 0

        # SIGKILL the service (the keeper's child: the state file names the keeper).
        (service,) = targets_by_process(home)["projections"]
        state = json.loads((home / "server.json").read_text())
        children = subprocess.run(["pgrep", "-P", str(state["projections_pid"])], capture_output=True, text=True)
        (child,) = children.stdout.split()
        os.kill(int(child), signal.SIGKILL)

        async def restarted() -> bool:
            return total(await scrape_async(keeper), "continuum_keeper_restarts_total") == 1.0

        await wait_for(restarted, timeout_s=30, interval_s=0.1, what="the keeper to count the restart")
        # (Stopped before the new service registers, the killed one's file would stay: a killed
        # process leaves its file until `bus metrics targets --prune`.)
        await wait_for(lambda: targets_by_process(home).get("projections", [service]) != [service], timeout_s=60,
                       interval_s=0.1, what="the restarted service to register")
    finally:
        down, _, down_err = await run_bus("down", "--home", str(home), env=env, timeout_s=120)
    assert down == 0, down_err
    await wait_for(lambda: read_targets(targets_dir(home)) == [], timeout_s=30,
                   what=f"every target file removed: {sorted(p.name for p in targets_dir(home).iterdir())}")


async def test_an_endpoint_removes_only_its_own_target_file(tmp_path: Path) -> None:
    """On exit an endpoint removes its file, but not one another process wrote over it since
    (a replica restarted in its place); the file is a valid file_sd target group."""
    registry = CollectorRegistry()
    Counter("demo_things", "Things.", registry=registry).inc(3)
    target = ScrapeTarget.of("agent", namespace="default", agent="demo", replica="0")
    async with serve_metrics(registry, target=target, targets_dir=tmp_path) as endpoint:
        assert endpoint.target_file == tmp_path / "agent.default.demo.0.json"
        groups = json.loads(endpoint.target_file.read_text())
        assert groups == [{"targets": [endpoint.address], "labels": target.labels}]
        assert total(await scrape_async(endpoint.address), "demo_things_total") == 3.0
    assert not (tmp_path / "agent.default.demo.0.json").exists()

    async with serve_metrics(registry, target=target, targets_dir=tmp_path) as endpoint:
        assert endpoint.target_file is not None
        endpoint.target_file.write_text(json.dumps([{"targets": ["127.0.0.1:1"], "labels": target.labels}]))
    assert (tmp_path / "agent.default.demo.0.json").exists()


async def test_metrics_targets_prunes_only_targets_that_do_not_answer(tmp_path: Path) -> None:
    """`bus metrics targets --prune` removes the file of a process that no longer answers (left by
    a kill) and keeps the one of a process that does."""
    home = tmp_path / "home"
    registry = CollectorRegistry()
    live = ScrapeTarget.of("agent", namespace="default", agent="alive", replica="0")
    with refused_port() as dead_port:
        dead = targets_dir(home) / "agent.default.gone.0.json"
        dead.parent.mkdir(parents=True)
        dead.write_text(json.dumps([{"targets": [f"127.0.0.1:{dead_port}"], "labels": {"process": "agent"}}]))
        async with serve_metrics(registry, target=live, targets_dir=targets_dir(home)) as endpoint:
            env = {**os.environ, "BUS_HOME": str(home)}
            code, stdout, _ = await run_bus("metrics", "targets", "--prune", env=env)
            assert code == 0
            answering = {line.split()[-2]: line.split()[-1] for line in stdout.splitlines()[1:3]}
            assert answering == {endpoint.address: "yes", f"127.0.0.1:{dead_port}": "no"}
            assert f"removed {dead.name}" in stdout
            assert [t.address for t in read_targets(targets_dir(home))] == [endpoint.address]
