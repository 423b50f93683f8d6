"""Where a raw connection goes and how it authenticates, from the bus's NATS URL(s).

    nats://host:4222                 plain, no auth
    nats://user:password@host:4222   user/password
    nats://token@host:4222           token (a user name without a password, as nats-py reads it)
    tls://host:4222                  TLS (also used when the server's INFO requires it)

A comma-separated list gives several servers, tried in order. Credentials are read as they are
written (not percent-decoded), like nats-py does, so both connections present the same ones.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

import msgspec

from bus.errors import ConfigurationError

DEFAULT_PORT = 4222


class ServerAddress(msgspec.Struct, frozen=True, kw_only=True):
    """One server and the credentials to present to it."""

    host: str
    port: int = DEFAULT_PORT
    tls: bool = False
    user: str | None = None
    password: str | None = None
    token: str | None = None

    @property
    def scheme(self) -> str:
        return "tls" if self.tls else "nats"

    @property
    def netloc(self) -> str:
        """host:port, for messages (never the credentials)."""
        return f"{self.host}:{self.port}"

    def connect_options(self) -> dict[str, Any]:
        """The auth fields of a CONNECT frame."""
        if self.user is not None:
            return {"user": self.user, "pass": self.password or ""}
        if self.token is not None:
            return {"auth_token": self.token}
        return {}


def parse_url(url: str) -> ServerAddress:
    """One `nats://` or `tls://` URL (scheme optional). Raises ConfigurationError otherwise."""
    text = url.strip()
    parsed = urllib.parse.urlsplit(text if "://" in text else f"nats://{text}")
    if parsed.scheme not in ("nats", "tls"):
        raise ConfigurationError(f"unsupported NATS URL scheme in {parsed.scheme}://...: use nats:// or tls://")
    try:
        port = parsed.port or DEFAULT_PORT
    except ValueError as exc:
        raise ConfigurationError(f"invalid port in NATS URL {parsed.hostname}: {exc}") from exc
    if not parsed.hostname:
        raise ConfigurationError(f"no host in NATS URL {text.split('@')[-1]!r}")
    user, password = parsed.username, parsed.password
    token = None
    if user is not None and password is None:
        user, token = None, user
    return ServerAddress(host=parsed.hostname, port=port, tls=parsed.scheme == "tls",
                         user=user, password=password, token=token)


def parse_urls(urls: str | Iterable[str]) -> list[ServerAddress]:
    """Every server of a comma-separated URL string (or of several strings), in order, without
    repeats. Raises ConfigurationError for an empty list or an unusable URL."""
    parts = urls.split(",") if isinstance(urls, str) else [p for u in urls for p in u.split(",")]
    out: list[ServerAddress] = []
    for part in parts:
        if part.strip():
            address = parse_url(part)
            if address not in out:
                out.append(address)
    if not out:
        raise ConfigurationError("no NATS server URL given")
    return out


def with_credentials(address: ServerAddress, fallback: ServerAddress | None) -> ServerAddress:
    """`address` with `fallback`'s credentials when it has none of its own (a server learned
    from the cluster carries no credentials in its URL)."""
    if fallback is None or address.user is not None or address.token is not None:
        return address
    return msgspec.structs.replace(address, user=fallback.user, password=fallback.password, token=fallback.token)
