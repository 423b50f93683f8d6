"""The SQL each page of the console runs through the query service.

Every value from a request travels as a parameter (`?`), never pasted into the text. Rows come
back as dicts of JSON values (times as ISO 8601 text), ready to send to the page.

Raises (from `Bus.query`): QueryError, BusUnavailable, PermissionDenied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.client import Bus

AGENTS = """
SELECT name, tags, first_seen, last_seen, messages_sent, messages_received, events_recorded,
       last_event_kind, lifecycle, lifecycle_at, state, last_heartbeat, replicas, replicas_alive,
       in_flight, restarts, crashes
FROM agents ORDER BY name
"""

AGENT = AGENTS.replace("ORDER BY name", "WHERE name = ?")

REPLICAS = """
SELECT replica, pid, state, state_at, last_heartbeat, in_flight, handled, failed, started_at,
       restarts, crashes, alive
FROM agent_replicas WHERE name = ? ORDER BY replica
"""

EVENT = """
SELECT seq, stored_at, subject, category, kind, id, sender, recipient, tag, reply_to,
       correlation_id, causation_id, priority, created_at, expires_at, headers, payload, error
FROM events WHERE seq = ?
"""

EVENT_BY_ID = "SELECT seq, kind, sender, recipient, tag, stored_at FROM events WHERE id = ? ORDER BY seq LIMIT 1"

EFFECTS = """
SELECT seq, kind, sender, recipient, tag, stored_at FROM events
WHERE causation_id = ? AND kind <> 'delivery.report' ORDER BY seq LIMIT ?
"""

LIFECYCLE = """
SELECT status, status_at, deliveries, max_attempt, failures, handled_by, first_handled_at,
       handler_ms, last_error, dead_lettered_at, dead_reason, expired_at, publish_ms, handled_ms,
       settled_ms, last_traceback
FROM messages WHERE seq = ?
"""

CONVERSATIONS = """
SELECT correlation_id, count(*) AS steps, min(stored_at) AS started_at, max(stored_at) AS last_at,
       arg_min(sender, step) AS started_by, arg_min(kind, step) AS first_kind,
       count(*) FILTER (WHERE kind = 'memory.contradiction.flagged') AS contradictions
FROM conversations
WHERE (? IS NULL OR correlation_id IN (SELECT correlation_id FROM conversations WHERE sender = ? OR recipient = ?))
GROUP BY correlation_id HAVING count(*) > 1 ORDER BY min(seq) DESC LIMIT ?
"""

CONVERSATION_IDS = """
SELECT DISTINCT correlation_id FROM conversations
WHERE correlation_id = ? OR ends_with(correlation_id, ?) LIMIT 3
"""

CONVERSATION = """
SELECT step, seq, stored_at, id, kind, sender, recipient, tag, category, causation_id, cause_seq,
       caused_by, cause_kind
FROM conversations WHERE correlation_id = ? ORDER BY step LIMIT ?
"""

DEAD_LETTERS = """
SELECT d.seq, d.stored_at, d.id, d.agent, d.reason, d.attempts, d.original_kind, d.original_id,
       d.error, d.correlation_id, r.retried_as, r.retried_by, r.retried_seq
FROM dead_letters d
LEFT JOIN (SELECT payload->>'dead_letter_id' AS dead_letter_id,
                  arg_max(payload->>'retried_as', seq) AS retried_as,
                  arg_max(sender, seq) AS retried_by,
                  max(seq) AS retried_seq
           FROM events WHERE kind = 'delivery.dead_letter.retried' GROUP BY 1) r
  ON r.dead_letter_id = d.id
WHERE (? IS NULL OR d.agent = ?)
ORDER BY d.seq DESC LIMIT ?
"""

DEAD_LETTER = """
SELECT seq, stored_at, id, agent, consumer, reason, attempts, error, traceback, original_seq,
       original_subject, original_id, original_kind, correlation_id, original_envelope,
       original_size, original_sha256
FROM dead_letters WHERE seq = ?
"""

LLM_CALLS = """
SELECT call_id, agent, step, model, ok, seq, called_at, correlation_id, input_tokens, output_tokens,
       cache_read_tokens, cache_write_tokens, latency_ms, cost_usd, stop_reason, tool_calls,
       messages, system_chars, error_type
FROM llm_calls
WHERE (? IS NULL OR agent = ?) AND (? IS NULL OR correlation_id = ?) AND seq <= ?
ORDER BY seq DESC LIMIT ?
"""

LLM_CALL = """
SELECT call_id, agent, step, provider, model, ok, seq, called_at, correlation_id, input_tokens,
       output_tokens, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, latency_ms,
       cost_usd, stop_reason, tool_calls, response_text, error_type, message, request_json,
       response_json
FROM llm_calls WHERE call_id = ?
"""

# The blocks an agent held at sequence S, every version written up to S.
BLOCKS_AS_OF = """
SELECT block_id, label, "limit", description, version, value, chars, actor, op, reason, seq,
       written_at, ended_seq, gap, rejected, reject_reason
FROM blocks
WHERE block_id IN (SELECT block_id FROM block_holders
                   WHERE agent = ? AND attached_seq <= ? AND (detached_seq IS NULL OR detached_seq > ?))
  AND seq <= ?
ORDER BY block_id, seq
"""

FACTS_AS_OF = """
SELECT fact_id, subject, statement, value, category, confidence, recorded_by, source_ref,
       source_title, source_quote, recorded_seq, recorded_at, status, ended_seq, ended_by_fact,
       ended_rule, ended_actor, ended_reason, ended_contradiction_id,
       (ended_seq IS NULL OR ended_seq > ?) AS held
FROM facts WHERE recorded_seq <= ? AND (? IS NULL OR recorded_by = ?)
ORDER BY recorded_seq DESC LIMIT ?
"""

CONTRADICTIONS_AS_OF = """
SELECT contradiction_id, rule, actor, note, subject_a, statement_a, value_a, source_a, subject_b,
       statement_b, value_b, source_b, flagged_seq, flagged_at, resolved_seq, resolved_rule,
       (resolved_seq IS NULL OR resolved_seq > ?) AS open_then
FROM contradictions WHERE flagged_seq <= ?
ORDER BY flagged_seq DESC LIMIT ?
"""

SEQ_AT_TIME = "SELECT coalesce(max(seq), 0) AS seq FROM events WHERE stored_at <= ?::TIMESTAMPTZ"


async def rows(bus: "Bus", sql: str, params: list[Any], *, timeout_s: float = 10.0, max_rows: int = 5_000) -> list[dict[str, Any]]:
    """The query's rows as dicts of JSON values. Raises QueryError, BusUnavailable, PermissionDenied."""
    # Session consistency: after an operator action, the views include it.
    result = await bus.query(sql, params, timeout_s=timeout_s, max_rows=max_rows)
    return [dict(zip(result.columns, row)) for row in result.rows]


async def one(bus: "Bus", sql: str, params: list[Any], *, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The first row, or None."""
    found = await rows(bus, sql, params, timeout_s=timeout_s, max_rows=1)
    return found[0] if found else None
