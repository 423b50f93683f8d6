"""`bus dlq list|show|retry`: dead letters you can act on.

    bus dlq list [--agent A] [--reason R] [--limit N] [--json]
    bus dlq show <id>                 the reason, attempts, error, traceback and the original
    bus dlq retry <id> ... | --all [--agent A] [--reason R]

Ids are a dead letter's id or the end of it (as `list` shows it). Listing and finding read the
`dead_letters` view through the projection service; a retry reads the dead letter back from the
log and sends its original again (bus.redrive), recorded with who did it (`--by`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bus.cli.common import CliError, add_connection_options, open_bus, out, positive_int, user_sender_name
from bus.config import check_name
from bus.errors import ConfigurationError
from bus.redrive import read_dead_letter, retry_dead_letter

# Each dead letter with whether (and as what) it was retried.
_LIST_SQL = """
SELECT d.seq, d.stored_at, d.id, d.agent, d.reason, d.attempts, d.original_kind, d.original_id, d.error,
       r.retried_as, r.retried_by
FROM dead_letters AS d
LEFT JOIN (SELECT payload->>'dead_letter_id' AS dead_letter_id,
                  arg_max(payload->>'retried_as', seq) AS retried_as, arg_max(sender, seq) AS retried_by
           FROM events WHERE kind = 'delivery.dead_letter.retried' GROUP BY 1) AS r
       ON r.dead_letter_id = d.id
WHERE (? IS NULL OR d.agent = ?) AND (? IS NULL OR d.reason = ?)
ORDER BY d.seq DESC
LIMIT ?
"""
_FIND_SQL = """
SELECT seq, id FROM dead_letters WHERE id = ? OR ends_with(id, ?) ORDER BY seq LIMIT 3
"""
_SHOW_SQL = """
SELECT seq, stored_at, id, agent, consumer, reason, attempts, error, traceback, original_seq,
       original_subject, original_id, original_kind, correlation_id, original_size,
       CAST(original_envelope AS VARCHAR) AS original_envelope
FROM dead_letters WHERE seq = ?
"""
# Short ids: what `list` shows of a dead letter's id (its random end).
SHORT_ID_CHARS = 12


def register(sub: argparse._SubParsersAction) -> None:
    dlq = sub.add_parser("dlq", help="list, show and retry dead letters")
    actions = dlq.add_subparsers(dest="dlq_action", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="dead letters, newest first, with whether they were retried")
    listing.add_argument("--agent", help="only this agent's")
    listing.add_argument("--reason", help="only this reason (permanent, exhausted, hop_limit, ...)")
    listing.add_argument("--limit", type=positive_int, default=50, help="at most N (default %(default)s)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add_connection_options(listing)
    listing.set_defaults(func=run_list)

    show = actions.add_parser("show", help="one dead letter: reason, attempts, error, traceback, original")
    show.add_argument("id", help="the dead letter's id, or the end of it as `list` shows it")
    add_connection_options(show)
    show.set_defaults(func=run_show)

    retry = actions.add_parser(
        "retry", help="send dead letters' originals again (new ids, caused by the dead letter; recorded)",
    )
    retry.add_argument("ids", nargs="*", metavar="ID", help="dead letters to retry (ids or their ends)")
    retry.add_argument("--all", action="store_true", help="every dead letter not retried yet (with --agent/--reason)")
    retry.add_argument("--agent", help="with --all: only this agent's")
    retry.add_argument("--reason", help="with --all: only this reason")
    retry.add_argument("--by", default=None, help="who is retrying, recorded with the retry (default: your user name)")
    add_connection_options(retry)
    retry.set_defaults(func=run_retry)


def _names(args: argparse.Namespace) -> tuple[str | None, str | None]:
    agent = check_name(args.agent, "agent name") if args.agent else None
    return agent, args.reason or None


async def _list_rows(bus: Any, agent: str | None, reason: str | None, limit: int) -> list[dict[str, Any]]:
    result = await bus.query(_LIST_SQL, [agent, agent, reason, reason, limit])
    return result.records()


async def run_list(args: argparse.Namespace) -> int:
    agent, reason = _names(args)
    async with open_bus(args, name="cli-dlq") as bus:
        rows = await _list_rows(bus, agent, reason, args.limit)
    if args.json:
        for row in rows:
            out(json.dumps(row, default=str))
        return 0
    if not rows:
        out("no dead letters" + (f" for {agent}" if agent else "") + (f" with reason {reason}" if reason else ""))
        return 0
    out(f"{'ID':<{SHORT_ID_CHARS}}  {'SEQ':>7}  {'AGENT':<14}  {'REASON':<14}  {'TRIES':>5}  {'KIND':<18}  RETRIED  ERROR")
    for row in rows:
        retried = "yes" if row["retried_as"] else "-"
        error = (row["error"] or "").splitlines()[0][:60] if row["error"] else ""
        out(f"{row['id'][-SHORT_ID_CHARS:]:<{SHORT_ID_CHARS}}  {row['seq']:>7}  {row['agent'] or '-':<14}  "
            f"{row['reason'] or '-':<14}  {row['attempts'] or 0:>5}  {(row['original_kind'] or '-')[:18]:<18}  "
            f"{retried:<7}  {error}")
    return 0


async def _find(bus: Any, given: str) -> tuple[int, str]:
    """(seq, id) of the dead letter `given` names. Raises CliError when none or several do."""
    given = given.strip()
    if not given:
        raise CliError("an empty dead letter id")
    found = (await bus.query(_FIND_SQL, [given, given])).records()
    if not found:
        raise CliError(f"no dead letter {given!r} in the views (`bus dlq list` shows them)")
    if len(found) > 1:
        raise CliError(f"{given!r} is the end of several dead letter ids ({', '.join(r['id'] for r in found)}): give more of it")
    return found[0]["seq"], found[0]["id"]


async def run_show(args: argparse.Namespace) -> int:
    async with open_bus(args, name="cli-dlq") as bus:
        seq, _ = await _find(bus, args.id)
        [row] = (await bus.query(_SHOW_SQL, [seq])).records()
    for key in ("id", "seq", "stored_at", "agent", "consumer", "reason", "attempts", "original_seq",
                "original_subject", "original_id", "original_kind", "correlation_id", "original_size"):
        out(f"{key:<17} {row[key]}")
    out(f"{'error':<17} {row['error'] or '-'}")
    if row["traceback"]:
        out("traceback")
        for line in row["traceback"].rstrip().splitlines():
            out(f"  {line}")
    original = row["original_envelope"]
    out("original" if original else "original          (not an envelope, or too large to carry: see original_seq)")
    if original:
        out(json.dumps(json.loads(original), indent=2))
    return 0


async def run_retry(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all):
        raise CliError("give the dead letters to retry (ids), or --all (with --agent/--reason to narrow it)")
    if (args.agent or args.reason) and not args.all:
        raise CliError("--agent and --reason narrow --all; with ids, give just the ids")
    agent, reason = _names(args)
    by = args.by or user_sender_name()
    check_name(by, "--by name")
    failed = 0
    async with open_bus(args, name=by) as bus:
        if args.all:
            rows = await _list_rows(bus, agent, reason, 10_000)
            targets = [(row["seq"], row["id"]) for row in reversed(rows) if not row["retried_as"]]
            if not targets:
                out("nothing to retry")
                return 0
        else:
            targets = [await _find(bus, given) for given in args.ids]
        for seq, letter_id in targets:
            try:
                outcome = await retry_dead_letter(bus, await read_dead_letter(bus, seq), by=by)
            except ConfigurationError as exc:
                failed += 1
                out(f"{letter_id}: not retried: {exc}")
                continue
            if outcome.already:
                out(f"{letter_id}: retried before, as {outcome.retried_as} (seq {outcome.retried_seq}); nothing new sent")
            else:
                out(f"{letter_id}: sent again to {outcome.to} as {outcome.retried_as} (seq {outcome.retried_seq}), by {by}")
    return 1 if failed else 0
