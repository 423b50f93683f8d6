"""`bus dlq list|show|retry` as a user runs them: the real CLI against a real nats-server and
projection service, dead letters made by a real consumer engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bus import Bus, PermanentError
from conftest import wait_for
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas import Delivery, Envelope
from schemas.payloads import Note
from test_cli import cli_env, run_bus, server_env  # noqa: F401  (fixtures)
from test_deadletter import dead_letters, fast


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


class Clerk:
    """Refuses notes while `refusing`; remembers what it handled."""

    def __init__(self) -> None:
        self.refusing = True
        self.handled: list[Envelope[Any]] = []

    async def __call__(self, envelope: Envelope[Any], delivery: Delivery) -> None:
        if self.refusing:
            raise PermanentError(f"cannot file {envelope.payload.text!r} today")
        self.handled.append(envelope)


async def _letters_in_view(bus: Bus, count: int) -> bool:
    rows = (await bus.query("SELECT count(*) AS n FROM dead_letters")).records()
    return rows[0]["n"] >= count


async def test_list_show_and_retry_a_dead_letter(tmp_path, server_env, bus: Bus, service: ProjectionService) -> None:
    clerk = Clerk()
    async with bus.consumer("clerk", clerk, settings=fast()):
        sent = await bus.send("clerk", Note(text="form 7"))
        await wait_for(lambda: _letters_in_view(bus, 1), timeout_s=20, what="the dead letter in the view")
        [letter] = await dead_letters(bus, "clerk")
        short = letter.id[-12:]

        listed = await run_bus("dlq", "list", env=server_env, cwd=tmp_path)
        assert listed.code == 0, listed.stderr
        [header, row] = listed.stdout.strip().splitlines()
        assert header.split()[:4] == ["ID", "SEQ", "AGENT", "REASON"]
        assert [row.split()[i] for i in (0, 2, 3)] == [short, "clerk", "permanent"] and row.split()[1].isdigit()
        assert "PermanentError: cannot file 'form 7' today" in row and row.split()[6] == "-"

        shown = await run_bus("dlq", "show", short, env=server_env, cwd=tmp_path)
        assert shown.code == 0, shown.stderr
        assert f"original_id       {sent.envelope.id}" in shown.stdout
        assert "traceback" in shown.stdout and "PermanentError: cannot file 'form 7' today" in shown.stdout
        assert '"text": "form 7"' in shown.stdout

        clerk.refusing = False
        retried = await run_bus("dlq", "retry", short, "--by", "ops", env=server_env, cwd=tmp_path)
        assert retried.code == 0, retried.stderr
        assert f"{letter.id}: sent again to clerk as " in retried.stdout and "by ops" in retried.stdout
        await wait_for(lambda: len(clerk.handled) == 1, timeout_s=20, what="the retried note handled")
        again = clerk.handled[0]
        assert again.id != sent.envelope.id and again.causation_id == letter.id
        assert again.payload == sent.envelope.payload and again.correlation_id == sent.envelope.correlation_id

        twice = await run_bus("dlq", "retry", short, env=server_env, cwd=tmp_path)
        assert twice.code == 0 and "retried before" in twice.stdout, twice.stdout + twice.stderr

        listed = await run_bus("dlq", "list", "--json", env=server_env, cwd=tmp_path)
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(r["id"], r["retried_as"], r["retried_by"]) for r in rows] == [(letter.id, again.id, "ops")]
    assert len(clerk.handled) == 1  # the second retry sent nothing


async def test_a_retry_that_fails_again_is_dead_lettered_again(tmp_path, server_env, bus: Bus, service: ProjectionService) -> None:
    """No loop: the retried message fails, gets its own dead letter, and `--all` retries only what
    was not retried yet."""
    clerk = Clerk()
    async with bus.consumer("clerk", clerk, settings=fast()):
        await bus.send("clerk", Note(text="form 8"))
        await wait_for(lambda: _letters_in_view(bus, 1), timeout_s=20, what="the first dead letter")
        first = await run_bus("dlq", "retry", "--all", "--agent", "clerk", env=server_env, cwd=tmp_path)
        assert first.code == 0 and "sent again to clerk" in first.stdout, first.stderr
        await wait_for(lambda: _letters_in_view(bus, 2), timeout_s=20, what="the retry's own dead letter")
        letters = await dead_letters(bus, "clerk")
        assert len(letters) == 2 and letters[1].payload.original_seq != letters[0].payload.original_seq
        second = await run_bus("dlq", "retry", "--all", env=server_env, cwd=tmp_path)
        assert second.code == 0 and second.stdout.count("sent again") == 1 and letters[1].id in second.stdout


async def test_bad_retries_say_why(tmp_path, server_env, bus: Bus, service: ProjectionService) -> None:
    """Bytes that are not an envelope cannot be sent again; unknown ids and wrong option mixes are
    one clear line each."""
    await bus.transport.request("default.inbox.clerk.mallory", b"\xffnot an envelope", timeout_s=5)
    async with bus.consumer("clerk", Clerk(), settings=fast()):
        await wait_for(lambda: _letters_in_view(bus, 1), timeout_s=20, what="the undecodable dead letter")
    [letter] = await dead_letters(bus, "clerk")
    bad = await run_bus("dlq", "retry", letter.id, env=server_env, cwd=tmp_path)
    assert bad.code == 1 and "not retried" in bad.stdout and "not an envelope" in bad.stdout
    unknown = await run_bus("dlq", "retry", "nothing-like-it", env=server_env, cwd=tmp_path)
    assert unknown.code == 2 and "no dead letter 'nothing-like-it'" in unknown.stderr
    mixed = await run_bus("dlq", "retry", letter.id, "--all", env=server_env, cwd=tmp_path)
    assert mixed.code == 2 and "or --all" in mixed.stderr
    narrowed = await run_bus("dlq", "retry", letter.id, "--agent", "clerk", env=server_env, cwd=tmp_path)
    assert narrowed.code == 2 and "narrow --all" in narrowed.stderr
