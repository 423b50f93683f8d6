"""The credentials issued for one bus home, and the server authorization config made from them.

    registry = CredentialRegistry(home)
    issued = registry.issue("planner", Role.AGENT, namespace="default", tags=("research",))
    registry.revoke("planner", namespace="default")
    registry.identities()                     # public facts only: name, role, key, when

Layout under `<home>/auth/` (0700):

    identities.json     every identity issued: name, role, namespace, tags, public key, dates
    auth.conf           the server's `authorization { users = [...] }`, rendered from it
    nats-server.conf    the server config: the repository's nats.conf, then `include auth.conf`
    creds/...           the seeds (0600): admin.nk, service-<name>.nk, console.nk,
                        agents/<ns>/<name>.nk

Seeds never leave these files: not in identities.json, not in a log line, not in an error.
Every change takes an exclusive lock on `auth/lock`, so a CLI and a supervisor issuing at the
same moment cannot lose each other's entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from bus.config import check_name
from bus.errors import ConfigurationError
from bus.identity.certificates import ServerTls
from bus.identity.keys import Credential, load_credential, new_user_seed, public_key_of, write_secret
from bus.identity.permissions import Grant, Role, admin_grant, agent_grant, console_grant, render, service_grant

ADMIN = "admin"
CONSOLE = "console"


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """One issued credential, without its secret."""

    name: str
    role: Role
    namespace: str = ""  # agents: the namespace they act in ("" for admin, services, console)
    tags: tuple[str, ...] = ()
    public_key: str
    issued_at: float
    revoked_at: float | None = None

    @property
    def key(self) -> str:
        return identity_key(self.role, self.name, self.namespace)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class _Registry(msgspec.Struct, kw_only=True):
    identities: list[Identity] = []
    # Namespaces the services serve (their grants name them).
    namespaces: list[str] = []


class Issued(msgspec.Struct, frozen=True, kw_only=True):
    identity: Identity
    path: Path
    created: bool  # False: an existing, still valid credential was returned


def identity_key(role: Role, name: str, namespace: str) -> str:
    return f"{role.value}:{namespace}:{name}"


class CredentialRegistry:
    """Issue, list and revoke credentials under `<home>/auth`. Synchronous file work (small
    files, a lock held for milliseconds): call it from a thread in async code."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home).resolve()
        self.dir = self.home / "auth"

    # -- paths -----------------------------------------------------------------------------

    @property
    def server_config(self) -> Path:
        return self.dir / "nats-server.conf"

    @property
    def auth_config(self) -> Path:
        return self.dir / "auth.conf"

    def credential_path(self, role: Role, name: str, namespace: str = "") -> Path:
        creds = self.dir / "creds"
        if role is Role.ADMIN:
            return creds / f"{name}.nk"
        if role is Role.SERVICE:
            return creds / f"service-{name}.nk"
        if role is Role.CONSOLE:
            return creds / f"{name}.nk"
        return creds / "agents" / namespace / f"{name}.nk"

    @property
    def admin_credential(self) -> Path:
        return self.credential_path(Role.ADMIN, ADMIN)

    @property
    def console_credential(self) -> Path:
        """The read-only credential `bus up` gives the console it starts."""
        return self.credential_path(Role.CONSOLE, CONSOLE)

    def exists(self) -> bool:
        """Whether this home has an authorization setup (`bus up` made one)."""
        return (self.dir / "identities.json").is_file()

    # -- changes ---------------------------------------------------------------------------

    def initialize(self, base_config: Path, namespaces: tuple[str, ...], *, tls: ServerTls | None = None) -> None:
        """Make sure the admin, projection-service and console credentials exist, the services serve
        `namespaces`, and the server config (from `base_config`, the nats.conf to build on, with
        `tls` served when given) and auth.conf are written. Idempotent."""
        with self._locked() as registry:
            for ns in namespaces:
                check_name(ns, "namespace")
                if ns not in registry.namespaces:
                    registry.namespaces.append(ns)
            self._issue_locked(registry, ADMIN, Role.ADMIN, "", ())
            self._issue_locked(registry, "projections", Role.SERVICE, "", ())
            self._issue_locked(registry, CONSOLE, Role.CONSOLE, "", ())
            self._save(registry)
        text = base_config.read_text().rstrip() + "\n"
        if tls is not None:
            text += "\n# Every client connection is TLS, verified against the local CA (bus.identity.certificates).\n" + tls.config_block
        text += "\n# Who may connect, and what each may do (rendered by bus.identity).\ninclude \"auth.conf\"\n"
        self._write_plain(self.server_config, text)

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    def issue(
        self, name: str, role: Role = Role.AGENT, *, namespace: str = "", tags: tuple[str, ...] = (),
        rotate: bool = False,
    ) -> Issued:
        """The credential for `name`: the existing one (tags updated), or a new one (`rotate`, or
        none yet). Raises ConfigurationError for a bad name, or before `initialize`."""
        check_name(name, "agent name" if role is Role.AGENT else "name")
        if role is Role.AGENT:
            check_name(namespace, "namespace")
        for tag in tags:
            check_name(tag, "tag")
        with self._locked() as registry:
            issued = self._issue_locked(registry, name, role, namespace, tuple(tags), rotate=rotate)
            self._save(registry)
        return issued

    def revoke(self, name: str, role: Role = Role.AGENT, *, namespace: str = "") -> Identity:
        """Revoke `name`'s credential: its seed file is deleted and auth.conf rewritten (the
        servers must reload). Raises ConfigurationError when there is no such active identity."""
        key = identity_key(role, name, namespace)
        with self._locked() as registry:
            for i, identity in enumerate(registry.identities):
                if identity.key == key and identity.active:
                    revoked = msgspec.structs.replace(identity, revoked_at=time.time())
                    registry.identities[i] = revoked
                    self.credential_path(role, name, namespace).unlink(missing_ok=True)
                    self._save(registry)
                    return revoked
        where = f" in namespace {namespace!r}" if namespace else ""
        raise ConfigurationError(f"no active credential for {role.value} {name!r}{where} (see `bus creds list`)")

    # -- reading ---------------------------------------------------------------------------

    def identities(self) -> list[Identity]:
        """Every identity ever issued (revoked ones too), oldest first."""
        return list(self._read().identities)

    def active(self, name: str, role: Role = Role.AGENT, *, namespace: str = "") -> Identity | None:
        key = identity_key(role, name, namespace)
        return next((i for i in self._read().identities if i.key == key and i.active), None)

    def load(self, name: str, role: Role = Role.AGENT, *, namespace: str = "") -> Credential:
        """The seed of an active identity. Raises ConfigurationError when there is none."""
        if self.active(name, role, namespace=namespace) is None:
            raise ConfigurationError(f"no active credential for {role.value} {name!r}")
        return load_credential(self.credential_path(role, name, namespace))

    # -- internals -------------------------------------------------------------------------

    def _issue_locked(
        self, registry: _Registry, name: str, role: Role, namespace: str, tags: tuple[str, ...],
        *, rotate: bool = False,
    ) -> Issued:
        key = identity_key(role, name, namespace)
        path = self.credential_path(role, name, namespace)
        for i, identity in enumerate(registry.identities):
            if identity.key != key or not identity.active:
                continue
            if not rotate and path.is_file() and _public_key_in(path) == identity.public_key:
                if tags and tuple(tags) != identity.tags:
                    identity = msgspec.structs.replace(identity, tags=tags)
                    registry.identities[i] = identity
                return Issued(identity=identity, path=path, created=False)
            registry.identities[i] = msgspec.structs.replace(identity, revoked_at=time.time())
        seed = new_user_seed()
        identity = Identity(
            name=name, role=role, namespace=namespace, tags=tags, public_key=public_key_of(seed),
            issued_at=time.time(),
        )
        what = f"{role.value} {name!r}" + (f" (namespace {namespace!r})" if namespace else "")
        write_secret(path, f"# Continuum credential: {what}. Whoever holds this file can act as it.\n{seed}\n")
        registry.identities.append(identity)
        return Issued(identity=identity, path=path, created=True)

    def grant_of(self, identity: Identity, namespaces: list[str]) -> Grant:
        """What `identity` may do."""
        if identity.role is Role.ADMIN:
            return admin_grant()
        if identity.role is Role.SERVICE:
            return service_grant(tuple(namespaces), identity.public_key)
        if identity.role is Role.CONSOLE:
            return console_grant(tuple(namespaces), identity.public_key)
        return agent_grant(identity.namespace, identity.name, identity.public_key, identity.tags)

    def _save(self, registry: _Registry) -> None:
        self._write_plain(self.dir / "identities.json", msgspec.json.format(msgspec.json.encode(registry)).decode())
        users = []
        for identity in registry.identities:
            if not identity.active:
                continue
            permissions = render(self.grant_of(identity, registry.namespaces))
            comment = f"# {identity.role.value} {identity.name}" + (f" ({identity.namespace})" if identity.namespace else "")
            entry = f"nkey: {identity.public_key}" + (f", {permissions}" if permissions else "")
            users.append(f"    {comment}\n    {{{entry}}}")
        self._write_plain(self.auth_config, "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n")

    def _read(self) -> _Registry:
        path = self.dir / "identities.json"
        try:
            return msgspec.json.decode(path.read_bytes(), type=_Registry)
        except FileNotFoundError:
            return _Registry()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConfigurationError(f"the credential registry {path} is unreadable: {exc}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_Registry]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / "lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _write_plain(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _public_key_in(path: Path) -> str | None:
    try:
        return load_credential(path).public_key
    except ConfigurationError:
        return None
