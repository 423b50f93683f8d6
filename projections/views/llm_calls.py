"""`llm_calls`: every model call (`llm.call.completed` / `llm.call.failed`), with the full
request and response JSON (for replay and audit), tokens including prompt-cache reads and
writes, latency and cost.

`cost_usd` is NULL for a model without a price, never 0: sum it with
`count(*) FILTER (WHERE cost_usd IS NULL)` beside it. A call id recorded twice keeps its first
record.

    SELECT model, count(*), sum(input_tokens), sum(cache_read_tokens), sum(cost_usd),
           count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced, quantile_cont(latency_ms, 0.95)
    FROM llm_calls WHERE ok GROUP BY model
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render
from projections.views._forget import erase_rows
from projections.views._kinds import kinds_in

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "llm_calls"
VERSION = 2

TABLES = """
CREATE TABLE {s}.llm_calls (
    call_id               VARCHAR PRIMARY KEY,
    agent                 VARCHAR,
    step                  VARCHAR,
    provider              VARCHAR,
    model                 VARCHAR,
    request_sha256        VARCHAR,
    ok                    BOOLEAN NOT NULL,
    latency_ms            DOUBLE,
    cost_usd              DOUBLE,        -- NULL: the model has no price
    input_tokens          BIGINT,        -- NULL on failure
    output_tokens         BIGINT,
    cache_read_tokens     BIGINT,
    cache_write_tokens    BIGINT,
    cache_write_1h_tokens BIGINT,
    stop_reason           VARCHAR,
    tool_calls            VARCHAR[],     -- names of the tool_use blocks of the response
    response_text         VARCHAR,       -- the text blocks joined by blank lines
    messages              BIGINT,        -- messages in the request
    tools                 BIGINT,        -- tools offered
    system_chars          BIGINT,
    error_type            VARCHAR,       -- failures only
    retryable             BOOLEAN,
    status_code           INTEGER,
    message               VARCHAR,
    request_json          JSON,
    response_json         JSON,
    seq                   BIGINT NOT NULL,
    called_at             TIMESTAMPTZ,   -- envelope time of the record
    correlation_id        VARCHAR
)
"""

RELATIONS = {"llm_calls": "SELECT * FROM {s}.llm_calls"}

_INSERT = """
INSERT INTO {s}.llm_calls
WITH calls AS (
    SELECT *, payload->'response' AS response, payload->'request' AS request,
           kind = 'llm.call.completed' AS ok,
           CASE WHEN json_type(payload->'response'->'content') = 'ARRAY'
                THEN from_json(payload->'response'->'content', '["JSON"]') END AS blocks
    FROM batch
    WHERE kind IN ('llm.call.completed', 'llm.call.failed') AND error IS NULL AND payload->>'call_id' IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY payload->>'call_id' ORDER BY seq) = 1
)
SELECT payload->>'call_id', payload->>'agent', coalesce(payload->>'step', ''), payload->>'provider',
       payload->>'model', payload->>'request_sha256', ok,
       TRY_CAST(payload->>'latency_ms' AS DOUBLE), TRY_CAST(payload->>'cost_usd' AS DOUBLE),
       TRY_CAST(response->'usage'->>'input_tokens' AS BIGINT),
       TRY_CAST(response->'usage'->>'output_tokens' AS BIGINT),
       CASE WHEN ok THEN coalesce(TRY_CAST(response->'usage'->>'cache_read_input_tokens' AS BIGINT), 0) END,
       CASE WHEN ok THEN coalesce(TRY_CAST(response->'usage'->>'cache_creation_input_tokens' AS BIGINT), 0) END,
       CASE WHEN ok THEN coalesce(TRY_CAST(response->'usage'->>'cache_creation_1h_input_tokens' AS BIGINT), 0) END,
       response->>'stop_reason',
       CASE WHEN ok THEN coalesce(list_transform(list_filter(blocks, lambda b: b->>'type' = 'tool_use'),
                                                 lambda b: b->>'name'), []::VARCHAR[]) END,
       CASE WHEN ok THEN array_to_string(list_transform(list_filter(blocks, lambda b: b->>'type' = 'text'),
                                                        lambda b: b->>'text'), chr(10) || chr(10)) END,
       coalesce(json_array_length(request->'messages'), 0),
       coalesce(json_array_length(request->'tools'), 0),
       CASE WHEN json_type(request->'system') = 'ARRAY'
            THEN coalesce(list_sum(list_transform(from_json(request->'system', '["JSON"]'),
                                                  lambda b: length(b->>'text'))), 0)
            ELSE 0 END,
       payload->>'error_type', TRY_CAST(payload->>'retryable' AS BOOLEAN),
       TRY_CAST(payload->>'status_code' AS INTEGER), payload->>'message',
       request, response, seq, created_at, correlation_id
FROM calls
ON CONFLICT (call_id) DO NOTHING
"""


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Insert one row per model call not seen before."""
    erase_rows(tx, s, batch, "llm_calls")  # a forget (projections.views._forget), before and after
    if not kinds_in(batch) & {"llm.call.completed", "llm.call.failed"}:
        return 0
    written = tx.run(render(_INSERT, s))
    erase_rows(tx, s, batch, "llm_calls")
    return written
