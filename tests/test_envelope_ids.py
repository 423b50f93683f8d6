"""Envelope ids as the protocol spells them (schemas/PROTOCOL.md §2): `id`, `correlation_id` and
`causation_id` are UUIDs in lowercase text. The typed decoder refuses anything else with one
reason, which the consumer engine dead-letters as `invalid`, `Bus.envelope` raises and `bus send`
prints, in the same words; the projections keep such a record (a log may hold it from before)
and report it in the `integrity` view.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bus import Bus, ConfigurationError, ConsumerSettings, RetryPolicy
from bus.server import EmbeddedServer
from conftest import wait_for
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas import Codec, DecodeError, Delivery, Envelope, PayloadRegistry, decode_loose, new_id
from schemas.export import json_schemas
from schemas.ids import id_problem, is_id
from schemas.payloads import DeadLettered, Note
from fixtures_agents.helpers import read_log
from test_cli import run_bus

GOOD = "018f0000-0000-7b0c-9418-503cb4b2ee08"
NOT_IDS = [
    pytest.param("msg-1", id="a made-up name"),
    pytest.param(GOOD.upper(), id="upper case"),
    pytest.param(GOOD.replace("-", ""), id="no hyphens"),
    pytest.param("{" + GOOD + "}", id="braces"),
    pytest.param("urn:uuid:" + GOOD, id="urn"),
    pytest.param(GOOD[:-1], id="35 characters"),
    pytest.param(GOOD + "0", id="37 characters"),
    pytest.param(GOOD[:-1] + "g", id="not hex"),
    pytest.param(GOOD[:8] + "0" + GOOD[9:], id="hyphen moved"),
    pytest.param(GOOD[:-1] + "\u0660", id="a non-ASCII digit"),
    pytest.param(GOOD[:-1] + "\n", id="a newline"),
]
WORDS = "is not a UUID in lowercase text"


def envelope_bytes(**fields: Any) -> bytes:
    base: dict[str, Any] = {"id": new_id(), "sender": "tester", "to": "sorter",
                            "created_at": "2026-01-02T03:04:05.678901Z", "payload": {"kind": "note", "text": "x"}}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.mark.parametrize("field", ["id", "correlation_id", "causation_id"])
@pytest.mark.parametrize("value", NOT_IDS)
def test_the_decoder_refuses_an_id_that_is_not_a_lowercase_uuid_and_says_which(field: str, value: str) -> None:
    """One line naming the field and its value; the loose decoder (projections, tail) keeps it."""
    data = envelope_bytes(**{field: value})
    with pytest.raises(DecodeError) as caught:
        Codec().decode(data)
    assert caught.value.problem == "invalid"
    assert str(caught.value) == f"invalid envelope: {id_problem(field, value)}"
    assert "\n" not in str(caught.value) and f"{field} " in str(caught.value) and WORDS in str(caught.value)
    assert getattr(decode_loose(data), field) == value


def test_every_id_the_bus_makes_is_one_and_all_versions_are_accepted() -> None:
    """Fresh (v7), derived (v7), stable (v8) ids and any other version's lowercase text decode."""
    from schemas import derived_id, stable_id

    for value in (new_id(), derived_id(GOOD, "reply"), stable_id("s", 1, "dead"), "00000000-0000-0000-0000-000000000000",
                  "6ba7b810-9dad-11d1-80b4-00c04fd430c8"):
        assert is_id(value)
        Codec().decode(envelope_bytes(id=value, correlation_id=value, causation_id=value))


async def test_the_bus_refuses_to_send_what_the_decoder_would_refuse(bus: Bus) -> None:
    """`Bus.envelope` (so send, broadcast, request, record) raises ConfigurationError with the
    same words, before anything is stored."""
    before = await bus.last_seq()
    for field in ("id", "correlation_id", "causation_id"):
        with pytest.raises(ConfigurationError) as caught:
            await bus.send("sorter", Note(text="x"), **{field: "day-1"})
        assert str(caught.value) == id_problem(field, "day-1")
    assert await bus.last_seq() == before


async def test_a_bad_id_on_an_inbox_is_dead_lettered_as_invalid_and_nothing_else_is_lost(bus: Bus) -> None:
    """Raw envelopes on an agent's inbox subject (a real server, the real engine): those whose
    id, correlation id or causation id is not a lowercase UUID (one of them a request, which
    cannot be answered) are dead-lettered at once as `invalid` with the decoder's reason; the
    valid messages before, between and after them are handled, and the engine goes on."""
    cases = {
        "id": envelope_bytes(id="msg-1"),
        "request id": envelope_bytes(id=GOOD.upper(), reply_to="asker"),
        "correlation_id": envelope_bytes(correlation_id="day-1"),
        "causation_id": envelope_bytes(causation_id=GOOD.replace("-", "")),
    }
    seqs: dict[str, int] = {}
    await bus.send("sorter", Note(text="first"))
    for name, data in cases.items():
        reply = await bus.transport.request("default.inbox.sorter.tester", data, headers={"Nats-Msg-Id": new_id()})
        seqs[name] = json.loads(reply.data)["seq"]
        await bus.send("sorter", Note(text=f"after {name}"))
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    settings = ConsumerSettings(report_interval_s=0.01, drain_timeout_s=2.0, retry=RetryPolicy(backoff_s=(0.05,), max_deliver=3))
    async with bus.consumer("sorter", handle, settings=settings):
        await wait_for(lambda: len(texts) == 1 + len(cases), what="every valid message handled")

        async def all_dead() -> bool:
            return len(await read_log(bus, "default.dead.sorter")) == len(cases)

        await wait_for(all_dead, what="a dead letter for each bad id")
        still = await bus.send("sorter", Note(text="still consuming"))
        await wait_for(lambda: "still consuming" in texts, what="the engine still consuming")
    assert texts == ["first", *(f"after {name}" for name in cases), "still consuming"]
    letters = {env.payload.original_seq: (env, env.payload) for _, env in await read_log(bus, "default.dead.sorter")}
    for name, data in cases.items():
        letter_env, letter = letters[seqs[name]]
        assert isinstance(letter, DeadLettered)
        field = "id" if name == "request id" else name
        value = json.loads(data)[field]
        assert (letter.reason, letter.deliveries, letter.original) == ("invalid", 1, data), name
        assert letter.error == f"invalid envelope: {id_problem(field, value)}", name
        # The letter itself keeps to the protocol: it links only ids that are ids.
        assert is_id(letter_env.id) and all(is_id(i) for i in (letter_env.correlation_id, letter_env.causation_id) if i)
    assert still.ack.seq > max(seqs.values())
    # No reply could be derived from a request id that is not a UUID: none was stored.
    assert await read_log(bus, "default.reply.asker.>") == []


async def test_the_cli_refuses_a_correlation_id_in_one_line_in_the_runtimes_words(
    nats_server: EmbeddedServer, bus: Bus, tmp_path: Path, admin_credentials: str
) -> None:
    """`bus send --correlation-id day-1` exits 2 with one line, the reason a consumer would
    dead-letter it for; nothing is stored. A lowercase UUID is sent as given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env.update(BUS_URL=nats_server.url, BUS_MONITOR_URL=nats_server.settings.monitor_url or "",
               BUS_HOME=str(tmp_path / "home"), BUS_CREDS=admin_credentials)
    before = await bus.last_seq()
    for command in ("send", "request"):
        refused = await run_bus(command, "alice", '{"kind":"note","text":"hi"}', "--correlation-id", "day-1",
                                env=env, cwd=tmp_path)
        assert refused.code == 2 and refused.stdout == ""
        assert refused.stderr == f"error: {id_problem('correlation_id', 'day-1')}\n"
    assert await bus.last_seq() == before
    conversation = new_id()
    sent = await run_bus("send", "alice", '{"kind":"note","text":"hi"}', "--correlation-id", conversation, "--json",
                         env=env, cwd=tmp_path)
    assert sent.code == 0, sent.stderr
    assert json.loads(sent.stdout)["correlation_id"] == conversation


async def test_the_views_keep_old_records_with_bad_ids_and_report_them_in_integrity(bus: Bus, tmp_path: Path) -> None:
    """A log written before ids were enforced: its records still fold (an `events` row each, the
    message in `messages`), and the `integrity` view names each bad id, and each record that is
    not an envelope at all; a log of valid records reports nothing."""
    fine = await bus.send("sorter", Note(text="fine"))
    raw = {
        "bad_id": envelope_bytes(id="msg-1"),
        "bad_corr": envelope_bytes(correlation_id="day-1"),
        "bad_cause": envelope_bytes(causation_id=GOOD.upper()),
        "garbage": b"\x00 not an envelope",
    }
    seqs = {}
    for name, data in raw.items():
        reply = await bus.transport.request("default.inbox.sorter.tester", data, headers={"Nats-Msg-Id": new_id()})
        seqs[name] = json.loads(reply.data)["seq"]
    last = max(seqs.values())
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as service:
        events = (await bus.query("SELECT seq, id, error FROM events ORDER BY seq", min_seq=last, timeout_s=30)).records()
        problems = (await bus.query("SELECT seq, problem, id, detail FROM integrity ORDER BY seq", min_seq=last,
                                    timeout_s=30)).records()
        messages = (await bus.query("SELECT id FROM messages WHERE id = 'msg-1'", min_seq=last, timeout_s=30)).records()
        status = await service.status()
    assert [e["seq"] for e in events] == [fine.ack.seq, *seqs.values()]
    assert next(e for e in events if e["seq"] == seqs["bad_id"])["id"] == "msg-1" and messages == [{"id": "msg-1"}]
    by_seq = {p["seq"]: p for p in problems}
    assert set(by_seq) == set(seqs.values())  # the valid message is not a problem
    assert [by_seq[seqs[n]]["problem"] for n in raw] == ["bad_id", "bad_id", "bad_id", "not_an_envelope"]
    assert by_seq[seqs["bad_id"]]["detail"].startswith(f"id {WORDS}")
    assert by_seq[seqs["bad_corr"]]["detail"].startswith(f"correlation_id {WORDS}")
    assert by_seq[seqs["bad_cause"]]["detail"].startswith(f"causation_id {WORDS}")
    assert "invalid envelope" in by_seq[seqs["garbage"]]["detail"]
    assert status.integrity == {"bad_id": 3, "not_an_envelope": 1}


async def test_a_request_with_a_bad_id_is_refused_an_answer_not_crashed_on(bus: Bus) -> None:
    """`Bus.reply` to a request whose id is not a UUID raises ConfigurationError (its reply id and
    subject derive from that id) instead of a ValueError deep in the id derivation."""
    request = decode_loose(envelope_bytes(id="msg-1", reply_to="asker"))
    with pytest.raises(ConfigurationError, match=WORDS):
        await bus.reply(request, Note(text="pong"))


@pytest.mark.parametrize("value", [GOOD, *NOT_IDS])
def test_the_exported_json_schema_states_the_rule_for_other_languages(value: str) -> None:
    """`bus schema export`'s envelope.json gives each id field the pattern and length the decoder
    checks, and the pattern accepts exactly what the decoder accepts."""
    import re

    schema = json_schemas(PayloadRegistry.with_builtins())["envelope.json"]
    envelope = next(d for name, d in schema["$defs"].items() if name.startswith("Envelope"))
    rule = envelope["properties"]["id"]
    assert rule["minLength"] == rule["maxLength"] == 36
    for field in ("correlation_id", "causation_id"):
        assert envelope["properties"][field]["anyOf"] == [rule, {"type": "null"}]
    # JSON Schema patterns are ECMA 262: `$` does not match before a final newline there.
    matches = re.fullmatch(rule["pattern"].removesuffix("$").removeprefix("^"), value) is not None
    assert matches == is_id(value) == (len(value) == 36 and matches)
