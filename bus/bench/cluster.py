"""`bus bench` cluster section: the log replicated on a local 3-node cluster (R3) beside one
server (R1), measured alternately in the same run, and the time to resume after a leader dies.

    r1_durable_publish_per_s / r3_...   `Bus.publish` from many tasks, as in the publish section,
                                        against one server (R1) and a 3-node cluster (R3 log)
    r1_consume_ack_per_s / r3_...       a ConsumerEngine draining pre-published envelopes, as in
                                        the consume section
    r3_publish_ratio, r3_consume_ratio  R3 / R1 of the two rates (targets >= 0.8)
    failover_election_s                 leader SIGKILL -> a surviving node reports a new leader of
                                        the log (nats-server's own raft election: 4-9 s)
    failover_consumer_election_s        the same for the inbox consumer's own raft group, when its
                                        leader died too (0 when it led elsewhere): deliveries
                                        wait for both elections
    failover_publish_s                  leader SIGKILL -> first ack of a publish started after it
    failover_consume_s                  leader SIGKILL -> first handled envelope published after it
    failover_resume_s                   the larger of the two (target <= 3)
    failover_client_s                   what the clients add once the cluster has its leaders again:
                                        the larger of publish - log election and consume - the
                                        later election

Every node fsyncs every write (the repo's nats.conf), all on this one machine and disk: R3
writes each message three times to the same disk. Medians over `env.repeats`.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bus.bench import BenchEnv
from bus.bench.consume import engine_rate, prepublish
from bus.bench.publish import durable_rate
from bus.client import Bus
from bus.cluster import LocalCluster
from bus.config import BusConfig, PublisherSettings, StreamSettings
from bus.server import read_monitor
from schemas import Delivery, Envelope
from schemas.payloads import Note

_FAILOVER_AGENT = "failover"


async def run(env: BenchEnv) -> dict[str, float]:
    """Measure R1 and R3 alternately, then one leader kill per repeat; medians."""
    publish_n, consume_n = env.n(50_000), env.n(50_000)
    figures: dict[str, list[float]] = {
        name: [] for name in (
            "r1_durable_publish_per_s", "r3_durable_publish_per_s", "r1_consume_ack_per_s", "r3_consume_ack_per_s",
            "failover_election_s", "failover_consumer_election_s", "failover_publish_s", "failover_consume_s",
            "failover_client_s",
        )
    }
    env.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="cluster-", dir=env.workdir))
    async with env.server("r1") as server, LocalCluster(3, store_root=root) as cluster:
        r1 = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bencher")
        r3 = BusConfig(url=cluster.url, monitor_url=cluster.monitor_url, name="bencher",
                       stream=StreamSettings(replicas=3), publisher=PublisherSettings(ack_timeout_s=30.0))
        async with Bus(r1) as bus1, Bus(r3) as bus3:
            await prepublish(bus1, consume_n)
            await prepublish(bus3, consume_n)
            for _ in range(env.repeats):
                for label, bus in (("r1", bus1), ("r3", bus3)):
                    # To another agent than the consume run's: its inbox holds exactly `consume_n`.
                    figures[f"{label}_durable_publish_per_s"].append(await durable_rate(bus, publish_n, to="sink"))
                    figures[f"{label}_consume_ack_per_s"].append(await engine_rate(bus, consume_n))
            for _ in range(env.repeats):
                for name, value in (await _failover(bus3, cluster)).items():
                    figures[name].append(value)
    out = {name: round(statistics.median(values), 3) for name, values in figures.items() if values}
    out["r3_publish_ratio"] = round(out["r3_durable_publish_per_s"] / out["r1_durable_publish_per_s"], 3)
    out["r3_consume_ratio"] = round(out["r3_consume_ack_per_s"] / out["r1_consume_ack_per_s"], 3)
    out["failover_resume_s"] = max(out["failover_publish_s"], out["failover_consume_s"])
    return out


async def _failover(bus: Bus, cluster: LocalCluster) -> dict[str, float]:
    """Publishers and a consumer engine running; SIGKILL the log's leader; when do they go on?"""
    loop = asyncio.get_running_loop()
    acks: list[tuple[float, float, str]] = []  # (started, acked, envelope id)
    handled: dict[str, float] = {}
    stop = asyncio.Event()

    async def publisher() -> None:
        while not stop.is_set():
            started = loop.time()
            sent = await bus.send(_FAILOVER_AGENT, Note(text="failover"))
            acks.append((started, loop.time(), sent.envelope.id))

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        handled.setdefault(envelope.id, loop.time())

    info = await bus.js.stream_info(bus.subjects.stream)
    assert info.cluster is not None and info.cluster.leader
    leader = cluster.node_named(info.cluster.leader)
    consumer = bus.subjects.inbox_consumer(_FAILOVER_AGENT)
    async with bus.consumer(_FAILOVER_AGENT, handle), asyncio.TaskGroup() as tasks:
        for _ in range(8):
            tasks.create_task(publisher())
        while len(handled) < 200:
            await asyncio.sleep(0.01)
        consumer_info = await bus.js.consumer_info(bus.subjects.stream, consumer)
        consumer_led_there = consumer_info.cluster is not None and consumer_info.cluster.leader == leader.name
        killed_at = loop.time()
        await leader.kill()
        try:
            elections = [_elected(cluster, bus.subjects.stream, leader.name, loop)]
            if consumer_led_there:
                elections.append(_elected(cluster, bus.subjects.stream, leader.name, loop, consumer=consumer))
            elected = await asyncio.gather(*elections)
            elected_at = elected[0]
            consumer_elected_s = elected[1] - killed_at if consumer_led_there else 0.0
            while True:
                after = [(acked, envelope_id) for started, acked, envelope_id in acks if started > killed_at]
                consumed = [handled[i] for _, i in after if i in handled]
                if after and consumed:
                    break
                await asyncio.sleep(0.01)
            published_at = min(acked for acked, _ in after)
            consumed_at = min(consumed)
        finally:
            stop.set()
            await leader.start()
    await cluster.wait_for_stream_leaders()
    election_s = elected_at - killed_at
    publish_s, consume_s = published_at - killed_at, consumed_at - killed_at
    return {
        "failover_election_s": election_s,
        "failover_consumer_election_s": consumer_elected_s,
        "failover_publish_s": publish_s,
        "failover_consume_s": consume_s,
        "failover_client_s": max(publish_s - election_s, consume_s - max(election_s, consumer_elected_s)),
    }


async def _elected(
    cluster: LocalCluster, stream: str, dead: str, loop: asyncio.AbstractEventLoop, *, consumer: str | None = None,
) -> float:
    """The time a running node first reports a leader other than `dead` of `stream` (or of its
    `consumer`)."""
    what = f"consumer {consumer}" if consumer else stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if not node.running or node.name == dead:
                continue
            try:
                jsz = await asyncio.to_thread(read_monitor, node.monitor_url, "jsz?consumers=true", 1.0)
            except (OSError, ValueError):
                continue
            if _leader_reported(jsz, stream, consumer, dead):
                return loop.time()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no new leader of {what} within 60 s")


def _leader_reported(jsz: dict[str, Any], stream: str, consumer: str | None, dead: str) -> bool:
    for account in jsz.get("account_details", []) or []:
        for detail in account.get("stream_detail", []) or []:
            if detail.get("name") != stream:
                continue
            if consumer is None:
                groups = [detail]
            else:
                groups = [c for c in detail.get("consumer_detail", []) or [] if c.get("name") == consumer]
            for group in groups:
                leader = (group.get("cluster") or {}).get("leader")
                if leader and leader != dead:
                    return True
    return False
