"""`bus creds issue|list|revoke`: credentials for agents that run elsewhere (another machine,
another language), and the step every issuing command shares.

    bus creds issue planner --tags research    writes <home>/auth/creds/agents/<ns>/planner.nk (0600)
    bus creds list                             who holds a credential: role, key, tags, dates
    bus creds revoke planner                   its connections close at once; it cannot reconnect

The registry lives in the home `bus up` made (bus.identity.registry). Issuing or revoking
rewrites the servers' auth.conf and reloads every running node (SIGHUP): no restart, and the
command returns once every node has loaded the new config.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
from pathlib import Path

from bus.cli.common import CliError, add_connection_options, open_bus, out
from bus.cli.state import read_state
from bus.errors import BusUnavailable, ConfigurationError
from bus.identity import CredentialRegistry, Identity, Role
from bus.server import reload_config

# How long a reload may take to show in every node's /varz.
RELOAD_WAIT_S = 10.0


def register(sub: argparse._SubParsersAction) -> None:
    creds = sub.add_parser("creds", help="issue, list and revoke credentials (authorization is on by default)")
    actions = creds.add_subparsers(dest="creds_action", metavar="ACTION")
    actions.required = True

    issue = actions.add_parser(
        "issue", help="a credential for an agent: it may act only as itself",
        description="Write the agent's credential file (an nkey seed, 0600) and let the servers know it. "
        "The agent connects with it (BUS_CREDS=<file>, or `nats --nkey <file>`); its consumers are "
        "created now, for its tags. Issuing again returns the same credential (tags updated) unless --rotate.",
    )
    issue.add_argument("agent", help="the agent's name")
    issue.add_argument("--tags", default="", help="comma-separated tags whose broadcasts it receives")
    issue.add_argument("--rotate", action="store_true", help="a new key; the old one stops working")
    add_connection_options(issue)
    issue.set_defaults(func=run_issue)

    listing = actions.add_parser("list", help="every credential issued: role, name, key, tags, when")
    listing.add_argument("--all", action="store_true", help="revoked ones too")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add_connection_options(listing)
    listing.set_defaults(func=run_list)

    revoke = actions.add_parser("revoke", help="revoke an agent's credential; its connections close at once")
    revoke.add_argument("agent", help="the agent's name")
    add_connection_options(revoke)
    revoke.set_defaults(func=run_revoke)


def registry_of(args: argparse.Namespace) -> CredentialRegistry:
    """The home's registry. Raises CliError when `bus up` never set authorization up there."""
    registry = CredentialRegistry(Path(args.home))
    if not registry.exists():
        raise CliError(
            f"no credentials are kept in {Path(args.home).resolve()}: authorization is set up by `bus up` "
            "(without --no-auth) in that home; pass --home (or BUS_HOME) for another"
        )
    return registry


async def provision_agent(
    args: argparse.Namespace, name: str, tags: list[str], *, rotate: bool = False
) -> tuple[Path, Identity, bool] | None:
    """Issue (or reuse) `name`'s credential, load it into the running servers and create its
    consumers with the admin credential: (credential path, identity, created). None when the
    home has no authorization (`bus up --no-auth`, or a server started elsewhere). Raises CliError."""
    registry = CredentialRegistry(Path(args.home))
    if not registry.exists():
        return None
    try:
        issued = await asyncio.to_thread(
            registry.issue, name, Role.AGENT, namespace=args.namespace, tags=tuple(tags), rotate=rotate
        )
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    await reload_servers(Path(args.home))
    async with open_bus(args, name="cli") as bus:
        await bus.prepare_agent(name, tags)
    return issued.path, issued.identity, issued.created


async def reload_servers(home: Path, timeout_s: float = RELOAD_WAIT_S) -> int:
    """Make every running server of `home` reload its config (auth.conf) and wait until each
    has. Returns how many nodes reloaded. Raises CliError when one did not within `timeout_s`."""
    state = read_state(home)
    if state is None:
        return 0
    reloaded = 0
    for node in state.servers:
        try:
            if await reload_config(node.pid, node.monitor_url, timeout_s=timeout_s):
                reloaded += 1
        except BusUnavailable as exc:
            raise CliError(f"the server {node.name}: {exc}; see its log in {node.store_dir}") from exc
    return reloaded


async def run_issue(args: argparse.Namespace) -> int:
    registry_of(args)
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    provisioned = await provision_agent(args, args.agent, tags, rotate=args.rotate)
    assert provisioned is not None
    path, identity, created = provisioned
    verb = "issued" if created else "already issued (same key)"
    out(f"{verb}: agent {identity.name} in namespace {identity.namespace}, key {identity.public_key}")
    out(f"  credential  {path}   (secret: whoever holds it acts as {identity.name})")
    out(f"  tags        {', '.join(identity.tags) or '-'}")
    out(f"  connect     BUS_CREDS={path} BUS_URL=... (nats CLI: --nkey {path})")
    return 0


async def run_list(args: argparse.Namespace) -> int:
    identities = [i for i in registry_of(args).identities() if args.all or i.active]
    if args.json:
        for identity in identities:
            out(json.dumps({
                "name": identity.name, "role": identity.role.value, "namespace": identity.namespace,
                "tags": list(identity.tags), "public_key": identity.public_key, "issued_at": identity.issued_at,
                "revoked_at": identity.revoked_at,
            }))
        return 0
    out(f"{'ROLE':<8} {'NAME':<24} {'NAMESPACE':<12} {'KEY':<14} {'ISSUED':<20} {'STATE':<8} TAGS")
    for identity in identities:
        state = "active" if identity.active else "revoked"
        out(f"{identity.role.value:<8} {identity.name:<24} {identity.namespace or '-':<12} "
            f"{identity.public_key[:12] + '..':<14} {_when(identity.issued_at):<20} {state:<8} "
            f"{','.join(identity.tags) or '-'}")
    return 0


async def run_revoke(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    try:
        identity = await asyncio.to_thread(registry.revoke, args.agent, Role.AGENT, namespace=args.namespace)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    nodes = await reload_servers(Path(args.home))
    out(f"revoked: agent {identity.name} (key {identity.public_key}); {nodes} server(s) reloaded, "
        "its connections are closed and it cannot connect again")
    return 0


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")
