"""Property-based fuzzing of every decoder a client's bytes reach, and of the fold's decode path.

Properties, over arbitrary bytes and over JSON shaped like envelopes with wrong, odd, huge or
deeply nested values:
- `Codec.decode` and `decode_loose` return an envelope or raise `DecodeError`, nothing else;
- the nesting measure agrees with a reference scanner;
- `build_batch` never raises and keeps one row per record, with an error exactly where
  `decode_loose` refuses; and a real DuckDB store folds such batches without raising.

CI runs a bounded number of examples; `-m soak` runs many more.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.log_reader import LogRecord
from projections.batch import build_batch
from projections.store import Store
from schemas import Codec, DecodeError, decode_loose
from schemas.limits import MAX_DEPTH, nesting_exceeds

# No example database: the same checks run under two strategies (CI and soak sizes), and a
# saved example of one replayed under the other is not the same data.
CI = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SOAK = settings(max_examples=20_000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_767_225_600_000_000_000

_codec = Codec()

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), st.sampled_from(["note", "ping", "task.requested", "2026-01-02T03:04:05Z", "", "a.b*"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
FIELDS = ["id", "sender", "payload", "created_at", "to", "tag", "correlation_id", "causation_id",
          "reply_to", "priority", "expires_at", "headers", "v"]


@st.composite
def envelope_like(draw: st.DrawFn) -> bytes:
    """JSON close to an envelope: valid fields, some replaced by arbitrary values, some dropped,
    a payload of a known or unknown kind, sometimes wrapped deep in lists."""
    obj: dict[str, Any] = {
        "id": "018f0000-0000-7b0c-9418-503cb4b2ee08",
        "sender": "tester",
        "payload": {"kind": draw(st.sampled_from(["note", "ping", "no.such", "task.requested"])), "text": "x"},
        "created_at": "2026-01-02T03:04:05Z",
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        if draw(st.booleans()):
            obj[name] = draw(json_values)
        else:
            obj.pop(name, None)
    data = json.dumps(obj).encode()
    depth = draw(st.integers(min_value=0, max_value=3 * MAX_DEPTH))
    if depth:
        data = b"[" * depth + data + b"]" * draw(st.integers(min_value=0, max_value=depth))
    return data


hostile_bytes = st.one_of(st.binary(max_size=400), envelope_like(), json_values.map(lambda v: json.dumps(v).encode()))


def reference_depth(data: bytes) -> int:
    """The deepest nesting of arrays/objects outside strings, by a plain scan (the oracle)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def decoders_refuse_cleanly(data: bytes) -> None:
    for decode in (_codec.decode, decode_loose):
        try:
            decode(data)
        except DecodeError as exc:
            assert exc.problem in ("undecodable", "invalid") and str(exc)


def nesting_agrees(data: bytes) -> None:
    # Well-formed JSON has one right answer; on the rest the measure may only over-count (a
    # decoder fails there anyway, but must not recurse deeper than the limit first).
    exceeds = nesting_exceeds(data, MAX_DEPTH)
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        assert exceeds or reference_depth(data) <= MAX_DEPTH
        return
    assert exceeds == (reference_depth(data) > MAX_DEPTH)


def batch_keeps_every_record(datas: list[bytes]) -> None:
    records = [LogRecord(i + 1, T0 + i, b"default.inbox.fuzz.tester", d) for i, d in enumerate(datas)]
    batch = build_batch(records)
    assert batch.size == len(datas) == batch.table.num_rows
    errors = batch.table.column("error").to_pylist()
    for data, error in zip(datas, errors):
        try:
            decode_loose(data)
            refused = False
        except DecodeError:
            refused = True
        assert (error is not None) == refused, (data[:80], error)


def run(check: Callable[..., None], strategy: st.SearchStrategy[Any], profile: settings) -> None:
    profile(given(strategy)(check))()


@pytest.mark.parametrize("check,strategy", [
    (decoders_refuse_cleanly, hostile_bytes),
    (nesting_agrees, hostile_bytes),
    (batch_keeps_every_record, st.lists(hostile_bytes, min_size=1, max_size=20)),
], ids=["decoders", "nesting", "batch"])
def test_decode_paths_survive_hostile_bytes(check: Callable[..., None], strategy: st.SearchStrategy[Any]) -> None:
    """The decoders raise only DecodeError, the nesting measure is exact on JSON, and a batch
    keeps every record with an error exactly where decode_loose refuses (bounded examples)."""
    run(check, strategy, CI)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("check,strategy", [
    (decoders_refuse_cleanly, hostile_bytes),
    (nesting_agrees, hostile_bytes),
    (batch_keeps_every_record, st.lists(hostile_bytes, min_size=1, max_size=50)),
], ids=["decoders", "nesting", "batch"])
def test_decode_paths_survive_hostile_bytes_long(check: Callable[..., None], strategy: st.SearchStrategy[Any]) -> None:
    """The same properties over many more examples."""
    run(check, strategy, SOAK)


def fold_into(store: Store) -> Callable[[list[bytes]], None]:
    seq = [0]

    def fold(datas: list[bytes]) -> None:
        first = seq[0] + 1
        records = [LogRecord(first + i, T0 + first + i, b"default.inbox.fuzz.tester", d) for i, d in enumerate(datas)]
        seq[0] += len(datas)
        applied = store.apply(build_batch(records, after_seq=first - 1))
        assert applied.last_seq == seq[0]

    return fold


@pytest.mark.parametrize("examples", [
    pytest.param(60, id="ci"),
    pytest.param(2_000, id="soak", marks=[pytest.mark.soak, pytest.mark.timeout(1800)]),
])
def test_a_real_store_folds_hostile_batches(tmp_path: Path, examples: int) -> None:
    """Every view folds batches of hostile records into a real DuckDB file without raising,
    and every record gets its events row."""
    store = Store(tmp_path / "views.duckdb", stream="CONTINUUM_DEFAULT")
    store.open()
    try:
        fold = fold_into(store)
        settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
            given(st.lists(hostile_bytes, min_size=1, max_size=10))(fold)
        )()
        (count,) = store.con.execute("select count(*) from events").fetchone()  # type: ignore[misc]
        assert count == store.applied_seq > 0
    finally:
        store.close()
