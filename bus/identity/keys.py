"""nkey credentials: an Ed25519 user seed in a file, and the signature the server asks for.

A credential file is the seed on one line (`SU...`), optionally after comment lines starting with
`#`: what `nats --nkey FILE` and every NATS client library's nkey option read. The server holds
only the public key (`U...`), so its config is no secret.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import msgspec
import nkeys

from bus.errors import ConfigurationError


class Credential(msgspec.Struct, frozen=True, kw_only=True):
    """A loaded user seed. `repr` never shows the seed."""

    seed: str
    public_key: str
    path: str = ""

    def __repr__(self) -> str:
        return f"Credential(public_key={self.public_key!r}, path={self.path!r})"

    def sign(self, nonce: str | bytes) -> str:
        """The CONNECT `sig` for the server's `nonce`: raw-URL base64 of the Ed25519 signature."""
        data = nonce.encode() if isinstance(nonce, str) else nonce
        signature = nkeys.from_seed(bytearray(self.seed.encode())).sign(data)
        return base64.urlsafe_b64encode(signature).decode().rstrip("=")


def new_user_seed() -> str:
    """A fresh random user seed (`SU...`)."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()


def public_key_of(seed: str) -> str:
    """The public key (`U...`) of a user seed. Raises ConfigurationError for a malformed seed."""
    try:
        keys = nkeys.from_seed(bytearray(seed.encode()))
        public = keys.public_key.decode()
    except (nkeys.NkeysError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"not a usable nkey seed: {type(exc).__name__}") from None
    if not public.startswith("U"):
        raise ConfigurationError("the nkey seed is not a user seed (it must start with SU)")
    return public


def parse_credential(text: str, *, path: str = "") -> Credential:
    """The credential in a file's `text`. Raises ConfigurationError naming `path` (never the seed)."""
    lines = [line.strip() for line in text.splitlines()]
    seeds = [line for line in lines if line.startswith("SU")]
    where = path or "the credential"
    if len(seeds) != 1:
        raise ConfigurationError(f"{where} holds no user nkey seed (a line starting with SU)")
    try:
        public = public_key_of(seeds[0])
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    return Credential(seed=seeds[0], public_key=public, path=path)


def load_credential(path: str | Path) -> Credential:
    """Read a credential file. Raises ConfigurationError when it is missing, unreadable or malformed."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the credential file {file}: {exc.strerror or exc}") from None
    return parse_credential(text, path=str(file))


def write_secret(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only (0600 from creation: never briefly
    world-readable), replacing any older file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
