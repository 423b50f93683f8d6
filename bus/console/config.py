"""ConsoleConfig: where the console listens and what it may do."""

from __future__ import annotations

import msgspec

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
DEFAULT_UI_PORT = 4280


class ConsoleConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Typed and frozen; built by `bus ui` (or `bus up`) from its options.

    `operator`: retry dead letters and stop agents from the page (needs the admin credential;
    else read-only). The feed keeps `recent` envelopes for a page that opens; it reads the
    newest of the log every `push_interval_s` while a page is open (`idle_interval_s` while none
    is). More than `max_read` envelopes (`max_read_bytes`) stored since the last read, or more
    than `flood_per_s` envelopes (`flood_bytes_per_s` bytes) a second, is a flood: it reads the
    newest `max_push` (of large records, only as many as fit `push_bytes`) and counts the rest, every
    `flooded_interval_s` while that lasts. It pushes to each page at most `max_push` envelopes
    per read, decoding at most `push_bytes` of them (the rest are counted as skipped), and holds at most `page_queue` pushes for a page
    that reads slowly (older ones are dropped, and counted)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_UI_PORT
    operator: bool = False
    operator_name: str = "console"
    recent: int = 500
    push_interval_s: float = 0.15
    idle_interval_s: float = 1.0
    flooded_interval_s: float = 1.0
    max_read: int = 2_000
    flood_per_s: int = 5_000
    max_read_bytes: int = 1024 * 1024
    flood_bytes_per_s: int = 2 * 1024 * 1024
    max_push: int = 50
    push_bytes: int = 256 * 1024
    pending_limit: int = 5_000
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
