"""Agents on several machines sharing one 3-node cluster, simulated on one box: each "machine"
is its own BUS_HOME, with BUS_URL listing every node (a different one first), and everything
goes through the real `bus` command, as a deployment would (README "Deployment")."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bus.cluster import LocalCluster
from cluster import ClusterAccess
from test_cli import run_bus


def machine(tmp_path: Path, name: str, cluster: LocalCluster, access: ClusterAccess, first: int) -> dict[str, str]:
    """The environment of one machine: its own home, the cluster's nodes starting at `first`."""
    urls = cluster.urls[first:] + cluster.urls[:first]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    return {
        **clean, "BUS_HOME": str(tmp_path / name), "BUS_URL": ",".join(urls),
        "BUS_MONITOR_URL": cluster.monitor_url, "BUS_REPLICAS": "3", **access.env(),
    }


async def test_agents_on_two_machines_talk_through_the_cluster(
    nats_cluster: LocalCluster, cluster_access: ClusterAccess, tmp_path: Path
) -> None:
    alpha = machine(tmp_path, "alpha", nats_cluster, cluster_access, 0)
    beta = machine(tmp_path, "beta", nats_cluster, cluster_access, 2)
    started = await run_bus("agent", "start", "agents.examples.greeter:Greeter", "--wait", "60", env=alpha, cwd=tmp_path)
    assert started.code == 0, started.stderr
    try:
        answer = await run_bus("request", "greeter", '{"kind":"ping","text":"beta"}', "--json", env=beta, cwd=tmp_path)
        assert answer.code == 0, answer.stderr
        reply = json.loads(answer.stdout)
        assert reply["kind"] == "pong" and reply["payload"]["text"] == "hello, beta"

        status = await run_bus("status", "--json", env=beta, cwd=tmp_path)
        assert status.code == 0, status.stderr
        cluster = json.loads(status.stdout)["cluster"]
        assert cluster["replicas"] == 3 and len(cluster["nodes"]) == 3 and cluster["leader"]
        listed = await run_bus("agent", "ps", env=alpha, cwd=tmp_path)
        assert listed.code == 0 and "greeter" in listed.stdout
        elsewhere = await run_bus("agent", "ps", env=beta, cwd=tmp_path)
        assert "greeter" not in elsewhere.stdout  # beta's home supervises nothing
    finally:
        stopped = await run_bus("agent", "stop", "--all", env=alpha, cwd=tmp_path)
        assert stopped.code == 0, stopped.stderr
