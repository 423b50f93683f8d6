"""JSON Schema export of the envelope and every payload type, for other languages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from schemas.envelope import Envelope
from schemas.ids import ID_CHARS, ID_PATTERN
from schemas.query import QueryFailure, QueryRequest, QueryResult
from schemas.registry import PayloadRegistry


def json_schemas(registry: PayloadRegistry) -> dict[str, dict[str, Any]]:
    """Return {file name: JSON Schema} for the envelope, each payload kind and the query types."""
    out: dict[str, dict[str, Any]] = {
        "envelope.json": _with_id_pattern(msgspec.json.schema(Envelope[registry.union()])),  # type: ignore[misc]
        "query.request.json": msgspec.json.schema(QueryRequest),
        "query.result.json": msgspec.json.schema(QueryResult),
        "query.failure.json": msgspec.json.schema(QueryFailure),
    }
    for kind in registry.kinds():
        typ = registry.type_for(kind)
        out[f"payload.{kind}.json"] = msgspec.json.schema(typ)
    return out


# What the typed decoder checks beyond the type's length bounds (schemas.ids), said in the schema.
_ID_SCHEMA = {"type": "string", "minLength": ID_CHARS, "maxLength": ID_CHARS, "pattern": f"^{ID_PATTERN}$"}


def _with_id_pattern(schema: dict[str, Any]) -> dict[str, Any]:
    """The envelope's schema with `id`, `correlation_id` and `causation_id` as protocol ids."""
    for name, definition in schema.get("$defs", {}).items():
        if not name.startswith("Envelope"):
            continue
        properties = definition["properties"]
        properties["id"] = dict(_ID_SCHEMA)
        for field in ("correlation_id", "causation_id"):
            properties[field]["anyOf"] = [dict(_ID_SCHEMA), {"type": "null"}]
    return schema


def export_json_schemas(registry: PayloadRegistry, directory: Path) -> list[Path]:
    """Write every schema under `directory` (created if missing); return the paths written.

    Raises OSError if the directory cannot be written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas(registry).items():
        path = directory / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
