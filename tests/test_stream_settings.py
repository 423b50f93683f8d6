"""The log's settings change only by `bus stream update`, never because a process started with
other ones. Real nats-servers (tests/conftest.py); the CLI runs as a subprocess, as in test_cli.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from pathlib import Path

import msgspec
import pytest

from bus import Bus, BusConfig, StreamSettings
from bus.errors import ConfigurationError
from bus.server import EmbeddedServer
from bus.topology import FieldChange, advisory_stream_config, update_stream
from schemas.payloads import Note

from conftest import refused_port, wait_for
from test_cli import run_bus

TOPOLOGY = "continuum.topology"


@pytest.fixture
def env(tmp_path: Path, nats_server: EmbeddedServer, admin_credentials: str) -> dict[str, str]:
    """A clean environment pointed at the test's server, with a private BUS_HOME."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    return {
        **clean, "BUS_HOME": str(tmp_path / "home"),
        "BUS_URL": nats_server.url, "BUS_MONITOR_URL": nats_server.settings.monitor_url or "",
        "BUS_CREDS": admin_credentials,
    }


def with_stream(config: BusConfig, **settings: object) -> BusConfig:
    return msgspec.structs.replace(config, stream=StreamSettings(**settings))  # type: ignore[arg-type]


async def live(bus: Bus, stream: str | None = None) -> tuple[dict[str, object], int]:
    """The live stream's settings that retention depends on, and its message count."""
    info = await bus.js.stream_info(stream or bus.subjects.stream)
    c = info.config
    settings = {"max_age": c.max_age, "max_bytes": c.max_bytes, "duplicate_window": c.duplicate_window,
                "num_replicas": c.num_replicas}
    return settings, info.state.messages


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TOPOLOGY and r.levelno == logging.WARNING]


# -- a Bus never changes a live stream -------------------------------------------------------------


async def test_a_bus_with_a_shorter_max_age_leaves_the_log_untouched(bus, bus_config, caplog) -> None:
    """A Bus asking for a 1 s max age on a keep-forever log uses the log as it is: its config is
    unchanged and every message is still there 2.5 s after the last one was stored (the old
    drift update deleted them all), and one warning names max_age live vs wanted and says to run
    `bus stream update`."""
    caplog.set_level(logging.WARNING, logger=TOPOLOGY)
    for i in range(20):
        await bus.send("alice", Note(text=str(i)))
    loop = asyncio.get_running_loop()
    stored_at = loop.time()
    before, count = await live(bus)
    assert count == 20

    async with Bus(with_stream(bus_config, max_age_s=1.0)) as short:
        await short.send("alice", Note(text="through the short Bus"))  # it works on the live log
        stored_at = loop.time()
        assert (await live(short))[0] == before

    [warning] = warnings_from(caplog)
    assert bus.subjects.stream in warning and "max_age live forever, wanted 1s" in warning
    assert "bus stream update" in warning
    # A negative check needs a deadline: a 1 s max age empties the log ~1.3 s after the last
    # store (the --force test below waits for exactly that), so 2.5 s is well past it.
    await asyncio.sleep(max(0.0, stored_at + 2.5 - loop.time()))
    assert await live(bus) == (before, 21)


async def test_a_bus_with_default_settings_accepts_an_operators_log(bus, bus_config, caplog) -> None:
    """Default stream settings state no wish about an existing log: after an operator set a max
    age and max bytes, a default Bus starts without a warning; a Bus that chose another max
    bytes warns about that field alone; neither changes the log."""
    caplog.set_level(logging.WARNING, logger=TOPOLOGY)
    info = await bus.js.stream_info(bus.subjects.stream)
    await update_stream(bus.js, dataclasses.replace(info.config, max_age=3600.0, max_bytes=1 << 20))
    before, _ = await live(bus)

    async with Bus(bus_config):
        pass
    assert warnings_from(caplog) == []

    async with Bus(with_stream(bus_config, max_age_s=3600.0, max_bytes=2 << 20)):
        pass
    [warning] = warnings_from(caplog)
    assert "max_bytes live 1 MiB, wanted 2 MiB" in warning and "max_age" not in warning
    assert (await live(bus))[0] == before


async def test_a_missing_log_is_created_with_the_bus_settings(bus_config, caplog) -> None:
    """When the log does not exist yet, the first Bus creates it with its own settings (the
    duplicate window capped at the max age), without a warning."""
    caplog.set_level(logging.WARNING, logger=TOPOLOGY)
    async with Bus(with_stream(bus_config, max_age_s=30.0, max_bytes=1 << 20, duplicate_window_s=60.0)) as bus:
        settings, _ = await live(bus)
    assert settings == {"max_age": 30.0, "max_bytes": 1 << 20, "duplicate_window": 30.0, "num_replicas": 1}
    assert warnings_from(caplog) == []


async def test_a_log_the_server_cannot_create_is_a_configuration_error(bus_config) -> None:
    """Three replicas on a single server: entering the Bus raises ConfigurationError carrying the
    server's reason, not a nats-py error."""
    with pytest.raises(ConfigurationError, match="replicas > 1 not supported"):
        async with Bus(with_stream(bus_config, replicas=3)):
            pass


async def test_a_differing_advisory_stream_is_left_alone_until_an_update(tmp_path, env, bus, bus_config, caplog) -> None:
    """The advisory stream is internal but holds advisories whose dead letters are not written
    yet: a Bus leaves a differing one as it is, with a warning; `bus stream update` restores its
    declaration (here a growth, so without --force)."""
    caplog.set_level(logging.WARNING, logger=TOPOLOGY)
    stream = bus.subjects.advisory_stream
    declared = advisory_stream_config(bus.subjects)
    info = await bus.js.stream_info(stream)
    await update_stream(bus.js, dataclasses.replace(info.config, max_age=86400.0))

    async with Bus(bus_config):
        pass
    [warning] = warnings_from(caplog)
    assert stream in warning and "max_age live 1d, wanted 7d" in warning
    assert (await live(bus, stream))[0]["max_age"] == 86400.0

    result = await run_bus("stream", "update", env=env, cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert f"{stream}: max_age 1d -> 7d" in result.stdout
    assert (await live(bus, stream))[0]["max_age"] == declared.max_age


# -- bus stream update / info ----------------------------------------------------------------------


async def test_update_refuses_to_shrink_without_force_and_applies_with_it(tmp_path, env, bus) -> None:
    """`stream update --max-age 1` on a keep-forever log exits 2 naming the change and what it
    deletes and --force, and changes nothing; with --force it prints old -> new (the duplicate
    window shortened with it) and the server then deletes the old messages."""
    for i in range(10):
        await bus.send("alice", Note(text=str(i)))
    before = await live(bus)

    refused = await run_bus("stream", "update", "--max-age", "1", env=env, cwd=tmp_path)
    assert refused.code == 2, refused.stdout
    assert "refusing" in refused.stderr and "max_age forever -> 1s" in refused.stderr
    assert "messages older than 1s are deleted" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""
    assert await live(bus) == before

    forced = await run_bus("stream", "update", "--max-age", "1", "--force", env=env, cwd=tmp_path)
    assert forced.code == 0, forced.stderr
    assert f"{bus.subjects.stream}: max_age forever -> 1s" in forced.stdout
    assert f"{bus.subjects.stream}: duplicate_window 10m -> 1s" in forced.stdout
    settings, _ = await live(bus)
    assert (settings["max_age"], settings["duplicate_window"]) == (1.0, 1.0)

    async def emptied() -> bool:
        return (await live(bus))[1] == 0

    await wait_for(emptied, timeout_s=15, what="the 1 s max age to delete the old messages")


async def test_update_applies_a_growth_without_force_then_has_nothing_to_change(tmp_path, env, bus) -> None:
    """A longer max age and a higher max bytes delete nothing: applied without --force, printed
    as old -> new; running the same command again prints "nothing to change"."""
    info = await bus.js.stream_info(bus.subjects.stream)
    await update_stream(bus.js, dataclasses.replace(info.config, max_age=3600.0, max_bytes=1 << 20))

    args = ("stream", "update", "--max-age", "7200", "--max-bytes", "2MiB", "--duplicate-window", "120")
    grown = await run_bus(*args, env=env, cwd=tmp_path)
    assert grown.code == 0, grown.stderr
    for line in ("max_age 1h -> 2h", "max_bytes 1 MiB -> 2 MiB", "duplicate_window 10m -> 2m"):
        assert f"{bus.subjects.stream}: {line}" in grown.stdout
    assert (await live(bus))[0] == {"max_age": 7200.0, "max_bytes": 2 << 20, "duplicate_window": 120.0, "num_replicas": 1}

    again = await run_bus(*args, env=env, cwd=tmp_path)
    assert again.code == 0 and "nothing to change" in again.stdout, again.stderr

    unlimited = await run_bus("stream", "update", "--max-age", "0", "--max-bytes", "-1", env=env, cwd=tmp_path)
    assert unlimited.code == 0, unlimited.stderr
    assert "max_age 2h -> forever" in unlimited.stdout and "max_bytes 2 MiB -> unlimited" in unlimited.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-age", "-5"], ["--max-age", "must be 0 or more"]),
        (["--max-age", "soon"], ["--max-age", "'soon' is not a number"]),
        (["--max-age", "1e30"], ["--max-age", "100 years"]),
        (["--max-age", "0.01"], ["--max-age", "minimum of 0.1 seconds"]),
        (["--max-bytes", "-2"], ["--max-bytes", "not a size"]),
        (["--max-bytes", "0"], ["--max-bytes", "at least 1 byte"]),
        (["--max-bytes", "lots"], ["--max-bytes", "not a size"]),
        (["--max-bytes", "9" * 400], ["--max-bytes", "over the server's limit"]),
        (["--duplicate-window", "nan"], ["--duplicate-window", "not a finite number"]),
        (["--replicas", "9"], ["--replicas", "5 replicas"]),
        (["--max-age", "60", "--duplicate-window", "120", "--force"], ["duplicate window (2m)", "max age (1m)"]),
        (["--replicas", "3"], ["refused", "replicas > 1 not supported"]),
    ],
    ids=["negative-age", "text-age", "huge-age", "tiny-age", "negative-bytes", "zero-bytes", "text-bytes",
         "huge-bytes", "nan-window", "too-many-replicas", "window-over-age", "server-refuses-replicas"],
)
async def test_update_rejects_bad_arguments_cleanly(tmp_path, env, bus, args, expected) -> None:
    """A bad value exits 2 with one message naming the option and what is wrong, no traceback,
    and the log unchanged."""
    before = await live(bus)
    result = await run_bus("stream", "update", *args, env=env, cwd=tmp_path)
    assert result.code == 2, result.stdout
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert await live(bus) == before


async def test_info_prints_the_live_settings_and_counts(tmp_path, env, bus) -> None:
    """`stream info` shows both streams' message counts and live settings; --json the same as one object."""
    for i in range(3):
        await bus.send("alice", Note(text=str(i)))
    text = await run_bus("stream", "info", env=env, cwd=tmp_path)
    assert text.code == 0, text.stderr
    assert f"{bus.subjects.stream}: 3 messages" in text.stdout and "max_age           forever" in text.stdout

    as_json = await run_bus("stream", "info", "--json", env=env, cwd=tmp_path)
    view = json.loads(as_json.stdout)
    assert view["log"]["messages"] == 3 and view["log"]["max_age_s"] == 0.0 and view["log"]["max_bytes"] == -1
    assert view["advisories"]["name"] == bus.subjects.advisory_stream and view["advisories"]["max_age_s"] == 604800.0


@pytest.mark.parametrize("args", [["stream", "info"], ["stream", "update", "--max-age", "60"]], ids=["info", "update"])
async def test_without_a_server_stream_commands_say_how_to_start_one(tmp_path, args) -> None:
    """With nothing listening at BUS_URL, exit 2 with the `bus up --detach` hint and no traceback."""
    with refused_port() as port:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
        env = {**clean, "BUS_HOME": str(tmp_path / "home"), "BUS_URL": f"nats://127.0.0.1:{port}"}
        result = await run_bus(*args, env=env, cwd=tmp_path, timeout_s=20)
    assert result.code == 2
    assert "bus up --detach" in result.stderr and "BUS_URL" in result.stderr
    assert "Traceback" not in result.stderr


# -- what deletes messages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "old", "new", "deletes"),
    [
        ("max_age", 0.0, 60.0, True),          # forever -> a limit
        ("max_age", 3600.0, 60.0, True),
        ("max_age", 60.0, 3600.0, False),
        ("max_age", 60.0, 0.0, False),         # a limit -> forever
        ("max_bytes", -1, 1024, True),         # unlimited -> a limit
        ("max_bytes", 2048, 1024, True),
        ("max_bytes", 1024, 2048, False),
        ("max_bytes", 1024, -1, False),
        ("num_replicas", 3, 1, True),
        ("num_replicas", 1, 3, False),
        ("duplicate_window", 600.0, 60.0, False),
        ("allow_atomic", False, True, False),
    ],
)
def test_which_changes_delete_stored_messages(field, old, new, deletes) -> None:
    """A shorter max age (0 = forever), a lower max bytes (-1 = unlimited) and fewer replicas
    delete stored messages, so `bus stream update` wants --force for them; nothing else does."""
    assert (FieldChange(field, old, new).loss is not None) is deletes
