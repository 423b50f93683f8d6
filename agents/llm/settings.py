"""How to reach Claude: kept apart from the adapter so choosing a model does not import the SDK."""

from __future__ import annotations

from typing import Literal

import msgspec

DEFAULT_BASE_URL = "https://api.anthropic.com"


class AnthropicSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach Claude. Read the key from the environment in the entry point, not here."""

    api_key: str
    base_url: str = DEFAULT_BASE_URL
    # SDK-level retries per call; the bus's redeliveries multiply them (see module docstring).
    max_retries: int = 2
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    cache_ttl: Literal["5m", "1h"] = "5m"
