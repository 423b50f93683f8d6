"""How `bus mcp` reports a failed tool call: one line saying what to fix.

`tool_errors()` turns what a tool can expect to go wrong (a bad argument, a name the bus refuses,
a query the views refuse, a request nobody answers, the bus unavailable) into the SDK's
`ToolError`, which the client gets as an `is_error` result; `one_line_errors` (server middleware)
shortens the SDK's own multi-line report of arguments that fail the input schema. Anything else
a tool raises is a crash the SDK contains: the client sees "Error executing tool <name>", the
server logs the traceback to stderr and keeps serving.
"""

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver.exceptions import ToolError

from bus.cli.common import CliError
from bus.errors import BusError, ConfigurationError, QueryError, RemoteError, RequestTimeout


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """Turn what a tool can expect to go wrong into a ToolError with a one-line message (the SDK
    puts the tool's name before it)."""
    try:
        yield
    except ToolError:
        raise
    except (ValueError, ConfigurationError, CliError, RequestTimeout) as exc:
        raise ToolError(one_line(str(exc))) from exc
    except QueryError as exc:
        raise ToolError(one_line(f"the views refused or failed the query ({exc.kind}): {exc}")) from exc
    except RemoteError as exc:
        raise ToolError(one_line(f"the agent answered with a failure: {exc}")) from exc
    except BusError as exc:
        raise ToolError(one_line(f"the bus is unavailable ({type(exc).__name__}): {exc}")) from exc


_PYDANTIC_DETAIL = re.compile(r"\s*\[type=(?P<type>[^,\]]+), input_value=(?P<value>.*?), input_type=\w+\]")
_PYDANTIC_HELP = re.compile(r"\s*For further information visit \S+")
_PYDANTIC_FIELD = re.compile(r"\n(?P<field>\S[^\n]*)\n\s+(?P<message>[^\n]+)")
_PYDANTIC_HEAD = re.compile(r"\d+ validation errors? for \w+Arguments")


async def one_line_errors(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Middleware: a failed tool call's message on one line. The SDK reports arguments that fail
    the input schema in pydantic's multi-line form; this keeps each field and its problem
    ("limit: Input should be less than or equal to 50 (got 500)") and drops the rest. The
    result reaches middleware in its wire form (a dict)."""
    result = await call_next(ctx)
    if ctx.method != "tools/call" or not isinstance(result, dict) or not result.get("isError"):
        return result
    content = [
        {**c, "text": _compact_error(c["text"])} if isinstance(c, dict) and isinstance(c.get("text"), str) else c
        for c in result.get("content") or []
    ]
    return {**result, "content": content}


def _compact_error(text: str) -> str:
    text = _PYDANTIC_HELP.sub("", text)
    text = _PYDANTIC_DETAIL.sub(lambda m: "" if m["type"] == "missing" else f" (got {one_line(m['value'], 60)})", text)
    text = _PYDANTIC_FIELD.sub(lambda m: f"; {m['field']}: {m['message']}", text)
    text = _PYDANTIC_HEAD.sub("invalid arguments", text)
    return one_line(text)


def one_line(text: str, limit: int = 500) -> str:
    """`text` with its whitespace runs as single spaces, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
