"""A bench section that takes 0.3 s and measures nothing (for the progress line's test)."""

from __future__ import annotations

import asyncio
from typing import Any


async def run(env: Any) -> dict[str, float]:
    await asyncio.sleep(0.3)
    return {"slow_section_s": 0.3}
