"""Several projection services folding one log, each into its own DuckDB file: queries go to
whichever answers (a queue group) and `min_seq` holds whichever it is; `bus projections status`
and `rebuild` address each one by name (`--service`) or all of them (`--all`)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from bus import Bus
from bus.server import EmbeddedServer
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from projections.status import request_status, running_services
from schemas.payloads import Note
from test_cli import run_bus


@pytest.fixture
def env(tmp_path: Path, nats_server: EmbeddedServer, admin_credentials: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    return {
        **clean, "BUS_HOME": str(tmp_path / "home"),
        "BUS_URL": nats_server.url, "BUS_MONITOR_URL": nats_server.settings.monitor_url or "",
        "BUS_CREDS": admin_credentials,
    }


@pytest.fixture
async def two_services(bus: Bus, tmp_path: Path) -> AsyncIterator[tuple[ProjectionService, ProjectionService]]:
    async with AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(ProjectionService(
                bus, ProjectionSettings(db_path=str(tmp_path / f"views-{name}.duckdb"), service_name=name),
            ))
            for name in ("east", "west")
        ]
        yield services[0], services[1]


async def test_min_seq_holds_whichever_service_answers(bus: Bus, two_services) -> None:
    """Every query with min_seq = the last publish's sequence sees that message, whichever of
    the two services answers it; both answer some."""
    for n in range(60):
        sent = await bus.send("counter", Note(text=f"n{n}"))
        result = await bus.query(
            "SELECT count(*) AS n FROM messages WHERE seq = ?", [sent.ack.seq], min_seq=sent.ack.seq, timeout_s=10,
        )
        assert result.records() == [{"n": 1}]
    answered = [_queries_answered(service) for service in two_services]
    assert sum(answered) == 60 and min(answered) > 0, answered


def _queries_answered(service: ProjectionService) -> int:
    return int(sum(
        sample.value
        for metric in service.metrics.query_seconds.collect()
        for sample in metric.samples
        if sample.name.endswith("_count")
    ))


async def test_status_and_rebuild_address_each_service(
    bus: Bus, two_services, env: dict[str, str], tmp_path: Path
) -> None:
    await bus.send("counter", Note(text="one"))
    assert [h.service for h in await running_services(bus)] == ["east", "west"]
    for name in ("east", "west"):
        report = await request_status(bus, service=name)
        assert report.service == name and report.db_path.endswith(f"views-{name}.duckdb")

    shown = await run_bus("projections", "status", "--all", "--format", "json", env=env, cwd=tmp_path)
    assert shown.code == 0, shown.stderr
    assert sorted(r["service"] for r in json.loads(shown.stdout)) == ["east", "west"]

    one = await run_bus("projections", "status", "--service", "west", env=env, cwd=tmp_path)
    assert one.code == 0, one.stderr
    assert "service west" in one.stdout and "views-west.duckdb" in one.stdout

    rebuilt = await run_bus("projections", "rebuild", "--service", "east", "--view", "messages", env=env, cwd=tmp_path)
    assert rebuilt.code == 0, rebuilt.stderr
    assert "rebuilt messages (service east)" in rebuilt.stdout

    missing = await run_bus("projections", "status", "--service", "north", env=env, cwd=tmp_path)
    assert missing.code == 2 and "north" in missing.stderr and "Traceback" not in missing.stderr
