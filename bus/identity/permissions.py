"""What each kind of identity may publish and subscribe to, as nats-server permissions.

    admin     everything: the CLI, the operator, the test harness
    service   the projection service: reads the log and serves queries; cannot write the log,
              change or delete a stream, or read anyone's private inbox replies
    agent     only itself: sends as itself, records its own events, consumes its own consumers
    console   the console (`bus ui`): reads only: queries everything, follows the log; cannot
              publish an envelope, record, retry a dead letter, or change a stream or a consumer

An agent's grant (namespace `ns`, log stream `S`, advisory stream `A`, name `me`):

    publish    ns.inbox.*.me  ns.group.*.me  ns.event.me.>  ns.dead.me  ns.reply.*.*.me
               _continuum.ns.query.me                      queries, answered in its own scope
               $JS.API.INFO  $JS.API.STREAM.INFO.{S,A}     read the streams' state
               $JS.API.CONSUMER.INFO|MSG.NEXT.S.me__inbox|me__groups, A.me__deadletters
               $JS.API.CONSUMER.CREATE.S.me__inbox.ns.inbox.me.*      (its inbox, that filter only)
               $JS.API.CONSUMER.CREATE.S.me__groups.ns.group.<tag>.*  (one tag; several: the issuer)
               $JS.ACK.S.me__inbox.> ... (acks of its own deliveries)
               $JS.API.DIRECT.GET.S[.>]                    its runtime's reads of the log
               $KV.K.agent.me                              make its key of private records (bus.privacy)
               $JS.API.DIRECT.GET.KV_K.$KV.K.agent.me      read that key, and no other
    subscribe  _INBOX.<its public key>.>  ns.reply.me.>
               _continuum.ns.control.me                    an operator's stop request to its
                                                           supervisor (answered: allow_responses)

A direct get by sequence names no subject, so the log's grant cannot keep an agent from reading
another agent's records by sequence: those it must not read are sealed under that agent's key
(bus.privacy), which its grant does not reach (no `$JS.API.DIRECT.GET.KV_K` by sequence, no
other key's subject, no stream info or consumer on the key store).

No stream purge/delete/update, and consumer creation only in the form whose filter rides in the
API subject (the server checks the body against it), so an agent can never widen what it reads.
A consumer with several filters (the broadcasts of several tags, the dead-letter watcher) can
only be made by the issuer (`bus agent start`, `bus creds issue`, with the admin credential).
A reply (`ns.reply.<requester>.<request id>.<responder>`) names its responder in its last token,
as an inbox subject names its sender: an agent answers only as itself, and a requester listens
only on the subject naming the agent it asked (and checks the envelope's `sender` says the same),
so no one else's answer can reach it. Who was asked is not known to the server, so an agent may
still publish a reply, in its own name, to a request it never received: nobody listens to it.

The console's grant (namespace `ns`, log `S`, advisories `A`, for each namespace served):

    publish    _continuum.ns.query                         queries, unscoped: it shows every agent
               $JS.API.INFO  $JS.API.STREAM.INFO.{S,A}     the streams' state
               $JS.API.CONSUMER.LIST|NAMES.S  $JS.API.CONSUMER.INFO.S.*   backlogs per agent
               $JS.API.DIRECT.GET.S[.>]                    the newest envelopes (its live feed),
                                                           dead letters, a replay's reads
               $JS.API.DIRECT.GET.KV_K.$KV.K.>             every agent's key of private records (read only)
    subscribe  _INBOX.<its public key>.>

No envelope or event subject, no `$JS.ACK`, no stream change, and no consumer made or deleted
(so none of an agent's replaced): it reads the log by direct gets. Retrying a dead letter or
stopping an agent publishes, so an operator console connects with the admin credential instead.
"""

from __future__ import annotations

import enum

import msgspec

from bus.privacy.sealing import key_id
from bus.subjects import Subjects


class Role(str, enum.Enum):
    ADMIN = "admin"
    SERVICE = "service"
    AGENT = "agent"
    CONSOLE = "console"


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """nats-server permissions: allow lists (empty: nothing) and deny lists on top."""

    publish_allow: tuple[str, ...] = ()
    publish_deny: tuple[str, ...] = ()
    subscribe_allow: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()
    # Publish to the reply subject of a request this identity received (core request/reply).
    allow_responses: bool = False
    unrestricted: bool = False

    def may_publish(self, subject: str) -> bool:
        """Whether the server lets this grant publish to `subject` (literal subject)."""
        if self.unrestricted:
            return True
        return any(matches(p, subject) for p in self.publish_allow) and not any(
            matches(p, subject) for p in self.publish_deny
        )

    def may_subscribe(self, subject: str) -> bool:
        if self.unrestricted:
            return True
        return any(matches(p, subject) for p in self.subscribe_allow) and not any(
            matches(p, subject) for p in self.subscribe_deny
        )


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a trailing `>` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


def inbox_prefix(public_key: str) -> str:
    """The subjects a credential's request inboxes live under: only its holder may subscribe
    there. Named by the key, not the name: a client acting under another name (the CLI's
    `--from`) still has its inboxes, and is refused only what it may not do."""
    return f"_INBOX.{public_key}"


# Stream-changing JetStream API calls no service or agent may make.
_STREAM_CHANGES = (
    "$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>", "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>", "$JS.API.STREAM.RESTORE.>",
    "$JS.API.STREAM.SNAPSHOT.>", "$JS.API.STREAM.PEER.>", "$JS.API.STREAM.LEADER.>",
    "$JS.API.ACCOUNT.>", "$JS.API.META.>", "$JS.API.SERVER.>",
)


def admin_grant() -> Grant:
    return Grant(unrestricted=True)


def service_grant(namespaces: tuple[str, ...], public_key: str) -> Grant:
    """The projection service: reads streams (direct gets, its own consumers), serves queries
    and status on `_continuum.<ns>.>`, answers on the requester's reply subject."""
    return Grant(
        publish_allow=("$JS.API.>", "$JS.ACK.>", *(f"_continuum.{ns}.>" for ns in namespaces)),
        publish_deny=_STREAM_CHANGES,
        subscribe_allow=(f"{inbox_prefix(public_key)}.>", *(f"_continuum.{ns}.>" for ns in namespaces)),
        allow_responses=True,
    )


def console_grant(namespaces: tuple[str, ...], public_key: str) -> Grant:
    """The console: reads only (see the module docstring)."""
    allow: list[str] = ["$JS.API.INFO"]
    for ns in namespaces:
        subjects = Subjects(ns)
        log, advisories = subjects.stream, subjects.advisory_stream
        allow += [
            subjects.query,
            f"$JS.API.STREAM.INFO.{log}", f"$JS.API.STREAM.INFO.{advisories}",
            f"$JS.API.CONSUMER.LIST.{log}", f"$JS.API.CONSUMER.NAMES.{log}", f"$JS.API.CONSUMER.INFO.{log}.*",
            f"$JS.API.DIRECT.GET.{log}", f"$JS.API.DIRECT.GET.{log}.>",
            # Every key of private records, by key (it shows every agent as the admin sees them,
            # and replays their handlings); never by sequence, and no key made or erased.
            f"$JS.API.DIRECT.GET.{subjects.keys_stream}.{subjects.key_subject('>')}",
        ]
    return Grant(publish_allow=tuple(allow), subscribe_allow=(f"{inbox_prefix(public_key)}.>",))


def agent_grant(namespace: str, name: str, public_key: str, tags: tuple[str, ...] = ()) -> Grant:
    """An agent: only itself (see the module docstring)."""
    subjects = Subjects(namespace)
    ns, log, advisories = subjects.ns, subjects.stream, subjects.advisory_stream
    inbox, groups = subjects.inbox_consumer(name), subjects.group_consumer(name)
    deadletters = f"{name}__deadletters"
    consumers = ((log, inbox), (log, groups), (advisories, deadletters))
    return Grant(
        publish_allow=(
            f"{ns}.inbox.*.{name}", f"{ns}.group.*.{name}", f"{ns}.event.{name}.>", f"{ns}.dead.{name}",
            f"{ns}.reply.*.*.{name}",
            f"{subjects.query}.{name}",  # queries in its own scope only (projections.scopes)
            "$JS.API.INFO", f"$JS.API.STREAM.INFO.{log}", f"$JS.API.STREAM.INFO.{advisories}",
            *(f"$JS.API.CONSUMER.INFO.{s}.{c}" for s, c in consumers),
            *(f"$JS.API.CONSUMER.MSG.NEXT.{s}.{c}" for s, c in consumers),
            *(f"$JS.ACK.{s}.{c}.>" for s, c in consumers),
            f"$JS.API.CONSUMER.CREATE.{log}.{inbox}.{subjects.inbox_filter(name)}",
            *(f"$JS.API.CONSUMER.CREATE.{log}.{groups}.{subjects.group_filter(tag)}" for tag in tags),
            f"$JS.API.DIRECT.GET.{log}", f"$JS.API.DIRECT.GET.{log}.>",
            subjects.key_subject(key_id(name)), subjects.key_get(key_id(name)),
        ),
        subscribe_allow=(f"{inbox_prefix(public_key)}.>", f"{ns}.reply.{name}.>", subjects.control(name)),
        allow_responses=True,  # its supervisor answers an operator's stop request (bus.agent_control)
    )


def render(grant: Grant) -> str:
    """The `permissions` block of a nats-server user entry ("" when unrestricted)."""
    if grant.unrestricted:
        return ""

    def block(allow: tuple[str, ...], deny: tuple[str, ...]) -> str:
        parts = [f"allow: {_list(allow)}"]
        if deny:
            parts.append(f"deny: {_list(deny)}")
        return "{" + ", ".join(parts) + "}"

    fields = [
        f"publish: {block(grant.publish_allow, grant.publish_deny)}",
        f"subscribe: {block(grant.subscribe_allow, grant.subscribe_deny)}",
    ]
    if grant.allow_responses:
        fields.append("allow_responses: true")
    return "permissions: {" + ", ".join(fields) + "}"


def _list(subjects: tuple[str, ...]) -> str:
    return "[" + ", ".join(msgspec.json.encode(s).decode() for s in subjects) + "]"
