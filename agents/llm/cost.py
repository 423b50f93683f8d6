"""What a call costs: USD per million tokens, by model, for the llm_calls view.

Prices are Anthropic's published list prices (platform.claude.com "Pricing" and the model
overview pages, read 2026-10). They change: the table is data, pass your own to `cost_usd` to
override. A model that is not in the table costs None ("unpriced"), never a guess.

Known simplification: Claude Haiku 5.5 bills prompts over 100k tokens at 5x; only the lower
band is modelled here.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from schemas.payloads.llm import Usage


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """USD per million tokens."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float


def _price(input_: float, output: float, *, cache_read: float | None = None) -> Price:
    # Cache writes are 1.25x (5 min TTL) and 2x (1 h TTL) the input price on every model listed;
    # cache reads are 0.1x unless the model's page says otherwise.
    return Price(
        input=input_,
        output=output,
        cache_write_5m=input_ * 1.25,
        cache_write_1h=input_ * 2.0,
        cache_read=input_ * 0.1 if cache_read is None else cache_read,
    )


PRICES: Mapping[str, Price] = {
    "claude-fable-5-1": _price(10.0, 50.0, cache_read=0.25),
    "claude-mythos-5-1": _price(10.0, 50.0, cache_read=0.25),
    "claude-fable-5": _price(10.0, 50.0),
    "claude-mythos-5": _price(10.0, 50.0),
    # Opus 5.5: input/output from its overview page; cache prices at the standard multipliers.
    "claude-opus-5-5": _price(4.0, 20.0),
    "claude-opus-5": _price(5.0, 25.0),
    "claude-opus-4-8": _price(5.0, 25.0),
    "claude-opus-4-7": _price(5.0, 25.0),
    "claude-opus-4-6": _price(5.0, 25.0),
    "claude-opus-4-5": _price(5.0, 25.0),
    "claude-opus-4-5-20251101": _price(5.0, 25.0),
    # Sonnet 5.5 cache reads were cut to $0.10 on 2026-10-07.
    "claude-sonnet-5-5": _price(2.0, 10.0, cache_read=0.10),
    "claude-sonnet-5": _price(2.0, 10.0),
    "claude-sonnet-4-6": _price(3.0, 15.0),
    "claude-sonnet-4-5": _price(3.0, 15.0),
    "claude-sonnet-4-5-20250929": _price(3.0, 15.0),
    "claude-haiku-5-5": _price(0.10, 0.50),
    "claude-haiku-4-5": _price(1.0, 5.0),
    "claude-haiku-4-5-20251001": _price(1.0, 5.0),
    # The deterministic stand-in costs nothing.
    "offline": Price(input=0.0, output=0.0, cache_write_5m=0.0, cache_write_1h=0.0, cache_read=0.0),
}


def cost_usd(model: str, usage: Usage, prices: Mapping[str, Price] = PRICES) -> float | None:
    """The USD cost of `usage` on `model`, or None when the model has no price in `prices`."""
    price = prices.get(model)
    if price is None:
        return None
    write_1h = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
    write_5m = usage.cache_creation_input_tokens - write_1h
    total = (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + write_5m * price.cache_write_5m
        + write_1h * price.cache_write_1h
        + usage.cache_read_input_tokens * price.cache_read
    )
    return total / 1_000_000
