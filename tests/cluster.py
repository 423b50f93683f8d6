"""The `nats_cluster` fixture: a real 3-node JetStream cluster (`bus.cluster.LocalCluster`) under
the test's tmp_path, from the repo's nats.conf (fsync on every write), stopped and reaped after
the test. conftest.py imports it, so every test module can ask for it by name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus.cluster import LocalCluster


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    """Three nodes (`continuum-1`..`continuum-3`) on ports they chose, with a JetStream meta
    leader they all agree on. `cluster.url` / `cluster.monitor_url` are the BusConfig values."""
    async with LocalCluster(3, store_root=tmp_path / "cluster") as cluster:
        yield cluster
