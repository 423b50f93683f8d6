"""The cost table: USD per million tokens by model, cache-aware, None for unpriced models."""

from __future__ import annotations

import pytest

from agents.llm import PRICES, Price, cost_usd
from schemas.payloads.llm import Usage


def test_cost_counts_input_output_cache_writes_and_reads() -> None:
    """Each kind of token is priced at its own rate; 1-hour cache writes cost more than 5-minute."""
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_creation_input_tokens=1_000_000,
                  cache_read_input_tokens=1_000_000)
    # Opus 4.5: $5 in, $25 out, $6.25 5-minute writes, $0.50 reads.
    assert cost_usd("claude-opus-4-5", usage) == pytest.approx(5 + 25 + 6.25 + 0.5)
    one_hour = Usage(input_tokens=0, output_tokens=0, cache_creation_input_tokens=1_000_000,
                     cache_creation_1h_input_tokens=1_000_000)
    assert cost_usd("claude-opus-4-5", one_hour) == pytest.approx(10.0)


def test_unknown_model_is_unpriced_not_free() -> None:
    """A model missing from the table costs None; the offline model costs exactly 0."""
    usage = Usage(input_tokens=10, output_tokens=10)
    assert cost_usd("claude-unknown-9", usage) is None
    assert cost_usd("offline", usage) == 0.0


def test_a_custom_table_overrides_the_default() -> None:
    """Prices are data: a caller's table replaces the built-in one."""
    table = {"m": Price(input=1.0, output=2.0, cache_write_5m=0.0, cache_write_1h=0.0, cache_read=0.0)}
    assert cost_usd("m", Usage(input_tokens=500_000, output_tokens=500_000), table) == pytest.approx(1.5)
    assert all(p.output >= p.input >= p.cache_read for p in PRICES.values())
