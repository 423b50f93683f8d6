"""Decoding log records into the batch table: exact values for every shape of record, and the
same table as decoding each record with `schemas.decode_loose`."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pytest

import projections.batch as batch_module
from bus.client import Bus
from bus.config import BusConfig
from bus.log_reader import LogRecord
from projections.batch import build_batch, merge
from projections.workload import synthetic_log
from schemas import DecodeError, Envelope, decode_loose
from schemas.limits import Headers

T0 = 1_714_557_600_123_456_789  # 2024-05-01T10:00:00.123456789Z, in ns
STORED_AT = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
SUBJECT = b"ns.inbox.writer.planner"
FENCE = b"NATS/1.0\r\nNats-Msg-Id: m-1\r\nNats-Expected-Last-Subject-Sequence: 41\r\nNats-Expected-Last-Subject-Sequence-Subject: ns.event.planner.>\r\n\r\n"
PLAIN_HEADER = b"NATS/1.0\r\nNats-Msg-Id: m-1\r\n\r\n"

COLUMNS = [
    ("seq", pa.int64()), ("stored_at", pa.timestamp("us", tz="UTC")), ("subject", pa.string()),
    ("id", pa.string()), ("kind", pa.string()), ("sender", pa.string()), ("recipient", pa.string()),
    ("tag", pa.string()), ("reply_to", pa.string()), ("correlation_id", pa.string()),
    ("causation_id", pa.string()), ("priority", pa.int16()), ("created_at", pa.timestamp("us", tz="UTC")),
    ("expires_at", pa.timestamp("us", tz="UTC")), ("prev_seq", pa.int64()), ("chain", pa.string()),
    ("headers", pa.string()), ("payload", pa.string()), ("error", pa.string()), ("raw", pa.binary()),
]
EMPTY_ROW: dict[str, Any] = {
    name: None for name, _ in COLUMNS if name not in ("seq", "stored_at", "subject")
}


def envelope(**fields: Any) -> bytes:
    """A minimal envelope's JSON (keys in the order msgspec writes them), `fields` overriding."""
    body: dict[str, Any] = {
        "id": "e-1", "sender": "planner", "payload": {"kind": "note", "text": "hi"},
        "created_at": "2024-05-01T10:00:00.500000Z",
    }
    body.update(fields)
    return msgspec.json.encode({k: v for k, v in body.items() if v is not ...})


def records(*datas: bytes, header: bytes = b"") -> list[LogRecord]:
    return [LogRecord(seq, T0 + seq * 1000, SUBJECT, data, header) for seq, data in enumerate(datas, 1)]


def row(data: bytes, header: bytes = b"") -> dict[str, Any]:
    return build_batch(records(data, header=header)).table.to_pylist()[0]


def decoded(**values: Any) -> dict[str, Any]:
    """The row of the default `envelope()` with `values` changed."""
    base = {
        "seq": 1, "stored_at": STORED_AT + timedelta(microseconds=1), "subject": SUBJECT.decode(),
        "id": "e-1", "kind": "note", "sender": "planner", "recipient": None, "tag": None, "reply_to": None,
        "correlation_id": None, "causation_id": None, "priority": 4,
        "created_at": datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC), "expires_at": None,
        "prev_seq": None, "chain": None, "headers": None, "payload": '{"kind":"note","text":"hi"}',
        "error": None, "raw": None,
    }
    base.update(values)
    return base


def test_table_schema_is_fixed() -> None:
    """The table has the columns the folds select, in order, with their types and time zone."""
    table = build_batch(records(envelope(), b"garbage")).table
    assert [(f.name, f.type) for f in table.schema] == COLUMNS


def test_the_subject_class_and_name_are_what_split_part_gives_for_any_subject() -> None:
    """Folds read `subject_class` and `subject_name` instead of `split_part(subject, '.', 2)` and
    `(…, 3)`: the same text for every subject a client can publish to, odd ones included (too
    few tokens, empty tokens, non-ASCII), in one batch and in a slice of it."""
    subjects = [
        "default.event.alice.agent.started", "default.inbox.bob.alice", "default.group.ops.alice",
        "default.reply.bob.0190.alice", "default.dead.alice", "default.event", "default", "default..x",
        "default.event.", "default.événement.zoë.x", "default.inbox.bob.alice", "default.event.alice.agent.started",
    ]
    batch = build_batch([
        LogRecord(seq, T0 + seq, subject.encode(), envelope(), b"") for seq, subject in enumerate(subjects, 1)
    ])
    con = duckdb.connect()
    fresh = batch.window(3, 9)  # sliced before the batch's split is worked out: works out its own
    batch.fold_table()  # then carried by slices, and by a merge of slices
    for part in (batch, fresh, batch.window(2, 10), merge([batch.window(0, 5), batch.window(5)])):  # type: ignore[list-item]
        assert part is not None
        assert part.fold_table().drop_columns(["subject_class", "subject_name"]).equals(part.table)
        con.register("batch", part.fold_table())
        rows = con.execute(
            "SELECT subject_class, split_part(subject, '.', 2), subject_name, split_part(subject, '.', 3) "
            "FROM batch ORDER BY seq"
        ).fetchall()
        assert len(rows) == part.size
        assert [(r[0], r[2]) for r in rows] == [(r[1], r[3]) for r in rows]
    assert batch.table.schema.names == [name for name, _ in COLUMNS]  # the table itself is unchanged


def test_plain_envelope() -> None:
    """A plain envelope fills the envelope columns and leaves the optional ones NULL; the
    server time is cut to microseconds."""
    assert row(envelope()) == decoded()


def test_every_optional_field() -> None:
    """Every optional envelope field has its column; `Bus-Prev-Seq` becomes `prev_seq`, the
    stored fence header's subject filter becomes `chain`, and headers are kept as JSON."""
    data = envelope(
        to="writer", tag="team", correlation_id="c-1", causation_id="k-1", reply_to="planner",
        priority=7, expires_at="2024-05-01T10:05:00Z", headers={"Bus-Prev-Seq": "41", "Trace": "t-9"}, v=1,
    )
    assert row(data, FENCE) == decoded(
        recipient="writer", tag="team", correlation_id="c-1", causation_id="k-1", reply_to="planner",
        priority=7, expires_at=datetime(2024, 5, 1, 10, 5, tzinfo=UTC), prev_seq=41,
        chain="ns.event.planner.>", headers='{"Bus-Prev-Seq":"41","Trace":"t-9"}',
    )


@pytest.mark.parametrize(
    ("headers", "nats_header", "prev_seq", "chain"),
    [
        ({"Bus-Prev-Seq": "0"}, PLAIN_HEADER, 0, None),  # a claim over the agent's whole chain
        ({"Bus-Prev-Seq": "41"}, FENCE, 41, "ns.event.planner.>"),
        ({"Bus-Prev-Seq": "forty"}, FENCE, -1, "ns.event.planner.>"),  # a broken link, kept
        ({"Trace": "t-9"}, FENCE, None, None),  # no claim: the fence is not read
        ({}, FENCE, None, None),
    ],
)
def test_prev_seq_and_chain(headers: dict[str, str], nats_header: bytes, prev_seq: int | None, chain: str | None) -> None:
    """`prev_seq` is the claimed previous sequence (-1 when not a number) and `chain` the fence
    filter stored with a claim."""
    got = row(envelope(headers=headers), nats_header)
    assert (got["prev_seq"], got["chain"]) == (prev_seq, chain)
    assert got["headers"] == (msgspec.json.encode(headers).decode() if headers else None)


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01T10:00:00.123Z", datetime(2024, 5, 1, 10, 0, 0, 123000, tzinfo=UTC)),
        ("2024-05-01T10:00:00.123456Z", datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01T10:00:00.123456789Z", datetime(2024, 5, 1, 10, 0, 0, 123457, tzinfo=UTC)),
        ("2024-05-01T10:00:00.9999999Z", datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC)),
        ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01T12:00:00.25+02:00", datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2024-05-01T04:30:00-05:30", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01T10:00:00-00:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01 10:00:00Z", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01t10:00:00z", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01T10:00:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),  # no zone: read as UTC
        ("2024-02-29T10:00:00Z", datetime(2024, 2, 29, 10, 0, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("9999-12-31T23:59:59.999999Z", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_datetimes(text: str, instant: datetime) -> None:
    """`created_at` and `expires_at` hold the instant the text names, whatever its offset and
    number of fractional digits, alone and among ordinary records."""
    alone = row(envelope(created_at=text, expires_at=text))
    assert (alone["created_at"], alone["expires_at"]) == (instant, instant)
    mixed = build_batch(records(envelope(), envelope(created_at=text, expires_at=text), envelope())).table.to_pylist()
    assert [(r["created_at"], r["expires_at"], r["error"]) for r in mixed] == [
        (decoded()["created_at"], None, None), (instant, instant, None), (decoded()["created_at"], None, None),
    ]


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"kind": "task.requested", "title": "t"}, "task.requested"),
        ({"title": "t", "kind": "note"}, "note"),  # kind not first
        (b'{"kind":"no\\u0074e"}', "note"),  # an escape in the kind
        (b'{"kind":"say \\"hi\\""}', 'say "hi"'),
        (b'{ "kind" : "note" }', "note"),
        ({"kind": ""}, ""),
        ({"kind": 5}, None),
        ({"text": "no kind"}, None),
        ([1, 2], None),
        (b'{"kind":"n\xffte"}', "n\ufffdte"),  # not UTF-8: replaced, the record kept
        (b'{"text":"t","kind":"n\xffte"}', None),
    ],
)
def test_payload_kind(payload: Any, kind: str | None) -> None:
    """`kind` is the payload's tag wherever it sits in the object and however it is escaped;
    NULL when the payload has no string tag."""
    raw = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
    data = envelope(payload=...).replace(b'"sender":"planner"', b'"sender":"planner","payload":' + raw)
    got = row(data)
    assert got["kind"] == kind and got["error"] is None
    assert got["payload"] == raw.decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x00not an envelope", "invalid envelope: JSON is malformed: invalid character (byte 0)"),
        (b"", "invalid envelope: Input data was truncated"),
        (b"[]", "invalid envelope: Expected `object`, got `array`"),
        (envelope(id=...), "invalid envelope: Object missing required field `id`"),
        (envelope(priority="high"), "invalid envelope: Expected `int`, got `str` - at `$.priority`"),
        (envelope(priority=40000), "invalid envelope: Expected `int` <= 9 - at `$.priority`"),
        (envelope(headers=None), "invalid envelope: Expected `object`, got `null` - at `$.headers`"),
        (envelope(headers={"Bus-Prev-Seq": 4}), "invalid envelope: Expected `str`, got `int` - at `$.headers[...]`"),
        (envelope(v="1"), "invalid envelope: Expected `int`, got `str` - at `$.v`"),
        (envelope(created_at=1714557600), "invalid envelope: Expected `datetime`, got `int` - at `$.created_at`"),
        (envelope(created_at="2024-02-30T10:00:00Z"), "invalid envelope: Invalid RFC3339 encoded datetime - at `$.created_at`"),
        (envelope(created_at="2023-02-29T10:00:00Z"), "invalid envelope: Invalid RFC3339 encoded datetime - at `$.created_at`"),
        (envelope(created_at="2024-05-01T24:00:00Z"), "invalid envelope: Invalid RFC3339 encoded datetime - at `$.created_at`"),
        (envelope(created_at="0000-05-01T10:00:00Z"), "invalid envelope: Invalid RFC3339 encoded datetime - at `$.created_at`"),
        (envelope(created_at="2024-05-01T10:00Z"), "invalid envelope: Invalid RFC3339 encoded datetime - at `$.created_at`"),
        (envelope(expires_at="soon"), "invalid envelope: Invalid RFC3339 encoded datetime - at `$.expires_at`"),
        (envelope(created_at="2024-05-01T10:00:00Z\n2024-05-01T10:00:00Z"), "invalid envelope: Invalid RFC3339 encoded datetime - at `$.created_at`"),
        (envelope(sender="plan").replace(b"plan", b"pl\xffn"), "invalid envelope: 'utf-8' codec can't decode byte 0xff in position 2: invalid start byte"),
    ],
)
def test_undecodable_records_keep_their_bytes(data: bytes, error: str) -> None:
    """A record that is no valid envelope keeps its row: seq, time and subject, the reason in
    `error` and the bytes in `raw`; every envelope column is NULL. Among ordinary records, it
    changes none of theirs."""
    expected = {"seq": 1, "stored_at": STORED_AT + timedelta(microseconds=1), "subject": SUBJECT.decode(),
                **EMPTY_ROW, "error": error, "raw": data}
    assert row(data) == expected
    mixed = build_batch(records(envelope(), data, envelope())).table.to_pylist()
    assert mixed[1] == expected | {"seq": 2, "stored_at": STORED_AT + timedelta(microseconds=2)}
    assert [mixed[0], mixed[2]] == [decoded(), decoded(seq=3, stored_at=STORED_AT + timedelta(microseconds=3))]


def test_batch_facts() -> None:
    """The Batch says what its records hold: sequences, last server time, payload kinds,
    subject classes, and whether any record claims a previous sequence."""
    datas = [envelope(), envelope(payload={"kind": "task.requested", "title": "t"}), b"garbage"]
    batch = build_batch(
        [*records(*datas), LogRecord(9, T0 + 9000, b"ns.event.planner.x", envelope(headers={"Bus-Prev-Seq": "3"}))],
        after_seq=0,
    )
    assert tuple(batch.seqs) == (1, 2, 3, 9) and batch.last_time_ns == T0 + 9000
    assert batch.kinds == {"note", "task.requested"}
    assert batch.categories == {"inbox", "event"}
    assert batch.claims is True
    assert build_batch(records(envelope())).claims is False


def test_fields_mirror_the_envelope() -> None:
    """The batch decoder reads the envelope's fields with the envelope's types and defaults
    (datetimes as text, headers left unset when absent), so it accepts what `decode_loose` does."""
    mirror = {f.name: f for f in msgspec.structs.fields(batch_module._Fields)}
    for field in msgspec.structs.fields(Envelope[msgspec.Raw]):
        ours = mirror.pop(field.name)
        if field.name == "headers":
            assert (field.type, field.default_factory) == (Headers, dict)
            assert (ours.type, ours.default) == (Headers | msgspec.UnsetType, msgspec.UNSET)
            continue
        text_for_datetime = {datetime: str, datetime | None: str | None}
        assert ours.type == text_for_datetime.get(field.type, field.type), field.name
        assert (ours.default, ours.default_factory) == (field.default, field.default_factory), field.name
    assert not mirror


# -- a big mixed batch against decode_loose -------------------------------------------------

ODD_DATAS = [
    b"\x00not an envelope",
    envelope(id=...),
    envelope(created_at="2024-05-01T12:00:00+02:00", expires_at="2024-05-01T12:30:00.5+02:00"),
    envelope(created_at="2024-05-01T10:00:00.123456789Z"),
    envelope(created_at="2024-05-01T10:00:00"),
    envelope(created_at="2024-13-01T10:00:00+02:00"),
    envelope(expires_at="nope"),
    envelope(sender="plan").replace(b"plan", b"pl\xffn"),
    envelope(priority="high"),
]


def reference_row(record: LogRecord) -> dict[str, Any]:
    """The row a record makes by the rules stated in `projections.batch`, from `decode_loose`."""
    base = {
        "seq": record.seq,
        "stored_at": datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=record.time_ns // 1000),
        "subject": record.subject.decode(),
    }
    try:
        env = decode_loose(record.data)
    except (DecodeError, UnicodeDecodeError) as exc:
        error = str(exc) if isinstance(exc, DecodeError) else f"invalid envelope: {exc}"
        return base | EMPTY_ROW | {"error": error, "raw": record.data}
    payload = bytes(env.payload)
    body = msgspec.json.decode(payload)
    kind = body.get("kind") if isinstance(body, dict) else None
    prev: int | None = None
    if "Bus-Prev-Seq" in env.headers:
        try:
            prev = int(env.headers["Bus-Prev-Seq"])
        except ValueError:
            prev = -1
    chain = None
    if prev is not None and b"Nats-Expected-Last-Subject-Sequence-Subject: " in record.header:
        chain = record.header.split(b"Nats-Expected-Last-Subject-Sequence-Subject: ")[1].split(b"\r\n")[0].decode()
    return base | {
        "id": env.id, "kind": kind if isinstance(kind, str) else None, "sender": env.sender,
        "recipient": env.to, "tag": env.tag, "reply_to": env.reply_to, "correlation_id": env.correlation_id,
        "causation_id": env.causation_id, "priority": env.priority,
        "created_at": as_utc(env.created_at), "expires_at": as_utc(env.expires_at),
        "prev_seq": prev, "chain": chain,
        "headers": msgspec.json.encode(env.headers).decode() if env.headers else None,
        "payload": payload.decode("utf-8", errors="replace"), "error": None, "raw": None,
    }


def as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def mixed_log(count: int, odd_every: int, seed: int) -> list[LogRecord]:
    """`count` synthetic records (agent events with fenced claims among them), with odd or
    broken records spread through them."""
    bus = Bus(BusConfig(name="tester"))
    rng = random.Random(seed)
    out: list[LogRecord] = []
    for seq, item in enumerate(synthetic_log(bus, count, seed=seed), 1):
        data = rng.choice(ODD_DATAS) if seq % odd_every == 0 else item.data
        header = FENCE if b"Bus-Prev-Seq" in data else PLAIN_HEADER
        out.append(LogRecord(seq, T0 + seq * 1_000_003, item.subject.encode(), data, header))
    return out


@pytest.mark.parametrize("odd_every", [10**9, 97])
def test_big_mixed_batch_matches_decode_loose(odd_every: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large batch of the bus's own records, with odd and broken ones among them, makes the
    same rows as decoding each record with `decode_loose`; only the odd ones are decoded by it
    (the others take the column-wise path)."""
    log = mixed_log(5000, odd_every, seed=3)
    calls: list[bytes] = []

    def counted(data: bytes) -> Any:
        calls.append(data)
        return decode_loose(data)

    monkeypatch.setattr(batch_module, "decode_loose", counted)
    batch = build_batch(log, after_seq=0)
    monkeypatch.undo()

    assert batch.table.to_pylist() == [reference_row(record) for record in log]
    assert sorted(calls) == sorted(r.data for r in log if r.data in ODD_DATAS)
    assert batch.claims is True and "event" in batch.categories
    assert batch.kinds == {k for k in batch.table.column("kind").to_pylist() if k is not None}


def test_batch_boundaries_do_not_change_rows() -> None:
    """Decoding a log in batches of any size makes the same rows as decoding it at once."""
    log = mixed_log(1200, 13, seed=5)
    whole = build_batch(log).table.to_pylist()
    for size in (1, 7, 500):
        parts: list[dict[str, Any]] = []
        for at in range(0, len(log), size):
            parts += build_batch(log[at:at + size]).table.to_pylist()
        assert parts == whole
