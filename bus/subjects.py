"""Subject and stream names: who and what, in the subject, so the server can route and filter.

    <ns>.inbox.<to>.<from>      a message to one named agent
    <ns>.group.<tag>.<from>     a broadcast to every agent carrying <tag>
    <ns>.event.<agent>.<kind>   facts an agent records (kind may contain dots)
    <ns>.reply.<to>.<req-id>.<from>  the reply to request <req-id>, addressed to <to>, from <from>
    <ns>.dead.<agent>           dead letters of <agent>'s consumers

All of `<ns>.>` is one stream, the log. The query service lives outside it (queries are reads,
not events).
"""

from __future__ import annotations

from bus.config import check_name


class Subjects:
    """Names for one namespace. Agent names and tags are validated as single subject tokens."""

    def __init__(self, namespace: str) -> None:
        self.ns = check_name(namespace, "namespace")
        upper = namespace.upper().replace("-", "_")
        self.stream = f"CONTINUUM_{upper}"
        self.advisory_stream = f"CONTINUUM_{upper}_ADVISORIES"
        self.all = f"{namespace}.>"
        self.query = f"_continuum.{namespace}.query"
        # The key store of private records (bus.privacy): a NATS KV bucket and its stream.
        self.keys_bucket = f"CONTINUUM_KEYS_{upper}"
        self.keys_stream = f"KV_{self.keys_bucket}"
        # The archive's second target (projections.archive.copies): a NATS Object Store bucket.
        self.archive_bucket = f"CONTINUUM_ARCHIVE_{upper}"

    def key_subject(self, key: str) -> str:
        """The KV subject of one key of the key store (`key` e.g. `agent.alice`)."""
        return f"$KV.{self.keys_bucket}.{key}"

    def key_get(self, key: str) -> str:
        """The direct-get API subject reading one key (the only form an agent is granted)."""
        return f"$JS.API.DIRECT.GET.{self.keys_stream}.{self.key_subject(key)}"

    def inbox(self, to: str, sender: str) -> str:
        return f"{self.ns}.inbox.{check_name(to, 'agent name')}.{check_name(sender, 'sender name')}"

    def inbox_filter(self, to: str) -> str:
        return f"{self.ns}.inbox.{check_name(to, 'agent name')}.*"

    def group(self, tag: str, sender: str) -> str:
        return f"{self.ns}.group.{check_name(tag, 'tag')}.{check_name(sender, 'sender name')}"

    def group_filter(self, tag: str) -> str:
        return f"{self.ns}.group.{check_name(tag, 'tag')}.*"

    def event(self, agent: str, kind: str) -> str:
        return f"{self.ns}.event.{check_name(agent, 'agent name')}.{kind}"

    def event_filter(self, agent: str) -> str:
        return f"{self.ns}.event.{check_name(agent, 'agent name')}.>"

    def reply(self, to: str, request_id: str, responder: str) -> str:
        """The reply to `request_id` from `responder`: its last token names who answers, so the
        server's permissions vouch for it, as for an inbox subject's sender, and a requester
        listens to the one it asked only."""
        return (f"{self.ns}.reply.{check_name(to, 'requester name')}.{request_id}."
                f"{check_name(responder, 'responder name')}")

    def dead(self, agent: str) -> str:
        return f"{self.ns}.dead.{check_name(agent, 'agent name')}"

    def control(self, agent: str) -> str:
        """Where an agent's supervisor listens for an operator's requests (bus.agent_control):
        not in the log (core NATS), so nothing is stored but the event recording the request."""
        return f"_continuum.{self.ns}.control.{check_name(agent, 'agent name')}"

    def inbox_consumer(self, agent: str) -> str:
        """Durable consumer of an agent's inbox (replicas of one name share it)."""
        return f"{check_name(agent, 'agent name')}__inbox"

    def group_consumer(self, agent: str) -> str:
        """Durable consumer of the broadcasts to an agent's tags."""
        return f"{check_name(agent, 'agent name')}__groups"

    def max_deliveries_advisory(self, consumer: str = "*") -> str:
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{consumer}"

    def kind_of_subject(self, subject: str) -> str:
        """'inbox', 'group', 'event', 'reply', 'dead' or 'other' for a subject in this namespace."""
        parts = subject.split(".", 2)
        if len(parts) >= 2 and parts[0] == self.ns and parts[1] in _CLASSES:
            return parts[1]
        return "other"


_CLASSES = frozenset({"inbox", "group", "event", "reply", "dead"})
