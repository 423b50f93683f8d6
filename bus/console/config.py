"""ConsoleConfig: where the console listens and what it may do."""

from __future__ import annotations

import msgspec

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
DEFAULT_UI_PORT = 4280


class ConsoleConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Typed and frozen; built by `bus ui` (or `bus up`) from its options.

    `operator`: retry dead letters from the page (needs the admin credential; else read-only).
    The feed keeps `recent` envelopes for a page that opens, pushes to each page at most every
    `push_interval_s` and at most `max_push` envelopes per push (the rest are counted as
    skipped), and holds at most `page_queue` pushes for a page that reads slowly (older ones are
    dropped, and counted). The feed's log reader is pushed at most `follow_rate_bps` (bits per
    second: ~16 Mbit/s is 4,000-5,000 envelopes of 400-500 bytes); when it is more than
    `max_behind_s` behind, it jumps to the newest envelopes and counts the rest, and pushes
    every `flooded_push_interval_s` while it does."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_UI_PORT
    operator: bool = False
    operator_name: str = "console"
    recent: int = 500
    push_interval_s: float = 0.05
    flooded_push_interval_s: float = 0.5
    max_push: int = 200
    pending_limit: int = 5_000
    follow_rate_bps: int = 16_000_000
    max_behind_s: float = 0.5
    page_queue: int = 16
    max_pages: int = 32
    history_s: int = 120
    health_interval_s: float = 2.0
    keepalive_s: float = 15.0
    query_timeout_s: float = 10.0

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach the console."""
        return self.host in LOOPBACK_HOSTS
