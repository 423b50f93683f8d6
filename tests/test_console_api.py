"""The console's HTTP API against a real nats-server, projection service and consumer engine:
bad input of every kind is a 4xx that says why and leaves the console serving; a dead letter is
retried from the API (recorded, as `bus dlq retry` does) only on an operator console; the live
stream shows an envelope as it is stored."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import pytest

from bus import Bus, BusConfig, PermanentError
from conftest import wait_for
from console_fixtures import console_served, projection_service
from schemas import Delivery, Envelope
from schemas.payloads import Note
from test_deadletter import fast

ACTION = {"X-Continuum-Console": "1"}


async def refuse(envelope: Envelope[Any], delivery: Delivery) -> None:
    raise PermanentError(f"cannot file {envelope.payload.text!r}")


async def _dead_letter_in_view(bus: Bus) -> int:
    rows = (await bus.query("SELECT seq FROM dead_letters ORDER BY seq")).records()
    return rows[-1]["seq"] if rows else 0


async def test_bad_input_is_a_4xx_saying_why_and_the_console_keeps_serving(
    bus: Bus, bus_config: BusConfig, tmp_path: Path
) -> None:
    """Every kind of bad path, query parameter, method, header or body gets a 4xx JSON error
    naming the problem (values that look like SQL never reach SQL: they fail the parameter
    check); afterwards the console still answers."""
    async with projection_service(bus, tmp_path), console_served(bus_config) as base:
        async with httpx2.AsyncClient(base_url=base, timeout=10) as client:
            cases = [
                ("GET", "/api/agents/x';DROP TABLE agents;--", 400, "agent must be"),
                ("GET", "/api/agents/" + "a" * 65, 400, "agent must be"),
                ("GET", "/api/agents/nobody", 404, "no agent named"),
                ("GET", "/api/events/0", 400, "log sequence"),
                ("GET", "/api/events/-3", 400, "log sequence"),
                ("GET", "/api/events/99999999999999999999999", 400, "log sequence"),
                ("GET", "/api/events/12abc", 400, "log sequence"),
                ("GET", "/api/events/999999", 404, "no event at seq"),
                ("GET", "/api/traffic?limit=abc", 400, "limit must be"),
                ("GET", "/api/traffic?limit=0", 400, "limit must be"),
                ("GET", "/api/traffic?kind=note%27%20OR%201%3D1", 400, "kind must be"),
                ("GET", "/api/traffic?bogus=1", 400, "unknown parameter 'bogus'"),
                ("GET", "/api/conversations/..%2F..%2Fetc", 404, None),
                ("GET", "/api/conversations/abc%27--", 400, "correlation id must be"),
                ("GET", "/api/conversations/ffffffff", 404, "no conversation"),
                ("GET", "/api/memory/writer?as_of=yesterday", 400, "as_of must be"),
                ("GET", "/api/memory/writer?mine=yes", 400, "mine must be"),
                ("GET", "/api/llm_calls/nope%00", 400, "call id must be"),
                ("GET", "/api/llm_calls/does-not-exist", 404, "no model call"),
                ("GET", "/api/dead_letters?limit=100000", 400, "limit must be"),
                ("GET", "/api/dead_letters/5", 404, "no dead letter"),
                ("POST", "/api/agents", 405, None),
                ("GET", "/api/nothing-here", 404, None),
                ("GET", "/static/../routes.py", 404, None),
            ]
            for method, path, status, words in cases:
                response = await client.request(method, path, headers=ACTION)
                assert response.status_code == status, (path, response.status_code, response.text)
                assert "error" in response.json() or "detail" in response.json() or status in (404, 405), path
                if words is not None:
                    assert words in response.json()["error"], (path, response.text)
            # An action without the page's header, or from another origin, or to another host name.
            forged = await client.post("/api/dead_letters/5/retry")
            assert forged.status_code == 403 and "X-Continuum-Console" in forged.json()["error"]
            other = await client.post("/api/dead_letters/5/retry", headers={**ACTION, "Origin": "http://evil.example"})
            assert other.status_code == 403 and "cross-origin" in other.json()["error"]
            rebound = await client.get("/api/agents", headers={"Host": "evil.example:80"})
            assert rebound.status_code == 421
            readonly = await client.post("/api/dead_letters/5/retry", headers=ACTION)
            assert readonly.status_code == 403 and "read-only" in readonly.json()["error"]
            unstoppable = await client.post("/api/agents/writer/stop", headers=ACTION)
            assert unstoppable.status_code == 403 and "read-only" in unstoppable.json()["error"]
            # Still serving, and the page and its assets come from the package.
            assert (await client.get("/api/info")).json()["operator"] is False
            page = await client.get("/")
            assert page.status_code == 200 and "<title>Continuum console</title>" in page.text
            script = await client.get("/static/console.js")
            assert script.status_code == 200 and "EventSource" in script.text


async def test_a_dead_letter_is_retried_from_an_operator_console_and_recorded(
    bus: Bus, bus_config: BusConfig, tmp_path: Path
) -> None:
    """POST /api/dead_letters/<seq>/retry sends the original again (a new message caused by the
    dead letter) and records `delivery.dead_letter.retried` by the console's operator name; the
    list then says who retried it; a second retry stores nothing new."""
    async with projection_service(bus, tmp_path), console_served(bus_config, operator=True, operator_name="ops-ann") as base:
        async with bus.consumer("clerk", refuse, settings=fast()):
            await bus.send("clerk", Note(text="form 7"))
            await wait_for(lambda: _dead_letter_in_view(bus), timeout_s=20, what="the dead letter in the view")
            seq = await _dead_letter_in_view(bus)
            async with httpx2.AsyncClient(base_url=base, timeout=10) as client:
                answer = await client.get(f"/api/dead_letters/{seq}")
                assert answer.status_code == 200, answer.text
                shown = answer.json()["dead_letter"]
                assert shown["reason"] == "permanent" and "cannot file 'form 7'" in shown["error"]
                assert shown["original_envelope"]["payload"]["text"] == "form 7"
                first = await client.post(f"/api/dead_letters/{seq}/retry", headers={**ACTION, "Origin": base})
                assert first.status_code == 200, first.text
                retry = first.json()["retry"]
                assert retry["to"] == "clerk" and not retry["already"]
                again = (await client.post(f"/api/dead_letters/{seq}/retry", headers=ACTION)).json()["retry"]
                assert again["already"] and again["retried_as"] == retry["retried_as"]
                async def retried_events() -> list[dict[str, Any]]:
                    return (await bus.query(
                        "SELECT sender, payload->>'retried_as' AS retried_as FROM events "
                        "WHERE kind = 'delivery.dead_letter.retried'",
                    )).records()

                await wait_for(retried_events, timeout_s=20, what="the retry recorded in the log")
                assert await retried_events() == [{"sender": "ops-ann", "retried_as": retry["retried_as"]}]
                listed = (await client.get("/api/dead_letters")).json()["dead_letters"]
                mine = [d for d in listed if d["seq"] == seq]
                assert mine and mine[0]["retried_by"] == "ops-ann"
                not_a_letter = await client.post("/api/dead_letters/1/retry", headers=ACTION)
                assert not_a_letter.status_code == 409, not_a_letter.text
                # Stop: no supervisor of `clerk` listens (it is a consumer in this process).
                unsupervised = await client.post("/api/agents/clerk/stop", headers=ACTION)
                assert unsupervised.status_code == 409 and "no supervisor of 'clerk'" in unsupervised.json()["error"]
                bad_name = await client.post("/api/agents/x%27%3B--/stop", headers=ACTION)
                assert bad_name.status_code == 400, bad_name.text


async def test_the_live_stream_shows_an_envelope_as_it_is_stored(bus: Bus, bus_config: BusConfig, tmp_path: Path) -> None:
    """/api/live: a note sent while the stream is open arrives in a `traffic` event (filtered
    by agent), with its id, kind and route; a page that goes away stops being served."""
    async with projection_service(bus, tmp_path), console_served(bus_config) as base:
        async with httpx2.AsyncClient(base_url=base, timeout=10) as client:
            async with client.stream("GET", "/api/live?agent=alice") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                sent = await bus.send("alice", Note(text="hello"))
                await bus.send("bob", Note(text="not for this page"))

                async def first_traffic() -> dict[str, Any]:
                    event = None
                    async for line in stream.aiter_lines():
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: ") and event == "traffic":
                            return msgspec.json.decode(line[6:])
                    raise AssertionError("the stream ended")

                batch = await asyncio.wait_for(first_traffic(), 10)
                assert (await client.get("/api/info")).status_code == 200
            # The page went away: its subscription with it.
            async def no_pages() -> bool:
                sample = (await client.get("/api/health")).json()["health"]
                return sample is not None and sample["pages"] == 0

            await wait_for(no_pages, timeout_s=10, what="the closed page's subscription to end")
    assert [(i["id"], i["kind"], i["to"]) for i in batch["items"]] == [(sent.envelope.id, "note", "alice")]
