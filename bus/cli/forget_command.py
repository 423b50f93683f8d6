"""`bus forget agent <name> --why ...`: crypto-shred an agent's private records (bus.privacy).

Erases the agent's key of private records from the key store (the server overwrites it) and
records a `privacy.forgotten` event (who, what, when, why). Needs the admin's credential.
"""

from __future__ import annotations

import argparse

from bus.cli.common import add_connection_options, open_bus, out
from bus.privacy.forget import UNITS, forget_agent


def register(sub: argparse._SubParsersAction) -> None:
    forget = sub.add_parser(
        "forget", help="make a data subject's private records unreadable everywhere (crypto-shredding)",
        description="Erase the key an agent's private records (recall turns, summaries, model calls, step "
        "results, its own state) are sealed under, and record the act. The log keeps its structure; the "
        "records stay as ciphertext no one can open, in the stream, its replicas and the archive; the "
        "projection service drops the rows it opened from its views.",
    )
    forget.add_argument("unit", choices=UNITS, help="what is forgotten: an agent's private memory")
    forget.add_argument("id", help="the agent's name")
    forget.add_argument("--why", required=True, help="the reason, recorded with the act")
    add_connection_options(forget)
    forget.set_defaults(func=run_forget)


async def run_forget(args: argparse.Namespace) -> int:
    async with open_bus(args) as bus:
        result = await forget_agent(bus, args.id, why=args.why, actor=bus.config.name)
    erased = ", ".join(result.kids) if result.kids else "none left (forgotten before)"
    out(f"forgot {result.unit} {result.subject}: key {result.key} erased (generations: {erased}); "
        f"recorded at seq {result.seq}")
    return 0
