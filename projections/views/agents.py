"""`agents`: every name seen on the bus (senders, recipients, agents that record events), with
its tags, when it was first and last seen, counts, and its latest lifecycle event.

Tags come from the latest event recorded about the agent that carries a `tags` list (e.g.
`agent.started`). `first_seen` is the first time the name appears at all; `last_seen` the last
time it sent or recorded something (heartbeats included).

Liveness, per replica process (`agent_replicas`) and summed per name (`agents`): the state from
the latest lifecycle event or heartbeat (running, stopping, stopped, crashed, circuit_open), the
last heartbeat and its interval, counters from it, and how often the replica crashed and was
restarted. `alive` is computed when queried: running or stopping, with a heartbeat (or start)
within three heartbeat intervals of now.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "agents"
VERSION = 2

TABLES = """
CREATE TABLE {s}.agents (
    name              VARCHAR PRIMARY KEY,
    tags              VARCHAR[],         -- NULL until an event declares them
    first_seen        TIMESTAMPTZ,
    last_seen         TIMESTAMPTZ,       -- last time it sent or recorded anything
    messages_sent     BIGINT NOT NULL,
    messages_received BIGINT NOT NULL,   -- sent to it by name
    events_recorded   BIGINT NOT NULL,   -- events recorded about it (<ns>.event.<name>.*)
    last_event_kind   VARCHAR,
    lifecycle         VARCHAR,           -- latest agent.started/stopped/crashed/restarted/circuit_opened
    lifecycle_at      TIMESTAMPTZ
);
CREATE TABLE {s}.agent_replicas (
    name                 VARCHAR NOT NULL,
    replica              INTEGER NOT NULL,
    pid                  BIGINT,            -- the current (or last) process
    state                VARCHAR,           -- running | stopping | stopped | crashed | circuit_open
    state_at             TIMESTAMPTZ,
    last_heartbeat       TIMESTAMPTZ,       -- last agent.heartbeat or agent.started
    heartbeat_interval_s DOUBLE,
    in_flight            BIGINT,            -- from the last heartbeat
    handled              BIGINT,            -- by the current process, from the last heartbeat
    failed               BIGINT,
    started_at           TIMESTAMPTZ,       -- last agent.started
    restarts             BIGINT NOT NULL,
    crashes              BIGINT NOT NULL,
    PRIMARY KEY (name, replica)
)
"""

_REPLICAS = """
SELECT *, state IN ('running', 'stopping')
          AND last_heartbeat >= now() - to_seconds(3 * coalesce(heartbeat_interval_s, 5.0)) AS alive
FROM {s}.agent_replicas
"""

RELATIONS = {
    "agents": """
SELECT a.name, coalesce(a.tags, []::VARCHAR[]) AS tags, a.first_seen, a.last_seen, a.messages_sent,
       a.messages_received, a.events_recorded, a.last_event_kind, a.lifecycle, a.lifecycle_at,
       r.state, r.last_heartbeat, coalesce(r.replicas, 0) AS replicas,
       coalesce(r.replicas_alive, 0) AS replicas_alive, r.in_flight,
       coalesce(r.restarts, 0) AS restarts, coalesce(r.crashes, 0) AS crashes
FROM {s}.agents a LEFT JOIN (
    SELECT name,
           CASE WHEN bool_or(alive) THEN 'running'
                WHEN bool_or(state = 'circuit_open') THEN 'circuit_open'
                ELSE arg_max(state, state_at) END AS state,
           max(last_heartbeat) AS last_heartbeat, count(*) AS replicas,
           count(*) FILTER (WHERE alive) AS replicas_alive,
           sum(in_flight) FILTER (WHERE alive) AS in_flight,
           sum(restarts) AS restarts, sum(crashes) AS crashes
    FROM (""" + _REPLICAS + """)
    GROUP BY name
) r USING (name)
""",
    "agent_replicas": _REPLICAS,
}

_LIFECYCLE = "('agent.started', 'agent.stopped', 'agent.crashed', 'agent.restarted', 'agent.circuit_opened')"

_UPSERT = """
INSERT INTO {s}.agents
WITH sightings AS (
    SELECT sender AS name, seq, stored_at AS seen_at, 1 AS active,
           (subject_class IN ('inbox', 'group', 'reply'))::INTEGER AS sent,
           0 AS received, 0 AS recorded, NULL::VARCHAR AS kind, NULL::VARCHAR[] AS tags
    FROM batch WHERE error IS NULL AND sender IS NOT NULL
    UNION ALL
    SELECT recipient, seq, stored_at, 0, 0, 1, 0, NULL, NULL
    FROM batch WHERE error IS NULL AND recipient IS NOT NULL AND subject_class = 'inbox'
    UNION ALL
    SELECT subject_name, seq, stored_at, 0, 0, 0, 1, kind,
           CASE WHEN json_type(payload->'tags') = 'ARRAY' THEN from_json(payload->'tags', '["VARCHAR"]') END
    FROM batch WHERE error IS NULL AND subject_class = 'event'
)
SELECT name,
       arg_max(tags, seq) FILTER (WHERE tags IS NOT NULL),
       min(seen_at),
       max(seen_at) FILTER (WHERE active = 1),
       sum(sent), sum(received), sum(recorded),
       arg_max(kind, seq) FILTER (WHERE recorded = 1 AND kind IS NOT NULL),
       arg_max(kind, seq) FILTER (WHERE kind IN {lifecycle}),
       arg_max(seen_at, seq) FILTER (WHERE kind IN {lifecycle})
FROM sightings WHERE name IS NOT NULL AND name <> ''
GROUP BY name
ON CONFLICT (name) DO UPDATE SET
    tags = coalesce(excluded.tags, tags),
    first_seen = least(first_seen, excluded.first_seen),
    last_seen = greatest(last_seen, excluded.last_seen),
    messages_sent = messages_sent + excluded.messages_sent,
    messages_received = messages_received + excluded.messages_received,
    events_recorded = events_recorded + excluded.events_recorded,
    last_event_kind = coalesce(excluded.last_event_kind, last_event_kind),
    lifecycle = coalesce(excluded.lifecycle, lifecycle),
    lifecycle_at = coalesce(excluded.lifecycle_at, lifecycle_at)
""".replace("{lifecycle}", _LIFECYCLE)

# The same upsert for a batch of messages only (no events, no dead letters): what `_UPSERT`
# computes then, in a statement that costs a third as much to plan (live batches are small and
# mostly messages, so this is most of the latency from a send to its visibility).
_UPSERT_MESSAGES = """
INSERT INTO {s}.agents
SELECT name, NULL, min(seen_at), max(seen_at) FILTER (WHERE active = 1), sum(active), sum(1 - active),
       0, NULL, NULL, NULL
FROM (
    SELECT sender AS name, stored_at AS seen_at, 1 AS active FROM batch WHERE error IS NULL AND sender IS NOT NULL
    UNION ALL
    SELECT recipient, stored_at, 0 FROM batch
    WHERE error IS NULL AND recipient IS NOT NULL AND subject_class = 'inbox'
)
WHERE name IS NOT NULL AND name <> ''
GROUP BY name
""" + _UPSERT[_UPSERT.index("ON CONFLICT (name)"):]


_REPLICA_UPSERT = """
INSERT INTO {s}.agent_replicas
WITH ev AS (
    SELECT subject_name AS name,
           coalesce(TRY_CAST(payload->>'replica' AS INTEGER), 0) AS replica,
           seq, stored_at, kind, TRY_CAST(payload->>'pid' AS BIGINT) AS pid,
           CASE kind WHEN 'agent.started' THEN 'running'
                     WHEN 'agent.heartbeat' THEN coalesce(payload->>'state', 'running')
                     WHEN 'agent.stopped' THEN 'stopped'
                     WHEN 'agent.crashed' THEN 'crashed'
                     WHEN 'agent.circuit_opened' THEN 'circuit_open' END AS state,
           payload
    FROM batch
    WHERE error IS NULL AND subject_class = 'event' AND kind IN {kinds}
), per_replica AS (
    SELECT name, replica,
           arg_max(pid, seq) FILTER (WHERE pid IS NOT NULL
                                     AND kind IN ('agent.started', 'agent.heartbeat', 'agent.restarted')) AS pid,
           arg_max(state, seq) FILTER (WHERE state IS NOT NULL) AS state,
           arg_max(stored_at, seq) FILTER (WHERE state IS NOT NULL) AS state_at,
           max(stored_at) FILTER (WHERE kind IN ('agent.heartbeat', 'agent.started')) AS last_heartbeat,
           arg_max(TRY_CAST(payload->>'interval_s' AS DOUBLE), seq) FILTER (WHERE kind = 'agent.heartbeat') AS interval_s,
           arg_max(payload, seq) FILTER (WHERE kind = 'agent.heartbeat') AS beat,
           max(seq) FILTER (WHERE kind = 'agent.heartbeat') AS beat_seq,
           max(seq) FILTER (WHERE kind = 'agent.started') AS started_seq,
           max(stored_at) FILTER (WHERE kind = 'agent.started') AS started_at,
           count(*) FILTER (WHERE kind = 'agent.restarted') AS restarts,
           count(*) FILTER (WHERE kind = 'agent.crashed') AS crashes
    FROM ev WHERE name <> ''
    GROUP BY name, replica
)
-- A heartbeat older than a start in the same batch described the previous process.
SELECT name, replica, pid, state, state_at, last_heartbeat, interval_s,
       CASE WHEN beat_seq > coalesce(started_seq, 0) THEN TRY_CAST(beat->>'in_flight' AS BIGINT) END,
       CASE WHEN beat_seq > coalesce(started_seq, 0) THEN TRY_CAST(beat->>'handled' AS BIGINT) END,
       CASE WHEN beat_seq > coalesce(started_seq, 0) THEN TRY_CAST(beat->>'failed' AS BIGINT) END,
       started_at, restarts, crashes
FROM per_replica
ON CONFLICT (name, replica) DO UPDATE SET
    pid = coalesce(excluded.pid, pid),
    state = coalesce(excluded.state, state),
    state_at = coalesce(excluded.state_at, state_at),
    last_heartbeat = greatest(last_heartbeat, excluded.last_heartbeat),
    heartbeat_interval_s = coalesce(excluded.heartbeat_interval_s, heartbeat_interval_s),
    -- Counters belong to the current process: a new start resets them.
    in_flight = CASE WHEN excluded.started_at IS NOT NULL OR excluded.in_flight IS NOT NULL
                     THEN excluded.in_flight ELSE in_flight END,
    handled = CASE WHEN excluded.started_at IS NOT NULL OR excluded.handled IS NOT NULL
                   THEN excluded.handled ELSE handled END,
    failed = CASE WHEN excluded.started_at IS NOT NULL OR excluded.failed IS NOT NULL
                  THEN excluded.failed ELSE failed END,
    started_at = coalesce(excluded.started_at, started_at),
    restarts = restarts + excluded.restarts,
    crashes = crashes + excluded.crashes
""".replace("{kinds}", _LIFECYCLE[:-1] + ", 'agent.heartbeat')")
_REPLICA_KINDS = (
    "agent.started", "agent.stopped", "agent.crashed", "agent.restarted", "agent.circuit_opened", "agent.heartbeat",
)


def fold(tx: Tx, s: str, batch: "Batch") -> int:
    """Upsert one row per name seen in the batch, and one per replica with lifecycle news."""
    messages_only = not batch.has_category("event", "dead") and batch.categories is not None
    written = tx.run(render(_UPSERT_MESSAGES if messages_only else _UPSERT, s))
    if batch.has_kind(*_REPLICA_KINDS):
        written += tx.run(render(_REPLICA_UPSERT, s))
    return written
