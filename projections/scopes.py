"""Who reads which rows: the query scopes.

A query sent to `_continuum.<ns>.query` reads everything; only the admin and service credentials
may publish there. An agent's credential may publish only to `_continuum.<ns>.query.<itself>`,
and a query arriving there runs in that agent's scope:

| view | an agent reads |
|---|---|
| facts, fact_anomalies, contradictions | every row: the team's shared knowledge |
| agents, agent_replicas | every row: who runs, and how it is doing |
| recall, recall_summaries, recall_closures | its own conversations (`agent` = itself) |
| llm_calls, steps, dead_letters, integrity | its own (`agent` = itself) |
| block_holders | its own holdings |
| blocks | the blocks it holds or held |
| messages, events, conversations | what it sent or was sent, and broadcasts |
| anything else | nothing (a view added later is hidden until it is given a row here) |

Enforced in two steps, both on DuckDB's own parse tree and binder, none on the SQL's text:
`projections.statement.check` refuses a scoped query that names a relation other than these
views (unqualified) or its own WITH names, or a WITH name that is a view's name; the query then
runs inside `WITH <view> AS (SELECT * FROM main.<view> WHERE <rows>) ...`, so every name it can
reach is the filtered one, in joins, subqueries, CTEs and UNIONs alike.
"""

from __future__ import annotations

from bus.config import check_name

# View -> the rows an agent sees ({agent} is its quoted name); None: every row.
AGENT_ROWS: dict[str, str | None] = {
    "facts": None,
    "fact_anomalies": None,
    "contradictions": None,
    "agents": None,
    "agent_replicas": None,
    "recall": "agent = {agent}",
    "recall_summaries": "agent = {agent}",
    "recall_closures": "agent = {agent}",
    "llm_calls": "agent = {agent}",
    "steps": "agent = {agent}",
    "dead_letters": "agent = {agent}",
    "integrity": "agent = {agent}",
    "block_holders": "agent = {agent}",
    "blocks": "block_id IN (SELECT block_id FROM main.block_holders WHERE agent = {agent})",
    "messages": "sender = {agent} OR recipient = {agent} OR tag IS NOT NULL",
    "events": "sender = {agent} OR recipient = {agent} OR tag IS NOT NULL",
    "conversations": "sender = {agent} OR recipient = {agent} OR tag IS NOT NULL",
}


def readable(view: str) -> bool:
    """Whether an agent's scope names `view` at all."""
    return view.lower() in AGENT_ROWS


def scoped_sql(sql: str, agent: str) -> str:
    """`sql` (already checked for this scope) run in `agent`'s scope: each restricted view is
    shadowed by a WITH of its rows, around the query as a subquery (so its own WITH, ORDER BY
    and LIMIT stay its own). Raises ConfigurationError for a name that is not an agent name."""
    quoted = "'" + check_name(agent, "agent name") + "'"  # letters, digits, '_' and '-' only
    shadows = ", ".join(
        f"{view} AS (SELECT * FROM main.{view} WHERE {rows.format(agent=quoted)})"
        for view, rows in AGENT_ROWS.items()
        if rows is not None
    )
    return f"WITH {shadows} SELECT * FROM (\n{sql}\n) AS scoped"
