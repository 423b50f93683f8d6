"""The console's HTTP endpoints: the page, the JSON API, the live stream, operator actions.

Every endpoint answers JSON; bad parameters are a 400 saying what was wrong (bus.console.params),
something missing a 404, a query the service refused a 502 (504 when it timed out), no service
or server a 503, a refused credential a 403, an operator action the console is not allowed a
403, one that cannot be done a 409. No error of a request ends the console.
"""

from __future__ import annotations

import asyncio
import difflib
import getpass
import logging
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bus.console import params, queries
from bus.console.app import STATIC, Console
from bus.console.context_window import context_window
from bus.console.diagram import layout
from bus.console.feed import TrafficFilter
from bus.console.health import backlog_by_agent
from bus.console.replay import ReplayBusy
from bus.errors import BusUnavailable, ConfigurationError, PermissionDenied, QueryError
from bus.agent_control import request_stop
from bus.redrive import read_dead_letter, retry_dead_letter

log = logging.getLogger("continuum.console.http")

_encoder = msgspec.json.Encoder()
MAX_CONVERSATION_STEPS = 5_000


class JSON(Response):
    """A JSON response encoded by msgspec (Structs, datetimes and all)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


class NotFound(Exception):
    """What the request names does not exist (HTTP 404)."""


class Forbidden(Exception):
    """An operator action on a read-only console (HTTP 403)."""


def _console(request: Request) -> Console:
    return request.app.state.console


async def index(request: Request) -> Response:
    """The page (a single page; its views are addressed by the URL's fragment)."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def info(request: Request) -> Response:
    """What the page needs to know about this console: namespace, operator mode, the log's head."""
    params.unexpected(request.query_params, ())
    console = _console(request)
    return JSON({
        "namespace": console.bus.subjects.ns,
        "url": console.bus.config.shown_url,
        "operator": console.config.operator,
        "head_seq": console.feed.head_seq,
        "feed_error": console.feed_error,
    })


async def agents(request: Request) -> Response:
    """Every agent the views know, with its consumers' backlog."""
    params.unexpected(request.query_params, ())
    console = _console(request)
    rows = await queries.rows(console.bus, queries.AGENTS, [])
    backlog = backlog_by_agent(console.health.latest)
    for row in rows:
        row["backlog"] = backlog.get(row["name"])
    return JSON({"agents": rows})


async def agent(request: Request) -> Response:
    """One agent: its row, its replicas and its backlog."""
    params.unexpected(request.query_params, ())
    console = _console(request)
    name = params.name(request.path_params["name"])
    row = await queries.one(console.bus, queries.AGENT, [name])
    if row is None:
        raise NotFound(f"no agent named {name!r} is in the views")
    replicas = await queries.rows(console.bus, queries.REPLICAS, [name])
    return JSON({
        "agent": row, "replicas": replicas, "backlog": backlog_by_agent(console.health.latest).get(name),
        "operator": console.config.operator,
    })


async def stop_agent(request: Request) -> Response:
    """Ask an agent's supervisor, through the bus, to stop it (bus.agent_control: recorded as
    `agent.stop.requested` with the console's operator name). Only on an operator console (else
    403); 409 when no supervisor of that agent listens."""
    params.unexpected(request.query_params, ())
    console = _console(request)
    if not console.config.operator:
        raise Forbidden("this console is read-only: start it with `bus ui --operator` (the admin credential) to stop agents")
    name = params.name(request.path_params["name"])
    answer = await request_stop(console.bus, name, by=console.config.operator_name, reason="stopped from the console")
    log.info("console: %s asked %s's supervisor (pid %d) to stop it", console.config.operator_name, name, answer.pid)
    return JSON({"stop": answer})


def _traffic_filter(request: Request) -> TrafficFilter:
    query = request.query_params
    return TrafficFilter(
        agent=params.optional_name(query, "agent"), kind=params.optional_kind(query),
        tag=params.optional_name(query, "tag"), corr=params.optional_ident(query, "corr"),
    )


async def traffic(request: Request) -> Response:
    """The newest envelopes the console kept, filtered (?agent, kind, tag, corr, limit)."""
    params.unexpected(request.query_params, ("agent", "kind", "tag", "corr", "limit"))
    console = _console(request)
    filter_ = _traffic_filter(request)
    most = params.limit(request.query_params, console.config.recent, console.config.recent)
    return JSON({"items": console.feed.recent(filter_, most), "head_seq": console.feed.head_seq})


async def live(request: Request) -> Response:
    """Server-sent events for one page: `traffic` batches (filtered as /api/traffic), `stats`
    every second, `health` every few seconds. 503 when too many pages are open."""
    params.unexpected(request.query_params, ("agent", "kind", "tag", "corr"))
    console = _console(request)
    filter_ = _traffic_filter(request)
    if console.feed.pages >= console.config.max_pages:
        return JSON({"error": f"the console serves at most {console.config.max_pages} live pages"}, status_code=503)
    keepalive = console.config.keepalive_s

    async def stream() -> Any:
        async with console.feed.page(filter_) as page:
            yield b"retry: 2000\n\n"
            while not console.closing.is_set():
                try:
                    async with asyncio.timeout(keepalive):
                        data = await page.next()
                except TimeoutError:
                    data = b": keepalive\n\n"
                if not data:
                    return  # the console is stopping
                yield data

    return StreamingResponse(
        stream(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def event(request: Request) -> Response:
    """One stored event by sequence: the envelope, its delivery lifecycle (for a message), its
    cause and its effects."""
    params.unexpected(request.query_params, ())
    bus = _console(request).bus
    seq = params.seq(request.path_params["seq"])
    row = await queries.one(bus, queries.EVENT, [seq])
    if row is None:
        raise NotFound(f"no event at seq {seq} in the views (not stored yet, or not folded yet)")
    lifecycle = await queries.one(bus, queries.LIFECYCLE, [seq])
    cause = None
    if row.get("causation_id"):
        cause = await queries.one(bus, queries.EVENT_BY_ID, [row["causation_id"]])
    effects = await queries.rows(bus, queries.EFFECTS, [row["id"], 100]) if row.get("id") else []
    for key in ("payload", "headers"):
        row[key] = _json_value(row.get(key))
    return JSON({"event": row, "lifecycle": lifecycle, "cause": cause, "effects": effects})


async def conversations(request: Request) -> Response:
    """Conversations, newest first (?agent: those it took part in; ?limit)."""
    params.unexpected(request.query_params, ("agent", "limit"))
    agent_name = params.optional_name(request.query_params, "agent")
    most = params.limit(request.query_params, 100, 1_000)
    rows = await queries.rows(_console(request).bus, queries.CONVERSATIONS, [agent_name, agent_name, agent_name, most])
    return JSON({"conversations": rows})


async def conversation(request: Request) -> Response:
    """One conversation laid out for the diagram (its id, or the end of it as `bus tail` prints)."""
    params.unexpected(request.query_params, ("limit",))
    bus = _console(request).bus
    given = params.ident(request.path_params["corr"], "correlation id")
    most = params.limit(request.query_params, MAX_CONVERSATION_STEPS, MAX_CONVERSATION_STEPS)
    found = await queries.rows(bus, queries.CONVERSATION_IDS, [given, given])
    if not found:
        raise NotFound(f"no conversation {given!r} in the views")
    if len(found) > 1:
        raise params.BadRequest(f"{given!r} names several conversations: give more of its id")
    corr = found[0]["correlation_id"]
    steps = await queries.rows(bus, queries.CONVERSATION, [corr, most + 1], max_rows=most + 1)
    diagram = layout(corr, steps[:most], truncated=len(steps) > most)
    return JSON(diagram)


async def _as_of_seq(request: Request) -> int:
    console = _console(request)
    point = params.as_of(request.query_params)
    if point is None:
        return params.MAX_SEQ
    if isinstance(point, int):
        return point
    row = await queries.one(console.bus, queries.SEQ_AT_TIME, [point.isoformat()])
    return int(row["seq"]) if row else 0


async def memory(request: Request) -> Response:
    """An agent's memory as of a point (?as_of: a sequence or a time; default now): its model
    calls, the blocks it held with every version (a diff against the one before, who wrote it),
    facts and contradictions (?mine=1: only the facts it recorded)."""
    params.unexpected(request.query_params, ("as_of", "mine"))
    bus = _console(request).bus
    name = params.name(request.path_params["name"])
    mine = request.query_params.get("mine", "")
    if mine not in ("", "0", "1"):
        raise params.BadRequest(f"mine must be 0 or 1 (got {mine[:40]!r})")
    at = await _as_of_seq(request)
    calls = await queries.rows(bus, queries.LLM_CALLS, [name, name, None, None, at, 200])
    versions = await queries.rows(bus, queries.BLOCKS_AS_OF, [name, at, at, at])
    recorder = name if mine == "1" else None
    facts = await queries.rows(bus, queries.FACTS_AS_OF, [at, at, recorder, recorder, 500])
    contradictions = await queries.rows(bus, queries.CONTRADICTIONS_AS_OF, [at, at, 200])
    return JSON({
        "agent": name, "as_of_seq": None if at == params.MAX_SEQ else at, "calls": calls,
        "blocks": _block_histories(versions), "facts": facts, "contradictions": contradictions,
    })


def _block_histories(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Versions grouped per block, each with its diff against the previous applied version."""
    blocks: dict[str, dict[str, Any]] = {}
    for version in versions:
        block = blocks.setdefault(version["block_id"], {
            "block_id": version["block_id"], "label": version["label"], "limit": version["limit"],
            "description": version["description"], "versions": [], "value": "",
        })
        previous = block["value"]
        if not version["rejected"]:
            block["value"] = version["value"] or ""
        version["diff"] = _diff(previous, version["value"] or "") if not version["rejected"] else []
        block["versions"].append(version)
    return list(blocks.values())


def _diff(before: str, after: str) -> list[list[str]]:
    """Line changes from `before` to `after`: [op, line] with op ' ', '+' or '-'."""
    out: list[list[str]] = []
    for line in difflib.ndiff(before.splitlines(), after.splitlines()):
        if line[:1] in (" ", "+", "-"):
            out.append([line[0], line[2:]])
    return out


async def llm_calls(request: Request) -> Response:
    """Model calls, newest first (?agent, ?corr, ?limit)."""
    params.unexpected(request.query_params, ("agent", "corr", "limit"))
    query = request.query_params
    agent_name = params.optional_name(query, "agent")
    corr = params.optional_ident(query, "corr")
    most = params.limit(query, 200, 1_000)
    rows = await queries.rows(
        _console(request).bus, queries.LLM_CALLS, [agent_name, agent_name, corr, corr, params.MAX_SEQ, most]
    )
    return JSON({"calls": rows})


async def llm_call(request: Request) -> Response:
    """One model call: its full request and response, usage and cost, and the context window it
    was given, part by part with token counts."""
    params.unexpected(request.query_params, ())
    call_id = params.ident(request.path_params["call_id"], "call id")
    row = await queries.one(_console(request).bus, queries.LLM_CALL, [call_id])
    if row is None:
        raise NotFound(f"no model call {call_id!r} in the views")
    row["request_json"] = _json_value(row.get("request_json"))
    row["response_json"] = _json_value(row.get("response_json"))
    return JSON({"call": row, "context": context_window(row["request_json"])})


async def dead_letters(request: Request) -> Response:
    """Dead letters, newest first, with whether and by whom each was retried (?agent, ?limit)."""
    params.unexpected(request.query_params, ("agent", "limit"))
    agent_name = params.optional_name(request.query_params, "agent")
    most = params.limit(request.query_params, 200, 1_000)
    rows = await queries.rows(_console(request).bus, queries.DEAD_LETTERS, [agent_name, agent_name, most])
    return JSON({"dead_letters": rows, "operator": _console(request).config.operator})


async def dead_letter(request: Request) -> Response:
    """One dead letter: reason, attempts, error, traceback and the original envelope."""
    params.unexpected(request.query_params, ())
    seq = params.seq(request.path_params["seq"])
    row = await queries.one(_console(request).bus, queries.DEAD_LETTER, [seq])
    if row is None:
        raise NotFound(f"no dead letter at seq {seq} in the views")
    row["original_envelope"] = _json_value(row.get("original_envelope"))
    return JSON({"dead_letter": row})


async def retry(request: Request) -> Response:
    """Send a dead letter's original again, as `bus dlq retry` does (bus.redrive), recorded with
    the console's operator name. Only on an operator console (else 403)."""
    params.unexpected(request.query_params, ())
    console = _console(request)
    if not console.config.operator:
        raise Forbidden("this console is read-only: start it with `bus ui --operator` (the admin credential) to retry")
    seq = params.seq(request.path_params["seq"])
    letter = await read_dead_letter(console.bus, seq)
    outcome = await retry_dead_letter(console.bus, letter, by=console.config.operator_name)
    log.info("console: dead letter %s retried as %s (seq %d)", outcome.dead_letter_id, outcome.retried_as, outcome.retried_seq)
    return JSON({"retry": outcome})


async def replay(request: Request) -> Response:
    """Replay a conversation on its recorded model answers (`bus replay`) and say whether the
    handlers produced the same events; a read, so a read-only console may too. 409 while another
    replay runs."""
    params.unexpected(request.query_params, ())
    corr = params.ident(request.path_params["corr"], "correlation id")
    found = await queries.rows(_console(request).bus, queries.CONVERSATION_IDS, [corr, corr])
    if len(found) != 1:
        raise NotFound(f"no conversation {corr!r} in the views") if not found else params.BadRequest(
            f"{corr!r} names several conversations: give more of its id")
    return JSON({"replay": await _console(request).replays.run(found[0]["correlation_id"])})


async def health(request: Request) -> Response:
    """The latest health sample and the per-second counts."""
    params.unexpected(request.query_params, ())
    console = _console(request)
    return JSON({"health": console.health.latest, "seconds": console.feed.stats(), "head_seq": console.feed.head_seq})


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            return value
    return value


def default_operator_name() -> str:
    """Who retries from an operator console unless told: `console-<user>`, as a bus name."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    cleaned = "".join(c if c.isalnum() or c in "_-" else "-" for c in user)[:48] or "operator"
    return f"console-{cleaned}"


API = [
    Route("/api/info", info),
    Route("/api/agents", agents),
    Route("/api/agents/{name}", agent),
    Route("/api/agents/{name}/stop", stop_agent, methods=["POST"]),
    Route("/api/traffic", traffic),
    Route("/api/live", live),
    Route("/api/events/{seq}", event),
    Route("/api/conversations", conversations),
    Route("/api/conversations/{corr}", conversation),
    Route("/api/memory/{name}", memory),
    Route("/api/llm_calls", llm_calls),
    Route("/api/llm_calls/{call_id}", llm_call),
    Route("/api/dead_letters", dead_letters),
    Route("/api/dead_letters/{seq}", dead_letter),
    Route("/api/dead_letters/{seq}/retry", retry, methods=["POST"]),
    Route("/api/replay/{corr}", replay, methods=["POST"]),
    Route("/api/health", health),
]


def _error(status: int) -> Any:
    async def handler(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=status)

    return handler


async def _query_failed(request: Request, exc: Exception) -> Response:
    status = 504 if getattr(exc, "kind", None) == "timeout" else 502
    return JSONResponse({"error": f"the query service: {exc}"}, status_code=status)


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    params.BadRequest: _error(400),
    NotFound: _error(404),
    Forbidden: _error(403),
    PermissionDenied: _error(403),
    ConfigurationError: _error(409),
    ReplayBusy: _error(409),
    BusUnavailable: _error(503),
    QueryError: _query_failed,
    HTTPException: _http,
}


class Guard:
    """ASGI middleware: requests must name this console's own host (no DNS rebinding from a web
    page), and a POST must come from its own page (same Origin, and a header only a script of the same
    origin may send without asking): another site open in
    the browser cannot act through it."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        config = console.config
        hosts = {config.host, "127.0.0.1", "localhost", "[::1]"} if config.loopback else {config.host}
        self.hosts = {f"{h}:{config.port}".encode() for h in hosts} | ({f"{config.host}".encode()} if config.port == 80 else set())
        self.guard_host = config.loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"")
        if self.guard_host and host not in self.hosts:
            await JSONResponse({"error": "this console answers only to its own address"}, status_code=421)(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            origin = headers.get(b"origin")
            if origin is not None and origin not in (b"http://" + host, b"https://" + host):
                await JSONResponse({"error": "cross-origin requests may not act"}, status_code=403)(scope, receive, send)
                return
            if headers.get(b"x-continuum-console") != b"1":
                await JSONResponse(
                    {"error": "an action needs the header X-Continuum-Console: 1 (the page sends it)"}, status_code=403,
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)
