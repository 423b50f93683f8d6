"""The main job's own path: `bus demo research` with no server running starts the embedded one
(through `bus up`'s code), runs a day, and stops it again; in a pipe, without a progress line."""

from __future__ import annotations

import os
from pathlib import Path

from bus.server import free_port_outside_ephemeral_range
from test_cli import run_bus


async def test_the_demo_starts_and_stops_its_embedded_server(tmp_path: Path) -> None:
    port = free_port_outside_ephemeral_range()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BUS_", "ANTHROPIC_"))}
    env = {**clean, "BUS_HOME": str(tmp_path / "home"), "BUS_URL": f"nats://127.0.0.1:{port}"}
    result = await run_bus("demo", "research", "--day", "1", env=env, cwd=tmp_path, timeout_s=240)
    assert result.code == 0, result.stderr[-3000:]
    assert "starting the embedded one" in result.stdout and "day 1:" in result.stdout
    assert "bus is down" in result.stdout
    assert "\r" not in result.stderr and "agents ready" not in result.stderr  # no progress line in a pipe
