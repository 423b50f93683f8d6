"""Schema evolution as a tested contract: committed golden envelopes must decode forever.

tests/golden/<kind>.json holds one encoded envelope per payload kind, written once by
tests/golden/make_samples.py and never edited. This module only reads those files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import Codec, PayloadRegistry, decode_loose
from schemas.registry import kind_of_raw

GOLDEN = Path(__file__).resolve().parent / "golden"
SAMPLES = sorted(GOLDEN.glob("*.json"))


def _raw_kind(path: Path) -> str | None:
    return kind_of_raw(decode_loose(path.read_bytes()).payload)


def test_golden_samples_exist() -> None:
    """The golden directory is not empty (a glob that finds nothing must not pass silently)."""
    assert SAMPLES, f"no golden samples in {GOLDEN}"


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_golden_sample_decodes_with_todays_codec(path: Path) -> None:
    """Every committed sample decodes, typed, with today's registry, and says the kind its file
    is named after (an upcast sample decodes to a newer registered kind)."""
    registry = PayloadRegistry.with_builtins()
    envelope = Codec(registry).decode(path.read_bytes())
    written_kind = _raw_kind(path)
    assert written_kind is not None and path.name.startswith(f"{written_kind}."), (
        f"{path.name} carries kind {written_kind!r}; name a sample <kind>.json"
    )
    assert envelope.kind in registry.kinds()
    assert Codec(registry).decode(Codec(registry).encode(envelope)) == envelope


def test_every_registered_kind_has_a_golden_sample() -> None:
    """A payload kind added without a golden sample fails here, so its first wire form is kept."""
    covered = {_raw_kind(path) for path in SAMPLES}
    missing = sorted(set(PayloadRegistry.with_builtins().kinds()) - covered)
    assert not missing, (
        f"no golden sample for {missing}: run `.venv/bin/python tests/golden/make_samples.py` "
        "and commit the new files in tests/golden/ (never edit existing ones)"
    )
